"""Pictures are produced and are not blank, every camera of a scan, colours fitted once per store;
the store statistics; the demo's table; an untrained checkpoint baseline."""

import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from pipeline.transforms import Grid
from stages.cli import main
from stages.extract.extract import ExtractConfig, extract
from stages.student.pretrain import PretrainConfig, pretrain
from stages.student.samples import SampleConfig
from stages.student.train import OptimConfig, TrainConfig
from stages.student.waffleiron import WaffleIronConfig
from stages.tools.colours import PcaBasis, cosine_to
from stages.tools.demo import DemoConfig, table
from stages.tools.inspect import feature_statistics, stats_lines
from stages.tools.pictures import plot_entry, plot_student
from stages.tools.scan_features import StoreScans, pick_query
from storage.checkpoint import load_checkpoint
from storage.feature_store import FeatureStore, StoreError
from tests.helpers import reseal

GRID = Grid(cell=4.0)


def not_blank(path):
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
    assert pixels.std() > 25 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


@pytest.fixture(scope="module")
def store(nuscenes_root, tmp_path_factory):
    return extract(
        ExtractConfig(
            "nuscenes",
            nuscenes_root,
            "mini_train",
            "test-vit",
            tmp_path_factory.mktemp("s") / "s.zarr",
            random_init=True,
            image_size=(64, 128),
            num_workers=0,
        )
    )


def test_store_entry_pictures(store, tmp_path):
    row = store.manifest().to_pylist()[0]
    paths = plot_entry(store, row["scan_id"], row["camera"], tmp_path, class_name="driveable_surface")
    assert [p.name.split("-")[-1] for p in paths] == ["correlation.png", "pca.png"]
    for p in paths:
        not_blank(p)


def test_whole_scan_pictures_every_camera(store, tmp_path):
    """--scan alone: one figure with the whole scan's bird's-eye view and every camera's image."""
    scans = StoreScans(store)
    scan_id = scans.scan_ids[0]
    scan = scans.load(scan_id)
    stored = [r for r in store.manifest().to_pylist() if r["scan_id"] == scan_id and r["count"]]
    assert [c.name for c in scan.cameras] == [r["camera"] for r in stored] and len(stored) == 6
    assert len(scan.xyz) == sum(r["count"] for r in stored) and all(c.image is not None for c in scan.cameras)
    for cam, r in zip(scan.cameras, stored):  # each camera's rows are its entry, features and pixels as stored
        entry = store.entry(scan_id, r["camera"])[1]
        assert np.array_equal(scan.features[cam.rows], entry["features"]) and np.array_equal(cam.pixels, entry["pixel"])
    paths = plot_entry(store, scan_id, None, tmp_path, class_name="car")
    assert all(
        p.name.startswith("test-vit-nuscenes-") and "all-cameras" in p.name for p in paths
    )  # the dataset in the name: PandaSet's two lidars share scan ids
    for p in paths:
        not_blank(p)
        assert Image.open(p).size[0] > 1500  # three panels a row


def test_pca_from_another_store_of_the_same_size(store, tmp_path):

    row = store.manifest().to_pylist()[0]
    assert len(plot_entry(store, row["scan_id"], row["camera"], tmp_path, pca_from=FeatureStore(store.path))) == 2
    other = tmp_path / "other.zarr"
    shutil.copytree(store.path, other)
    meta = json.loads((other / "zarr.json").read_text())
    meta["attributes"]["teacher"]["dim"] = 384
    (other / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="--pca-from .* 384 dims"):
        plot_entry(store, row["scan_id"], row["camera"], tmp_path, pca_from=FeatureStore(other, check=False))


def test_query_named_by_point_and_class(store):
    scan = StoreScans(store).load(StoreScans(store).scan_ids[0])
    cars = np.flatnonzero(np.asarray(scan.class_names)[scan.labels] == "car")
    assert len(cars)
    row = pick_query(scan, class_name="car")
    assert scan.class_of(row) == "car" and f"({scan.class_names[scan.labels[row]]})" in scan.describe(row)
    raw = int(scan.point_index[cars[0]])
    assert pick_query(scan, point=raw) == scan.row_of_point(raw) and scan.describe(scan.row_of_point(raw)).startswith(
        f"point {raw} (car) at ("
    )
    with pytest.raises(KeyError, match="not among"):
        pick_query(scan, point=10**9)
    with pytest.raises(KeyError, match="unknown class"):
        pick_query(scan, class_name="unicorn")


