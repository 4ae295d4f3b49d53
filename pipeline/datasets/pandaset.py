"""PandaSet read from its own on-disk format, as two datasets: Pandar64 (the spinning lidar, sensor
column d == 0, 6 cameras) and PandarGT (the forward lidar, d == 1, front camera only).

Layout under ROOT, one folder per sequence (e.g. 001/):
    SEQ/lidar/NN.pkl.gz                 pickled pandas DataFrame: x, y, z (WORLD frame), i, t, d
    SEQ/lidar/poses.json                per frame: {"position": {x, y, z}, "heading": {w, x, y, z}}
    SEQ/camera/<name>/NN.jpg            back, front, front_left, front_right, left, right cameras
    SEQ/camera/<name>/poses.json        per frame, same form; intrinsics.json: {fx, fy, cx, cy}
    SEQ/annotations/semseg/NN.pkl.gz    DataFrame with a "class" column, one row per lidar point
    SEQ/meta/gps.json                   per frame: {"lat", "long", ...}
Scan id: "SEQ/NN". Points are moved from the world frame to the frame of the lidar pose and shifted
by z - 1.6 m (as the released ScaLR code), so that every dataset's points are ego-centred; the
camera transforms account for that. They stay float64, as the released code reads the tables and
moves, voxelises and crops them. Split by the latitude of the sequence's first GPS fix: > 37.6
train, <= 37.6 val.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets.base import LidarDataset, image_size
from pipeline.datasets.records import Record, read_json, records
from pipeline.errors import DatasetError
from pipeline.geometry import check_intrinsics, check_rigid, invert_rigid, rigid
from pipeline.safe_pickle import load_dataframe
from pipeline.scan import IGNORE_INDEX, Camera, DatasetMeta, Scan, VisibilityRule

log = logging.getLogger(__name__)

CLASSES = (
    "road",
    "traffic_sign",
    "barrier",
    "pedestrian",
    "vegetation",
    "road_marking",
    "sidewalk",
    "manmade",
    "traffic_cone",
    "car",
    "motorcycle",
    "truck",
    "bus",
    "bicycle",
    "other_vehicle",
    "ground",
    "driveway",
)

# PandaSet semseg ids -> (name, benchmark class or None), the 17-class grouping of the released
# ScaLR code (noise, smoke, exhaust, spray, reflection, emergency vehicles, personal mobility,
# scooters, animals and rolling containers are ignored).
RAW_CLASSES: dict[int, tuple[str, str | None]] = {
    0: ("Noise", None),
    1: ("Smoke", None),
    2: ("Exhaust", None),
    3: ("Spray or rain", None),
    4: ("Reflection", None),
    5: ("Vegetation", "vegetation"),
    6: ("Ground", "ground"),
    7: ("Road", "road"),
    8: ("Lane Line Marking", "road_marking"),
    9: ("Stop Line Marking", "road_marking"),
    10: ("Other Road Marking", "road_marking"),
    11: ("Sidewalk", "sidewalk"),
    12: ("Driveway", "driveway"),
    13: ("Car", "car"),
    14: ("Pickup Truck", "truck"),
    15: ("Medium-sized Truck", "truck"),
    16: ("Semi-truck", "truck"),
    17: ("Towed Object", "other_vehicle"),
    18: ("Motorcycle", "motorcycle"),
    19: ("Other Vehicle - Construction Vehicle", "other_vehicle"),
    20: ("Other Vehicle - Uncommon", "other_vehicle"),
    21: ("Other Vehicle - Pedicab", "other_vehicle"),
    22: ("Emergency Vehicle", None),
    23: ("Bus", "bus"),
    24: ("Personal Mobility Device", None),
    25: ("Motorized Scooter", None),
    26: ("Bicycle", "bicycle"),
    27: ("Train", "other_vehicle"),
    28: ("Trolley", "other_vehicle"),
    29: ("Tram / Subway", "other_vehicle"),
    30: ("Pedestrian", "pedestrian"),
    31: ("Pedestrian with Object", "pedestrian"),
    32: ("Animals - Bird", None),
    33: ("Animals - Other", None),
    34: ("Pylons", "traffic_cone"),
    35: ("Road Barriers", "barrier"),
    36: ("Signs", "traffic_sign"),
    37: ("Cones", "traffic_cone"),
    38: ("Construction Signs", "traffic_sign"),
    39: ("Temporary Construction Barriers", "barrier"),
    40: ("Rolling Containers", None),
    41: ("Building", "manmade"),
    42: ("Other Static Object", "manmade"),
}

ALL_CAMERAS = ("back_camera", "front_camera", "front_left_camera", "front_right_camera", "left_camera", "right_camera")
EGO_Z_SHIFT = -1.6  # metres, applied after moving points to the lidar-pose frame
TRAIN_LATITUDE = 37.6


def _meta(name: str, cameras: tuple[str, ...], intensity_mean: float, intensity_std: float) -> DatasetMeta:
    return DatasetMeta(
        name=name,
        class_names=CLASSES,
        raw_names={k: n for k, (n, _) in RAW_CLASSES.items()},
        learning_map={k: (CLASSES.index(c) if c else IGNORE_INDEX) for k, (_, c) in RAW_CLASSES.items()},
        splits=("train", "val"),
        camera_names=cameras,
        visibility=VisibilityRule(
            name="released ScaLR (pandaset devkit): z_cam > 0, 0 < u < W, 0 < v < H", min_depth=0.0
        ),
        intensity_max=255.0,
        intensity_mean=intensity_mean,
        intensity_std=intensity_std,
        field_of_view=((-128.0, -128.0, -8.0), (128.0, 128.0, 8.0)),
        points_dtype="float64",  # datasets/pandaset_for_scalr.py: the pickled tables' float64, kept
    )


def read_table(path: Path, numeric: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A pickled (gzip) pandas DataFrame as {column: array}, unpickled without running code from
    the file (pipeline/safe_pickle.py). The `numeric` columns must be there and hold finite numbers."""
    frame = load_dataframe(path)
    table = {str(c): frame[c].to_numpy() for c in frame.columns}
    missing = [c for c in numeric if c not in table]
    if missing:
        raise DatasetError(path, f"columns {missing} are missing (it has {list(table)})")
    for c in numeric:
        if table[c].dtype.kind not in "biuf":
            raise DatasetError(path, f"column {c!r} holds {table[c].dtype} values, not numbers")
        if table[c].dtype.kind == "f" and not np.isfinite(table[c]).all():
            raise DatasetError(path, f"column {c!r} has NaN or infinite values")
    return table


