"""Robo3D-style corruptions of a lidar scan, as point-cloud transforms.

Each corruption takes points (N, 4: x, y, z, intensity in [0, 1]) in the sensor frame, their
labels (or None) and a severity 1-3, and returns new points and labels that stay aligned:
removed points take their labels with them, added points are labelled IGNORE (they hit no
labelled surface). Each is a documented simplification of the physical effect, deterministic
for a given numpy Generator.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.scan import IGNORE_INDEX

Corruption = Callable[
    [np.ndarray, np.ndarray | None, int, np.random.Generator, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]
]


def _keep(points, labels, mask):
    return points[mask], None if labels is None else labels[mask]


def _add(points, labels, extra):
    out = np.concatenate([points, extra.astype(points.dtype)])
    if labels is None:
        return out, None
    return out, np.concatenate([labels, np.full(len(extra), IGNORE_INDEX, dtype=labels.dtype)])


def _range(points):
    return np.linalg.norm(points[:, :3], axis=1)


def fog(points, labels, severity, rng, target=None):
    """Fog: Beer-Lambert attenuation exp(-2 beta R) of every return (beta = 0.01, 0.025, 0.05 per
    m); a return whose attenuated intensity falls under the detection floor 0.01 is lost, and with
    probability 1 - exp(-beta R) the pulse is instead back-scattered by the fog itself at a random
    fraction (0.1-0.6) of the range, with a faint intensity."""
    beta = (0.01, 0.025, 0.05)[severity - 1]
    r = _range(points)
    out = points.copy()
    out[:, 3] *= np.exp(-2 * beta * r)
    scattered = rng.random(len(points)) < 1 - np.exp(-beta * r)
    visible = (out[:, 3] >= 0.01) & ~scattered
    back = points[scattered].copy()
    back[:, :3] *= rng.uniform(0.1, 0.6, (len(back), 1))
    back[:, 3] = rng.uniform(0.0, 0.05, len(back))
    out, lab = _keep(out, labels, visible)
    return _add(out, lab, back)


def _ground(points):
    z = points[:, 2]
    return z < np.percentile(z, 10) + 0.25


def wet_ground(points, labels, severity, rng, target=None):
    """Wet ground: a water film turns diffuse reflection specular, so ground returns (points within
    0.25 m of the 10th height percentile) lose intensity (x 0.6, 0.4, 0.2) and a share of them
    (10, 25, 40%) does not come back at all."""
    factor, lost = ((0.6, 0.1), (0.4, 0.25), (0.2, 0.4))[severity - 1]
    ground = _ground(points)
    out = points.copy()
    out[ground, 3] *= factor
    keep = ~(ground & (rng.random(len(points)) < lost))
    return _keep(out, labels, keep)


def snow(points, labels, severity, rng, target=None):
    """Snow: flakes near the sensor return the pulse (2, 5, 10% extra points, 1-25 m, faint, inside
    the scan's vertical field of view), occlude as many true returns, and jitter the rest by 2 cm."""
    rate = (0.02, 0.05, 0.1)[severity - 1]
    n = int(rate * len(points))
    r = _range(points)
    elev = np.arcsin(np.clip(points[:, 2] / np.maximum(r, 1e-6), -1, 1))
    az = rng.uniform(-np.pi, np.pi, n)
    el = rng.uniform(elev.min(), elev.max(), n)
    rr = rng.uniform(1.0, 25.0, n)
    flakes = np.stack(
        [rr * np.cos(el) * np.cos(az), rr * np.cos(el) * np.sin(az), rr * np.sin(el), rng.uniform(0, 0.1, n)], axis=1
    )
    out = points.copy()
    out[:, :3] += rng.normal(0, 0.02, (len(points), 3))
    out, lab = _keep(out, labels, rng.random(len(points)) >= rate)
    return _add(out, lab, flakes)


def motion_blur(points, labels, severity, rng, target=None):
    """Motion blur: the sensor moves forward (x) at 5, 10, 20 m/s during a 0.1 s revolution, so a
    point is displaced by v t(azimuth) with t growing linearly over the sweep, plus 1 cm jitter."""
    speed = (5.0, 10.0, 20.0)[severity - 1]
    t = (np.arctan2(points[:, 1], points[:, 0]) + np.pi) / (2 * np.pi) * 0.1
    out = points.copy()
    out[:, 0] += speed * t + rng.normal(0, 0.01, len(points))
    return out, labels


def beam_ids(points, resolution_deg: float = 0.2) -> np.ndarray:
    """Beam index of every point from its elevation, quantised (sensors' beams are >= 0.33 deg apart)."""
    r = np.linalg.norm(points[:, :2], axis=1)
    elev = np.degrees(np.arctan2(points[:, 2], np.maximum(r, 1e-6)))
    _, ids = np.unique(np.round(elev / resolution_deg).astype(np.int64), return_inverse=True)
    return ids


def beam_missing(points, labels, severity, rng, target=None):
    """Beam missing: whole laser beams fail; 25, 50, 75% of the beams (grouped by elevation) are dropped."""
    rate = (0.25, 0.5, 0.75)[severity - 1]
    ids = beam_ids(points)
    dead = rng.random(ids.max() + 1) < rate
    return _keep(points, labels, ~dead[ids])


def cross_talk(points, labels, severity, rng, target=None):
    """Cross-talk: pulses of another lidar are received as returns along existing rays at a wrong,
    random range (1, 3, 6% extra points, at 5-95% of the true range)."""
    rate = (0.01, 0.03, 0.06)[severity - 1]
    pick = rng.choice(len(points), int(rate * len(points)), replace=False)
    ghosts = points[pick].copy()
    ghosts[:, :3] *= rng.uniform(0.05, 0.95, (len(pick), 1))
    ghosts[:, 3] = rng.uniform(0, 1, len(pick))
    return _add(points, labels, ghosts)


def incomplete_echo(points, labels, severity, rng, target=None):
    """Incomplete echo: dark, glossy surfaces (vehicles) return too little light; 75, 85, 95% of the
    points of the target classes (vehicles; without labels: the darkest 20% of points) are lost."""
    rate = (0.75, 0.85, 0.95)[severity - 1]
    if labels is not None and target is not None:
        affected = np.isin(labels, target)
    else:
        affected = points[:, 3] <= np.percentile(points[:, 3], 20)
    return _keep(points, labels, ~(affected & (rng.random(len(points)) < rate)))


def cross_sensor(points, labels, severity, rng, target=None):
    """Cross-sensor: a sensor with fewer beams; keep every 2nd, 3rd or 4th beam and lose 10, 20, 30%
    of the remaining returns."""
    step, lost = ((2, 0.1), (3, 0.2), (4, 0.3))[severity - 1]
    ids = beam_ids(points)
    keep = (ids % step == 0) & (rng.random(len(points)) >= lost)
    return _keep(points, labels, keep)


CORRUPTIONS: dict[str, Corruption] = {
    "fog": fog,
    "wet_ground": wet_ground,
    "snow": snow,
    "motion_blur": motion_blur,
    "beam_missing": beam_missing,
    "cross_talk": cross_talk,
    "incomplete_echo": incomplete_echo,
    "cross_sensor": cross_sensor,
}

# Published MinkUNet-18 mIoU (%) on nuScenes-C per corruption (Robo3D), the mCE reference.
MINKUNET18_NUSCENES_C = {
    "fog": 53.64,
    "wet_ground": 73.91,
    "snow": 40.35,
    "motion_blur": 73.39,
    "beam_missing": 68.54,
    "cross_talk": 26.58,
    "incomplete_echo": 63.83,
    "cross_sensor": 50.95,
}
MINKUNET18_NUSCENES_CLEAN = 75.76


def robustness(miou: dict[str, list[float]], clean: float, baseline: dict[str, float] | None) -> dict:
    """CE_i = sum_l (1 - mIoU_il) / sum_l (1 - mIoU_i^base); mCE = mean CE_i;
    RR_i = sum_l mIoU_il / (3 mIoU_clean); mRR = mean RR_i. mIoU in [0, 1]; baseline in %."""
    ce, rr = {}, {}
    for name, per_severity in miou.items():
        rr[name] = float(np.sum(per_severity) / (len(per_severity) * clean))
        if baseline and name in baseline:
            ce[name] = float(np.sum(1 - np.asarray(per_severity)) / (len(per_severity) * (1 - baseline[name] / 100)))
    return {
        "ce": ce,
        "rr": rr,
        "mce": float(np.mean(list(ce.values()))) if ce else None,
        "mrr": float(np.mean(list(rr.values()))),
    }
