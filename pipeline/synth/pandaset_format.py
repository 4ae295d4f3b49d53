"""A PandaSet-format rig: a 64-beam spinning lidar (Pandar64, d = 0) and a forward-facing lidar
(PandarGT, d = 1, +-30 deg) in one table per frame in the WORLD frame, six cameras around the car,
semantic labels, poses and GPS (the first sequence north of latitude 37.6 = train, the last south =
val)."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets.pandaset import ALL_CAMERAS
from pipeline.geometry import matrix_to_quaternion, rigid, yaw_matrix
from pipeline.synth.pixel_classes import save_class_map
from pipeline.synth.rig import SynthConfig, scene_setup
from pipeline.synth.sensors import LidarSpec, render, sweep
from pipeline.synth.world import Cls

DEFAULTS = SynthConfig(scenes=2, frames=4, azimuth_steps=1024, beams=64, image_scale=0.25)
REAL_IMAGE = (1080, 1920)
FRAME_S = 0.1
PANDAR64_TO_EGO = rigid(np.eye(3), (0.0, 0.0, 1.75))
PANDARGT_TO_EGO = rigid(np.eye(3), (1.6, 0.0, 1.5))
GT_HALF_FOV = np.deg2rad(30.0)
# The frame lidar/poses.json describes: 0.1 m above the road, so that the readers' -1.6 m shift puts
# the road near -1.7 m as it does on real PandaSet with the released ScaLR code.
POSE_FRAME_TO_EGO = rigid(np.eye(3), (0.0, 0.0, 0.1))
# (camera, yaw in degrees, focal length at 1920 px)
CAMERA_RIG = dict(
    zip(ALL_CAMERAS, ((180.0, 933.0), (0.0, 1970.0), (60.0, 930.0), (-60.0, 930.0), (90.0, 930.0), (-90.0, 930.0)))
)
CAMERA_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # x right, y down, z forward

RAW_CLASS = {
    Cls.ROAD: 7,
    Cls.LANE_MARKING: 8,
    Cls.SIDEWALK: 11,
    Cls.TERRAIN: 6,
    Cls.BUILDING: 41,
    Cls.VEGETATION: 5,
    Cls.TRUNK: 5,
    Cls.CAR: 13,
    Cls.TRUCK: 15,
    Cls.PEDESTRIAN: 30,
    Cls.POLE: 42,
    Cls.TRAFFIC_SIGN: 36,
    Cls.BARRIER: 35,
    Cls.TRAFFIC_CONE: 37,
}


def _pose_record(t: np.ndarray) -> dict:
    w, x, y, z = matrix_to_quaternion(t[:3, :3])
    return {"position": dict(zip("xyz", t[:3, 3].tolist())), "heading": {"w": w, "x": x, "y": y, "z": z}}


def _write_table(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pandas as pd  # noqa: PLC0415 - 0.7 s to import, and only PandaSet needs it

    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as f:
        pickle.dump(pd.DataFrame(columns), f, protocol=4)  # mtime=0: same seed, same bytes


def write(out: Path, cfg: SynthConfig, progress=None) -> dict:
    p64 = LidarSpec.uniform(cfg.beams, 15.0, -25.0, azimuth_steps=cfg.azimuth_steps, max_range=120.0)
    pgt = LidarSpec.uniform(cfg.beams, 12.0, -12.0, azimuth_steps=cfg.azimuth_steps * 3, max_range=120.0)
    h, w = round(REAL_IMAGE[0] * cfg.image_scale), round(REAL_IMAGE[1] * cfg.image_scale)
    raw_of = np.array([RAW_CLASS[Cls(c)] for c in range(len(Cls))], dtype=np.int64)
    points_total = 0
    names = [f"{i + 1:03d}" for i in range(cfg.scenes)]
    for s, name in enumerate(names):
        rng, world, ego = scene_setup(cfg.seed, s, cfg.frames * FRAME_S, cfg.speed)
        folder = out / name
        for sub in ("lidar", "annotations/semseg", "meta", *(f"camera/{c}" for c in ALL_CAMERAS)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        val = s == len(names) - 1 and len(names) > 1
        gps = [
            {
                "lat": (37.55 if val else 37.75) + 1e-5 * i,
                "long": -122.42,
                "height": 10.0,
                "xvel": cfg.speed,
                "yvel": 0.0,
            }
            for i in range(cfg.frames)
        ]
        (folder / "meta" / "gps.json").write_text(json.dumps(gps))
        lidar_poses, camera_poses = [], {c: [] for c in ALL_CAMERAS}
        for i in range(cfg.frames):
            ego_pose = ego.pose(i * FRAME_S)
            parts, classes = [], []
            for d, (spec, mount) in enumerate(((p64, PANDAR64_TO_EGO), (pgt, PANDARGT_TO_EGO))):
                lidar_to_world = ego_pose @ mount
                scan = sweep(world, spec, lidar_to_world, rng)
                keep = (
                    np.ones(len(scan.points), bool)
                    if d == 0
                    else np.abs(np.arctan2(scan.points[:, 1], scan.points[:, 0])) < GT_HALF_FOV
                )
                local = scan.points[keep]
                xyz = local[:, :3].astype(np.float64) @ lidar_to_world[:3, :3].T + lidar_to_world[:3, 3]
                parts.append(
                    np.concatenate(
                        [xyz, local[:, 3:4], np.full((len(xyz), 1), i * FRAME_S), np.full((len(xyz), 1), d)], axis=1
                    )
                )
                classes.append(raw_of[scan.cls[keep]])
            table = np.concatenate(parts)
            points_total += len(table)
            _write_table(
                folder / "lidar" / f"{i:02d}.pkl.gz",
                {c: table[:, k] for k, c in enumerate(("x", "y", "z", "i", "t"))} | {"d": table[:, 5].astype(np.int64)},
            )
            _write_table(folder / "annotations" / "semseg" / f"{i:02d}.pkl.gz", {"class": np.concatenate(classes)})
            lidar_poses.append(_pose_record(ego_pose @ POSE_FRAME_TO_EGO))
            for cam, (yaw, focal) in CAMERA_RIG.items():
                f = focal * w / REAL_IMAGE[1]
                k = np.array([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])
                camera_to_world = ego_pose @ rigid(yaw_matrix(np.deg2rad(yaw)) @ CAMERA_AXES, (1.2, 0.0, 1.6))
                image, classes = render(world, k, (h, w), camera_to_world)
                image_path = folder / "camera" / cam / f"{i:02d}.jpg"
                Image.fromarray(image).save(image_path, quality=95, subsampling=0)
                save_class_map(out, image_path, classes)
                camera_poses[cam].append(_pose_record(camera_to_world))
                if i == 0:
                    (folder / "camera" / cam / "intrinsics.json").write_text(
                        json.dumps({"fx": f, "fy": f, "cx": w / 2, "cy": h / 2})
                    )
            if progress:
                progress(1)
        (folder / "lidar" / "poses.json").write_text(json.dumps(lidar_poses))
        (folder / "lidar" / "timestamps.json").write_text(json.dumps([i * FRAME_S for i in range(cfg.frames)]))
        for cam in ALL_CAMERAS:
            (folder / "camera" / cam / "poses.json").write_text(json.dumps(camera_poses[cam]))
    return {"format": "pandaset", "sequences": names, "scans": len(names) * cfg.frames, "points": points_total}