def _poses(path: Path) -> list[Record]:
    return records(path, read_json(path), "pose")


def _pose(record: Record, what: str) -> np.ndarray:
    """A pose record as the released code composes it (`heading_position_to_mat`, after the
    PandaSet devkit: transforms3d's quat2mat of the unnormalised heading, then the position)."""
    h, p = record.record("heading"), record.record("position")
    w, x, y, z = (h.number(k) for k in "wxyz")
    with np.errstate(all="ignore"):
        norm2 = w * w + x * x + y * y + z * z
        if norm2 < np.finfo(np.float64).eps:
            rotation = np.eye(3)
        else:
            s = 2.0 / norm2
            sx, sy, sz = x * s, y * s, z * s
            wx, wy, wz, xx, xy, xz, yy, yz, zz = w * sx, w * sy, w * sz, x * sx, x * sy, x * sz, y * sy, y * sz, z * sz
            rotation = np.array(
                [
                    [1.0 - (yy + zz), xy - wz, xz + wy],
                    [xy + wz, 1.0 - (xx + zz), yz - wx],
                    [xz - wy, yz + wx, 1.0 - (xx + yy)],
                ]
            )
        t = rigid(rotation, [p.number(k) for k in "xyz"])
    return check_rigid(t, record.path, what)


def _frame_pose(path: Path, poses: list[Record], number: int, what: str) -> np.ndarray:
    if number >= len(poses):
        raise DatasetError(path, f"no pose for frame {number:02d} ({len(poses)} poses)")
    return _pose(poses[number], what)


@dataclass(frozen=True)
class _Sequence:
    name: str
    frames: tuple[str, ...]


