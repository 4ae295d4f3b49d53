"""A nuScenes-format rig: 6 cameras around the car, a 32-beam lidar, ego motion between the lidar
and each camera's timestamp. Written as v1.0-mini (<= 10 scenes, official mini scene names) or
v1.0-trainval (official train/val scene names), with lidarseg labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets import nuscenes as nus
from pipeline.geometry import matrix_to_quaternion, rigid, yaw_matrix
from pipeline.synth.pixel_classes import save_class_map
from pipeline.synth.rig import SynthConfig, scene_setup, token
from pipeline.synth.sensors import LidarSpec, render, sweep
from pipeline.synth.world import Cls

DEFAULTS = SynthConfig(scenes=4, frames=4, azimuth_steps=1024, beams=32, image_scale=0.3)
REAL_IMAGE = (900, 1600)  # (H, W) of the real cameras
SWEEP_US = 50_000  # one lidar revolution at 20 Hz
KEYFRAME_US = 500_000  # keyframes at 2 Hz

# (channel, yaw in the ego frame in degrees, position in the ego frame, focal length at 1600 px)
CAMERA_RIG = (
    ("CAM_FRONT", 0.0, (1.70, 0.0, 1.51), 1266.0),
    ("CAM_FRONT_RIGHT", -55.0, (1.55, -0.49, 1.51), 1260.0),
    ("CAM_BACK_RIGHT", -110.0, (1.03, -0.48, 1.56), 1259.0),
    ("CAM_BACK", 180.0, (0.03, 0.0, 1.57), 809.0),
    ("CAM_BACK_LEFT", 110.0, (1.05, 0.48, 1.56), 1256.0),
    ("CAM_FRONT_LEFT", 55.0, (1.52, 0.49, 1.51), 1272.0),
)
LIDAR_TO_EGO = rigid(yaw_matrix(-np.pi / 2), (0.94, 0.0, 1.84))  # lidar x right, y forward, as nuScenes
# Camera axes (x right, y down, z forward) in the ego frame (x forward, y left, z up), for yaw 0.
CAMERA_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])

RAW_INDEX = {
    Cls.ROAD: 24,
    Cls.LANE_MARKING: 24,
    Cls.SIDEWALK: 26,
    Cls.TERRAIN: 27,
    Cls.BUILDING: 28,
    Cls.VEGETATION: 30,
    Cls.TRUNK: 30,
    Cls.CAR: 17,
    Cls.TRUCK: 23,
    Cls.PEDESTRIAN: 2,
    Cls.POLE: 28,
    Cls.TRAFFIC_SIGN: 28,
    Cls.BARRIER: 9,
    Cls.TRAFFIC_CONE: 12,
}


def scene_names(count: int) -> tuple[str, list[str]]:
    """The table version and official scene names for `count` scenes (about a quarter in val)."""
    n_val = max(1, count // 4) if count > 1 else 0
    if count <= len(nus.MINI_TRAIN) + len(nus.MINI_VAL) and n_val <= len(nus.MINI_VAL):
        return "v1.0-mini", list(nus.MINI_TRAIN[: count - n_val]) + list(nus.MINI_VAL[:n_val])
    val = sorted(nus.val_scene_names())[:n_val]
    train = [f"scene-{n:04d}" for n in range(1, 1200) if f"scene-{n:04d}" not in nus.val_scene_names()][: count - n_val]
    return "v1.0-trainval", train + val


def camera_to_ego(yaw_deg: float, position) -> np.ndarray:
    return rigid(yaw_matrix(np.deg2rad(yaw_deg)) @ CAMERA_AXES, position)


def write(out: Path, cfg: SynthConfig, progress=None) -> dict:
    """Write the dataset under `out`; returns counts."""
    version, names = scene_names(cfg.scenes)
    spec = LidarSpec.uniform(cfg.beams, 10.67, -30.67, azimuth_steps=cfg.azimuth_steps, max_range=70.0)
    h, w = round(REAL_IMAGE[0] * cfg.image_scale), round(REAL_IMAGE[1] * cfg.image_scale)
    seed = cfg.seed
    # The global frame: a random rotation and a large offset, as real map coordinates.
    g_rng = np.random.default_rng([seed, 999])
    world_to_global = rigid(
        yaw_matrix(g_rng.uniform(-np.pi, np.pi)), (g_rng.uniform(300, 2000), g_rng.uniform(300, 2000), 0.0)
    )

    tables: dict[str, list] = {
        k: []
        for k in (
            "sensor",
            "calibrated_sensor",
            "log",
            "scene",
            "sample",
            "sample_data",
            "ego_pose",
            "lidarseg",
            "instance",
            "sample_annotation",
            "attribute",
            "visibility",
            "map",
        )
    }
    tables["category"] = [
        {"token": token("category", name), "name": name, "description": name, "index": i}
        for i, (name, _) in enumerate(nus.RAW_CATEGORIES)
    ]
    channels = ("LIDAR_TOP",) + tuple(c[0] for c in CAMERA_RIG)
    for ch in channels:
        tables["sensor"].append(
            {"token": token("sensor", ch), "channel": ch, "modality": "lidar" if ch == "LIDAR_TOP" else "camera"}
        )

    lidarseg_dir = out / "lidarseg" / version
    lidarseg_dir.mkdir(parents=True, exist_ok=True)
    for ch in channels:
        (out / "samples" / ch).mkdir(parents=True, exist_ok=True)
    points_total = 0
    for s, name in enumerate(names):
        rng, world, ego = scene_setup(seed, s, cfg.frames * KEYFRAME_US / 1e6, cfg.speed)
        log_name = f"n015-2018-07-{11 + s % 18:02d}-11-54-40+0800"
        log_token, scene_token = token(seed, "log", name), token(seed, "scene", name)
        tables["log"].append(
            {
                "token": log_token,
                "logfile": log_name,
                "vehicle": "n015",
                "date_captured": "2018-07-11",
                "location": "synthetic",
            }
        )
        cs_tokens = {}
        for ch, yaw, pos, f in (("LIDAR_TOP", None, None, None),) + CAMERA_RIG:
            t = LIDAR_TO_EGO if ch == "LIDAR_TOP" else camera_to_ego(yaw, pos)
            k = [] if ch == "LIDAR_TOP" else _intrinsics(f * w / REAL_IMAGE[1], w, h).tolist()
            cs_tokens[ch] = token(seed, "cs", name, ch)
            tables["calibrated_sensor"].append(
                {
                    "token": cs_tokens[ch],
                    "sensor_token": token("sensor", ch),
                    "translation": t[:3, 3].tolist(),
                    "rotation": matrix_to_quaternion(t[:3, :3]).tolist(),
                    "camera_intrinsic": k,
                }
            )
        t0 = 1_531_281_439_000_000 + s * 100_000_000
        sample_tokens = [token(seed, "sample", name, i) for i in range(cfg.frames)]
        previous: dict[str, dict] = {}  # last sample_data row per channel, to link prev/next
        for i, sample_token in enumerate(sample_tokens):
            ts = t0 + i * KEYFRAME_US
            tables["sample"].append(
                {
                    "token": sample_token,
                    "timestamp": ts,
                    "scene_token": scene_token,
                    "prev": sample_tokens[i - 1] if i else "",
                    "next": sample_tokens[i + 1] if i + 1 < cfg.frames else "",
                }
            )
            rel = (ts - t0) / 1e6
            lidar = sweep(world, spec, ego.pose(rel) @ LIDAR_TO_EGO, rng)
            points_total += len(lidar.points)
            for ch, yaw, pos, f in (("LIDAR_TOP", None, None, None),) + CAMERA_RIG:
                # Each camera fires when the spinning lidar sweeps across its yaw.
                ts_ch = ts if ch == "LIDAR_TOP" else ts + int(SWEEP_US * (yaw % 360.0) / 360.0)
                ego_pose = ego.pose((ts_ch - t0) / 1e6)
                sd_token = token(seed, "sd", name, i, ch)
                ext = "pcd.bin" if ch == "LIDAR_TOP" else "jpg"
                filename = f"samples/{ch}/{log_name}__{ch}__{ts_ch}.{ext}"
                if ch == "LIDAR_TOP":
                    ring = lidar.ring.astype(np.float32)[:, None]
                    np.concatenate([lidar.points, ring], axis=1).astype(np.float32).tofile(out / filename)
                    raw = np.array([RAW_INDEX[Cls(c)] for c in range(len(Cls))], dtype=np.uint8)[lidar.cls]
                    seg_name = f"lidarseg/{version}/{sd_token}_lidarseg.bin"
                    raw.tofile(out / seg_name)
                    tables["lidarseg"].append(
                        {
                            "token": token(seed, "lidarseg", sd_token),
                            "sample_data_token": sd_token,
                            "filename": seg_name,
                        }
                    )
                else:
                    k = _intrinsics(f * w / REAL_IMAGE[1], w, h)
                    image, classes = render(world, k, (h, w), ego_pose @ camera_to_ego(yaw, pos))
                    Image.fromarray(image).save(out / filename, quality=95, subsampling=0)
                    save_class_map(out, out / filename, classes)
                pose_token = token(seed, "ego_pose", sd_token)
                g = world_to_global @ ego_pose
                tables["ego_pose"].append(
                    {
                        "token": pose_token,
                        "timestamp": ts_ch,
                        "rotation": matrix_to_quaternion(g[:3, :3]).tolist(),
                        "translation": g[:3, 3].tolist(),
                    }
                )
                row = {
                    "token": sd_token,
                    "sample_token": sample_token,
                    "ego_pose_token": pose_token,
                    "calibrated_sensor_token": cs_tokens[ch],
                    "timestamp": ts_ch,
                    "fileformat": "pcd" if ch == "LIDAR_TOP" else "jpg",
                    "is_key_frame": True,
                    "height": 0 if ch == "LIDAR_TOP" else h,
                    "width": 0 if ch == "LIDAR_TOP" else w,
                    "filename": filename,
                    "prev": previous[ch]["token"] if ch in previous else "",
                    "next": "",
                }
                if ch in previous:
                    previous[ch]["next"] = sd_token
                previous[ch] = row
                tables["sample_data"].append(row)
            if progress:
                progress(1)
        tables["scene"].append(
            {
                "token": scene_token,
                "log_token": log_token,
                "nbr_samples": cfg.frames,
                "name": name,
                "first_sample_token": sample_tokens[0],
                "last_sample_token": sample_tokens[-1],
                "description": f"synthetic street, seed {seed}",
            }
        )
    (out / version).mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        (out / version / f"{name}.json").write_text(json.dumps(rows, indent=0))
    return {
        "format": "nuscenes",
        "version": version,
        "scenes": len(names),
        "scans": len(names) * cfg.frames,
        "points": points_total,
    }


def _intrinsics(f: float, w: int, h: int) -> np.ndarray:
    return np.array([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])
