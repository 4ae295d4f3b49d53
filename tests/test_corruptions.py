"""Each corruption changes the cloud as documented and keeps labels aligned; mCE/mRR arithmetic."""

import numpy as np
import pytest

from pipeline.corruptions import CORRUPTIONS, MINKUNET18_NUSCENES_C, beam_ids, robustness
from pipeline.datasets import open_dataset
from pipeline.scan import IGNORE_INDEX


@pytest.fixture(scope="module")
def scan(kitti_root):
    s = open_dataset("semantickitti", kitti_root, "train")[0]
    return s.points.copy(), s.labels.copy()  # KITTI intensity is already in [0, 1]


def run(name, scan, severity=2, seed=0, target=None):
    points, labels = scan
    return CORRUPTIONS[name](points, labels, severity, np.random.default_rng(seed), target)


def originals(points, out):
    """Which output rows are unmodified input rows (exact xyz match)."""
    index = {tuple(p): i for i, p in enumerate(points[:, :3])}
    return np.array([index.get(tuple(p), -1) for p in out[:, :3]])


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_is_deterministic_aligned_and_effective(name, scan):
    a, la = run(name, scan, target=np.array([0, 3]))
    b, lb = run(name, scan, target=np.array([0, 3]))
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert len(a) == len(la) and a.dtype == np.float32
    assert not (len(a) == len(scan[0]) and np.allclose(a, scan[0]))
    sev1, sev3 = run(name, scan, 1)[0], run(name, scan, 3)[0]
    assert not np.array_equal(sev1, sev3)


def test_fog_loses_far_points_first_and_adds_unlabelled_backscatter(scan):
    points, labels = scan
    out, lab = run("fog", scan, 3)
    rows = originals(points, out)
    kept = np.zeros(len(points), bool)
    kept[rows[rows >= 0]] = True
    r = np.linalg.norm(points[:, :3], axis=1)
    assert kept[r < 10].mean() > kept[r > 30].mean() + 0.3
    assert (lab[rows < 0] == IGNORE_INDEX).all() and (rows < 0).sum() > 100
    assert np.array_equal(lab[rows >= 0], labels[rows[rows >= 0]])
    assert len(run("fog", scan, 1)[0][originals(points, run("fog", scan, 1)[0]) >= 0]) > (rows >= 0).sum()


def test_wet_ground_darkens_and_thins_the_ground_only(scan):
    points, _ = scan
    out, _ = run("wet_ground", scan, 1)
    rows = originals(points, out)
    ground = points[:, 2] < np.percentile(points[:, 2], 10) + 0.25
    g = ground[rows]
    assert np.allclose(out[g, 3], points[rows[g], 3] * 0.6, atol=1e-6)
    assert np.array_equal(out[~g, 3], points[rows[~g], 3])
    assert (rows >= 0).all() and 0.05 < 1 - g.sum() / ground.sum() < 0.15


def test_snow_adds_near_unlabelled_flakes(scan):
    out, lab = run("snow", scan, 3)
    flakes = lab == IGNORE_INDEX
    flakes &= np.arange(len(lab)) >= len(lab) - int(0.1 * len(scan[0]))
    r = np.linalg.norm(out[flakes, :3], axis=1)
    assert flakes.sum() == int(0.1 * len(scan[0])) and r.min() >= 1.0 and r.max() <= 25.0


def test_motion_blur_moves_points_forward_along_the_sweep(scan):
    points, labels = scan
    out, lab = run("motion_blur", scan, 3)
    assert np.array_equal(out[:, 1:], points[:, 1:]) and np.array_equal(lab, labels)
    shift = out[:, 0] - points[:, 0]
    assert -0.05 < shift.min() and shift.max() < 2.05 and shift.mean() > 0.5


def test_beam_missing_and_cross_sensor_remove_beams(scan):
    points, _ = scan
    beams = len(np.unique(beam_ids(points)))
    missing, _ = run("beam_missing", scan, 2)
    assert 0.3 * beams < len(np.unique(beam_ids(missing))) < 0.7 * beams
    fewer, _ = run("cross_sensor", scan, 2)
    assert len(np.unique(beam_ids(fewer))) <= beams / 3 + 2


def test_cross_talk_ghosts_lie_on_existing_rays(scan):
    points, _ = scan
    out, lab = run("cross_talk", scan, 3)
    ghosts = out[len(points) :]
    assert len(ghosts) == int(0.06 * len(points)) and (lab[len(points) :] == IGNORE_INDEX).all()
    dirs = points[:, :3] / np.linalg.norm(points[:, :3], axis=1, keepdims=True)
    gdirs = ghosts[:, :3] / np.linalg.norm(ghosts[:, :3], axis=1, keepdims=True)
    assert np.allclose(np.max(gdirs @ dirs.T, axis=1), 1.0, atol=1e-5)


def test_incomplete_echo_empties_vehicles(scan):
    points, labels = scan
    car = 0  # SemanticKITTI class 0 is car
    out, lab = run("incomplete_echo", scan, 3, target=np.array([car]))
    assert (lab == car).sum() < 0.1 * (labels == car).sum()
    assert (lab != car).sum() == (labels != car).sum()


def test_mce_and_mrr_on_given_numbers():
    miou = {"fog": [0.5, 0.4, 0.3], "snow": [0.6, 0.6, 0.6]}
    r = robustness(miou, clean=0.75, baseline=MINKUNET18_NUSCENES_C)
    assert r["ce"]["fog"] == pytest.approx((0.5 + 0.6 + 0.7) / (3 * (1 - 0.5364)))
    assert r["ce"]["snow"] == pytest.approx(1.2 / (3 * (1 - 0.4035)))
    assert r["rr"]["fog"] == pytest.approx(1.2 / (3 * 0.75)) and r["rr"]["snow"] == pytest.approx(0.8)
    assert r["mce"] == pytest.approx((r["ce"]["fog"] + r["ce"]["snow"]) / 2)
    assert robustness(miou, 0.75, None)["mce"] is None