class _PandaSet(LidarDataset):
    sensor: int = 0

    def __init__(self, root: str | Path, split: str = "train", keep_going: bool = False):
        super().__init__(root, split, keep_going)
        self._sequences: dict[str, _Sequence] = {}
        self._ids: list[str] = []
        self.unlabelled: list[str] = []  # sequences without semseg annotations: not used (as the released code)
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            folder = Path(entry.path)
            if not (folder / "lidar").is_dir():
                continue  # not a sequence folder
            if not (folder / "annotations" / "semseg").is_dir():
                self.unlabelled.append(entry.name)
                continue
            try:
                latitude = _latitude(folder / "meta" / "gps.json")
            except DatasetError as err:  # the split of this sequence is unknown: never silently dropped
                self.index_problem(err)
                continue
            if (latitude > TRAIN_LATITUDE) != (split == "train"):
                continue
            frames = tuple(
                sorted(e.name[: -len(".pkl.gz")] for e in os.scandir(folder / "lidar") if e.name.endswith(".pkl.gz"))
            )
            self._sequences[entry.name] = _Sequence(entry.name, frames)
            self._ids.extend(f"{entry.name}/{f}" for f in frames)
        if self.unlabelled:
            log.info(
                "%s: %d PandaSet sequence(s) without annotations/semseg left out, as the released code (%s)",
                self.root,
                len(self.unlabelled),
                ", ".join(self.unlabelled[:8]),
            )
        if not self._ids and not self.problems:
            raise DatasetError(
                self.root,
                f"no PandaSet sequence of the {split} split (sequence folders with lidar/, annotations/semseg/ "
                "and meta/gps.json)",
            )

    @property
    def scan_ids(self) -> list[str]:
        return self._ids

    def load(self, index: int) -> Scan:
        seq_name, frame = self._ids[index].split("/")
        folder = self.root / seq_name
        number = int(frame)
        lidar_path = folder / "lidar" / f"{frame}.pkl.gz"
        table = read_table(lidar_path, ("x", "y", "z", "i", "d"))
        mine = table["d"] == self.sensor
        world = np.stack([table[c][mine] for c in ("x", "y", "z")], axis=1).astype(np.float64)
        poses_path = folder / "lidar" / "poses.json"
        lidar_to_world = _frame_pose(poses_path, _poses(poses_path), number, f"lidar pose {frame}")
        # points in the scan frame: the lidar-pose frame shifted by EGO_Z_SHIFT, in float64 and in the
        # released code's operations (the inverse pose by np.linalg.inv)
        scan_to_world = lidar_to_world @ rigid(np.eye(3), (0.0, 0.0, -EGO_Z_SHIFT))
        world_to_lidar = np.linalg.inv(lidar_to_world)
        xyz = world @ world_to_lidar[:3, :3].T
        xyz += world_to_lidar[:3, [3]].T
        xyz[:, 2] += EGO_Z_SHIFT
        points = np.concatenate([xyz, table["i"][mine][:, None].astype(np.float64)], axis=1)
        raw_labels = labels = None
        label_path = folder / "annotations" / "semseg" / f"{frame}.pkl.gz"
        if (folder / "annotations" / "semseg").is_dir():
            semseg = read_table(label_path, ("class",))
            if len(semseg["class"]) != len(table["d"]):
                raise DatasetError(label_path, f"{len(semseg['class'])} labels for {len(table['d'])} points")
            raw_labels = semseg["class"][mine].astype(np.int64)
            labels = self.meta.map_labels(raw_labels, label_path)
        cameras = []
        for name in self.meta.camera_names:
            cam_dir = folder / "camera" / name
            camera_to_world = _frame_pose(
                cam_dir / "poses.json", _poses(cam_dir / "poses.json"), number, f"{name} pose {frame}"
            )
            intr = Record(cam_dir / "intrinsics.json", "intrinsics", read_json(cam_dir / "intrinsics.json"))
            fx, fy, cx, cy = (intr.number(k) for k in ("fx", "fy", "cx", "cy"))
            k = check_intrinsics(
                np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), cam_dir / "intrinsics.json", "intrinsics"
            )
            image_path = cam_dir / f"{frame}.jpg"
            cameras.append(
                Camera(name, image_path, image_size(image_path), k, invert_rigid(camera_to_world) @ scan_to_world)
            )
        calibration = [
            folder / "camera" / n / f for n in self.meta.camera_names for f in ("poses.json", "intrinsics.json")
        ]
        semseg = (label_path,) if raw_labels is not None else ()
        sources = (lidar_path, *semseg, poses_path, *calibration, folder / "meta" / "gps.json")
        return Scan(self._ids[index], points, tuple(cameras), raw_labels, labels, sources=sources)


def _latitude(path: Path) -> float:
    if not path.is_file():
        raise DatasetError(path, "missing: the sequence's split (by latitude) cannot be decided")
    fixes = records(path, read_json(path), "GPS fix")
    if not fixes:
        raise DatasetError(path, "no GPS fix: the sequence's split (by latitude) cannot be decided")
    return fixes[0].number("lat")


class Pandar64(_PandaSet):
    meta = _meta("pandar64", ALL_CAMERAS, 18.23640649, 25.86983417)
    sensor = 0


class PandarGT(_PandaSet):
    meta = _meta("pandargt", ("front_camera",), 23.06113565, 16.76273235)
    sensor = 1