def test_pca_colours_fitted_once_per_store(store):
    """Colours depend on the store, not on the scan or camera drawn: a point has the same colour in
    the whole-scan picture and in its camera's picture, and a reopened store gives the same basis."""
    scans = StoreScans(store)
    basis = scans.pca()
    again = StoreScans(FeatureStore(store.path)).pca()
    assert np.array_equal(basis.axes, again.axes) and np.array_equal(basis.low, again.low)
    a, b = scans.load(scans.scan_ids[0]), scans.load(scans.scan_ids[-1])
    cam = a.cameras[2]
    assert np.array_equal(basis.rgb(a.only(cam.name).features), basis.rgb(a.features)[cam.rows])
    per_scan = [PcaBasis.fit(s.features) for s in (a, b)]  # what fitting per picture would give
    assert not np.allclose(per_scan[0].rgb(a.features), per_scan[1].rgb(a.features), atol=0.05)


def test_store_statistics_histogram_zero_rows_and_visible_fractions(store, tmp_path):
    copy = tmp_path / "z.zarr"
    shutil.copytree(store.path, copy)
    assert store.layout == "grid"  # zero three tokens (a row of the statistics is a token)
    grids = zarr.open_array(str(copy / "parts/part-000000/grids"), mode="r+")
    zeroed = [(0, 0, 0), (0, 1, 2), (3, 2, 5)]
    values = grids[:]
    for g, i, j in zeroed:
        values[g, :, i, j] = 0
    grids[:] = values
    reseal(copy, 0, keep_sha256=False)
    damaged = FeatureStore(copy)
    stats = feature_statistics(damaged)
    counts, edges = stats["norm_histogram"]
    assert stats["zero_norm_rows"] == len(zeroed) and counts.sum() == stats["rows"] and counts[0] >= len(zeroed)
    assert edges[0] == 0 and edges[-1] == pytest.approx(stats["norm_max"])
    manifest = [r for r in store.manifest().to_pylist() if r["camera"] == "CAM_FRONT" and r["status"] == "ok"]
    assert stats["visible"]["CAM_FRONT"][0] == pytest.approx(np.mean([r["count"] / r["scan_points"] for r in manifest]))
    lines = "\n".join(stats_lines(stats))
    assert "zero-norm rows: 3 " in lines and "CAM_FRONT" in lines and "norm histogram" in lines and "#" in lines
    result = CliRunner().invoke(main, ["inspect", str(copy), "--stats", "--plot", str(tmp_path / "pics")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pics/z-norms.png").exists()


def test_untrained_run_and_student_pictures(store, nuscenes_root, tmp_path):
    cfg = PretrainConfig(
        stores=(store.path,),
        out=tmp_path / "untrained",
        model=WaffleIronConfig(depth=2, width=16, grid_shape=GRID.shape),
        sample=SampleConfig(max_points=3000, grid=GRID),
        optim=OptimConfig(warmup_iters=1),
        train=TrainConfig(batch_size=2, epochs=1, max_steps=0, num_workers=0),
    )
    summary = pretrain(cfg)
    assert summary["steps"] == 0 and load_checkpoint(tmp_path / "untrained/checkpoints/last.pt")["step"] == 0
    scan_id = store.manifest().to_pylist()[0]["scan_id"]
    for p in plot_student(
        tmp_path / "untrained/checkpoints/last.pt",
        "nuscenes",
        nuscenes_root,
        "mini_train",
        scan_id,
        "CAM_BACK",
        tmp_path / "fig",
    ):
        not_blank(p)


def test_feature_colourings():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 8)) + 5.0  # a large shared component
    sim = cosine_to(f, 3)
    assert sim[3] == pytest.approx(1.0) and sim.min() < 0  # centring reveals the structure
    assert cosine_to(f, 3, centre=False).min() > 0.8
    rgb = PcaBasis.fit(f).rgb(f)
    assert rgb.shape == (500, 3) and rgb.min() >= 0 and rgb.max() <= 1 and rgb.std() > 0.2
    flipped = PcaBasis.fit(f * np.array([1, -1, 1, 1, 1, 1, 1, 1]))  # SVD signs are arbitrary; the basis fixes them
    assert (flipped.axes[np.arange(3), np.abs(flipped.axes).argmax(axis=1)] > 0).all()


def test_demo_table_in_the_paper_style():
    row = {"random-init": 0.1, "distilled": 0.25, "oracle": 0.4, "oracle-store": 0.6, "scratch": 0.3}
    lines = table({"nuscenes": row}, DemoConfig())
    assert "random-init" in lines[1] and "gap" in lines[1] and "oracle store" in lines[1]
    assert lines[2].split()[-7:] == ["10.0", "25.0", "+15.0", "40.0", "+30.0", "60.0", "30.0"]
    lines = table({"nuscenes": {"random-init": 0.1, "distilled": 0.25}}, DemoConfig(scratch=False))
    assert lines[2].split()[-6:] == ["10.0", "25.0", "+15.0", "-", "-", "-"]
