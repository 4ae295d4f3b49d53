"""A SemanticKITTI-format rig: a 64-beam lidar and the left colour camera (image_2), synchronised,
frames at 10 Hz. Sequence 08 is the validation sequence, the others come from the train list."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets import semantickitti as kitti
from pipeline.geometry import invert_rigid, rigid
from pipeline.synth.pixel_classes import save_class_map
from pipeline.synth.rig import SynthConfig, scene_setup
from pipeline.synth.sensors import LidarSpec, render, sweep
from pipeline.synth.world import Cls

DEFAULTS = SynthConfig(scenes=2, frames=8, azimuth_steps=1024, beams=64, image_scale=0.5)
REAL_IMAGE = (376, 1241)
REAL_K = np.array([[718.856, 0.0, 607.1928], [0.0, 718.856, 185.2157], [0.0, 0.0, 1.0]])
FRAME_S = 0.1
VELO_TO_EGO = rigid(np.eye(3), (0.0, 0.0, 1.73))  # the velodyne 1.73 m above the ground
# Velodyne (x forward, y left, z up) -> camera 0 (x right, y down, z forward), camera 0 sitting
# 0.27 m ahead of and 0.08 m below the velodyne; camera 2 is 0.06 m to the left of camera 0.
VELO_TO_CAM_AXES = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
CAM0_IN_VELO = np.array([0.27, 0.0, -0.08])
CAMERA_BAR = {"P0": 0.0, "P1": -0.54, "P2": 0.06, "P3": -0.48}  # x offset of camera 0 in each camera's frame

RAW_LABEL = {
    Cls.ROAD: 40,
    Cls.LANE_MARKING: 60,
    Cls.SIDEWALK: 48,
    Cls.TERRAIN: 72,
    Cls.BUILDING: 50,
    Cls.VEGETATION: 70,
    Cls.TRUNK: 71,
    Cls.CAR: 10,
    Cls.TRUCK: 18,
    Cls.PEDESTRIAN: 30,
    Cls.POLE: 80,
    Cls.TRAFFIC_SIGN: 81,
    Cls.BARRIER: 51,
    Cls.TRAFFIC_CONE: 99,
}
THINGS = (Cls.CAR, Cls.TRUCK, Cls.PEDESTRIAN)


def sequence_names(count: int, splits=kitti.SPLITS) -> list[str]:
    if count <= 1:
        return [splits["train"][0]]
    return list(splits["train"][: count - 1]) + list(splits["val"])


@dataclass(frozen=True)
class Layout:
    """A dataset in SemanticKITTI's folder layout: its lidar, label ids, splits, camera or not."""

    name: str
    top_deg: float
    bottom_deg: float
    intensity_max: float
    raw_label: dict
    splits: dict
    with_camera: bool


KITTI = Layout("semantickitti", 2.0, -24.8, 1.0, RAW_LABEL, kitti.SPLITS, True)


def write(out: Path, cfg: SynthConfig, progress=None, layout: Layout = KITTI) -> dict:
    spec = LidarSpec.uniform(
        cfg.beams,
        layout.top_deg,
        layout.bottom_deg,
        azimuth_steps=cfg.azimuth_steps,
        max_range=80.0,
        intensity_max=layout.intensity_max,
        integer_intensity=layout.intensity_max > 1,
    )
    h, w = round(REAL_IMAGE[0] * cfg.image_scale), round(REAL_IMAGE[1] * cfg.image_scale)
    k = REAL_K.copy()
    k[:2] *= np.array([[w / REAL_IMAGE[1]], [h / REAL_IMAGE[0]]])
    raw_of = np.array([layout.raw_label[Cls(c)] for c in range(len(Cls))], dtype=np.uint32)
    points_total = 0
    names = sequence_names(cfg.scenes, layout.splits)
    for s, name in enumerate(names):
        rng, world, ego = scene_setup(cfg.seed, s, cfg.frames * FRAME_S, cfg.speed)
        # A slightly imperfect mounting, so that Tr is not a bare axis swap.
        tilt = _small_rotation(rng, np.deg2rad(0.4))
        velo_to_cam0 = rigid(tilt @ VELO_TO_CAM_AXES, -(tilt @ VELO_TO_CAM_AXES) @ CAM0_IN_VELO)
        cam0_to_cam2 = rigid(np.eye(3), (CAMERA_BAR["P2"], 0.0, 0.0))
        folder = out / "sequences" / name
        for sub in ("velodyne", "labels", "image_2") if layout.with_camera else ("velodyne", "labels"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # P_i = K @ [I | t_i]: cameras 0-3 on a horizontal bar (grey, grey, colour left, colour right).
        lines = [
            f"{key}: " + " ".join(f"{v:.12e}" for v in (k @ rigid(np.eye(3), (dx, 0, 0))[:3]).ravel())
            for key, dx in CAMERA_BAR.items()
        ]
        lines.append("Tr: " + " ".join(f"{v:.12e}" for v in velo_to_cam0[:3].ravel()))
        if layout.with_camera:
            (folder / "calib.txt").write_text("\n".join(lines) + "\n")
        poses, times = [], []
        cam0_first = None
        for i in range(cfg.frames):
            velo_to_world = ego.pose(i * FRAME_S) @ VELO_TO_EGO
            lidar = sweep(world, spec, velo_to_world, rng)
            points_total += len(lidar.points)
            lidar.points.astype(np.float32).tofile(folder / "velodyne" / f"{i:06d}.bin")
            instance = np.where(np.isin(lidar.cls, THINGS), lidar.instance, 0).astype(np.uint32)
            (raw_of[lidar.cls] | (instance << 16)).astype(np.uint32).tofile(folder / "labels" / f"{i:06d}.label")
            cam0_to_world = velo_to_world @ invert_rigid(velo_to_cam0)
            if layout.with_camera:
                image, classes = render(world, k, (h, w), cam0_to_world @ invert_rigid(cam0_to_cam2))
                Image.fromarray(image).save(folder / "image_2" / f"{i:06d}.png")
                save_class_map(out, folder / "image_2" / f"{i:06d}.png", classes)
            cam0_first = cam0_to_world if cam0_first is None else cam0_first
            poses.append(" ".join(f"{v:.12e}" for v in (invert_rigid(cam0_first) @ cam0_to_world)[:3].ravel()))
            times.append(f"{i * FRAME_S:.6e}")
            if progress:
                progress(1)
        (folder / "poses.txt").write_text("\n".join(poses) + "\n")
        (folder / "times.txt").write_text("\n".join(times) + "\n")
    return {"format": layout.name, "sequences": names, "scans": len(names) * cfg.frames, "points": points_total}


def _small_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx
