"""nuScenes (lidarseg) read natively from its JSON tables and binary files; no devkit needed.

Layout under ROOT:
    v1.0-trainval/ (or v1.0-mini/, v1.0-test/)  scene, sample, sample_data, calibrated_sensor,
                                                ego_pose, sensor, category, lidarseg .json
    samples/LIDAR_TOP/*.pcd.bin                 float32 x 5: x, y, z, intensity, ring index
    samples/CAM_*/*.jpg                         the 6 camera keyframes
    lidarseg/<version>/<token>_lidarseg.bin     uint8 per point: the category's `index`
Scan id: the LIDAR_TOP keyframe's sample_data token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets.base import LidarDataset, read_labels, read_point_records
from pipeline.datasets.records import Record, read_json, records
from pipeline.errors import DatasetError
from pipeline.geometry import check_intrinsics, check_rigid, devkit_rotation, invert_rigid, pose_matrix
from pipeline.scan import IGNORE_INDEX, Camera, DatasetMeta, Scan, VisibilityRule

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT")
LIDAR = "LIDAR_TOP"

CLASSES = (
    "barrier",
    "bicycle",
    "bus",
    "car",
    "construction_vehicle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "trailer",
    "truck",
    "driveable_surface",
    "other_flat",
    "sidewalk",
    "terrain",
    "manmade",
    "vegetation",
)

# The 32 lidarseg categories by their `index` in category.json, and the benchmark class of each
# (None = ignored), as in the nuScenes lidarseg challenge.
RAW_CATEGORIES: tuple[tuple[str, str | None], ...] = (
    ("noise", None),
    ("animal", None),
    ("human.pedestrian.adult", "pedestrian"),
    ("human.pedestrian.child", "pedestrian"),
    ("human.pedestrian.construction_worker", "pedestrian"),
    ("human.pedestrian.personal_mobility", None),
    ("human.pedestrian.police_officer", "pedestrian"),
    ("human.pedestrian.stroller", None),
    ("human.pedestrian.wheelchair", None),
    ("movable_object.barrier", "barrier"),
    ("movable_object.debris", None),
    ("movable_object.pushable_pullable", None),
    ("movable_object.trafficcone", "traffic_cone"),
    ("static_object.bicycle_rack", None),
    ("vehicle.bicycle", "bicycle"),
    ("vehicle.bus.bendy", "bus"),
    ("vehicle.bus.rigid", "bus"),
    ("vehicle.car", "car"),
    ("vehicle.construction", "construction_vehicle"),
    ("vehicle.emergency.ambulance", None),
    ("vehicle.emergency.police", None),
    ("vehicle.motorcycle", "motorcycle"),
    ("vehicle.trailer", "trailer"),
    ("vehicle.truck", "truck"),
    ("flat.driveable_surface", "driveable_surface"),
    ("flat.other", "other_flat"),
    ("flat.sidewalk", "sidewalk"),
    ("flat.terrain", "terrain"),
    ("static.manmade", "manmade"),
    ("static.other", None),
    ("static.vegetation", "vegetation"),
    ("vehicle.ego", None),
)

# Official scene split (nuScenes devkit): the 150 validation scenes of v1.0-trainval, as number
# ranges; the 700 others of v1.0-trainval are the training scenes.
VAL_SCENE_RANGES = (
    "3 12-18 35-36 38-39 92-110 221 268-278 329-332 344-346 519-524 552-565 625-627 629-630 632-638 "
    "770-771 775 777-778 780-784 794-800 802 904-917 919-931 962-963 966-969 971-972 1059-1073"
)
MINI_TRAIN = (
    "scene-0061",
    "scene-0553",
    "scene-0655",
    "scene-0757",
    "scene-0796",
    "scene-1077",
    "scene-1094",
    "scene-1100",
)
MINI_VAL = ("scene-0103", "scene-0916")

SPLIT_VERSION = {
    "train": "v1.0-trainval",
    "val": "v1.0-trainval",
    "paper_mini_train": "v1.0-trainval",
    "paper_mini_val": "v1.0-trainval",
    "mini_train": "v1.0-mini",
    "mini_val": "v1.0-mini",
    "test": "v1.0-test",
}

META = DatasetMeta(
    name="nuscenes",
    class_names=CLASSES,
    raw_names={i: name for i, (name, _) in enumerate(RAW_CATEGORIES)},
    learning_map={i: (CLASSES.index(c) if c else IGNORE_INDEX) for i, (_, c) in enumerate(RAW_CATEGORIES)},
    splits=tuple(SPLIT_VERSION),
    camera_names=CAMERAS,
    # The released ScaLR code (datasets/nuscenes_for_scalr.py): depth > 1 m, 0 < u < W-1.
    visibility=VisibilityRule(
        name="released ScaLR: depth > 1.0 m, 0 < u < W-1, 0 < v < H-1", min_depth=1.0, far_margin=1.0
    ),
    intensity_max=255.0,
    intensity_mean=18.742355,
    intensity_std=22.04632,
    # datasets/im_pc_dataset.py + nuscenes_for_scalr.py: the devkit's LidarPointCloud (float32)
    # rotated and translated lidar -> ego -> global -> ego -> camera, each step stored as float32.
    projection_steps="nuScenes devkit chain lidar -> ego -> global -> ego -> camera on float32 points, each step "
    "rounded to float32; pixels in float64",
)


def val_scene_names() -> set[str]:
    names = set()
    for part in VAL_SCENE_RANGES.split():
        lo, _, hi = part.partition("-")
        names.update(f"scene-{n:04d}" for n in range(int(lo), int(hi or lo) + 1))
    return names


def paper_mini_split(train_scenes: list[str]) -> tuple[list[str], list[str]]:
    """The 600/100 mini-train/mini-val split of the 700 training scenes used in the paper.

    Defined here deterministically: training scenes ordered by the SHA-256 of their name; the
    first 600 are mini-train, the last 100 mini-val. Independent of file order and machine.
    """
    ordered = sorted(train_scenes, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return sorted(ordered[:600]), sorted(ordered[600:700])


def split_scenes(split: str, version_scenes: list[str]) -> set[str]:
    if split in ("mini_train", "mini_val"):
        return set(MINI_TRAIN if split == "mini_train" else MINI_VAL)
    if split == "test":
        return set(version_scenes)
    val = val_scene_names()
    if split == "val":
        return val
    train = sorted(s for s in version_scenes if s not in val)
    if split == "train":
        return set(train)
    mini_train, mini_val = paper_mini_split(train)
    return set(mini_train if split == "paper_mini_train" else mini_val)


@dataclass(frozen=True)
class _CameraRecord:
    name: str
    filename: str
    size: tuple[int, int]
    intrinsics: np.ndarray
    global_to_camera: np.ndarray  # camera-timestamp ego pose and camera extrinsics, inverted
    steps: tuple = ()  # global -> camera as the released code's devkit calls take it (pipeline.geometry)


@dataclass(frozen=True)
class _ScanRecord:
    token: str
    filename: str
    lidarseg: str | None
    lidar_to_global: np.ndarray
    cameras: tuple[_CameraRecord, ...]
    steps: tuple = ()  # lidar -> global, the same way


def devkit_steps(record: Record, inverse: bool = False) -> tuple:
    """One calibrated_sensor or ego_pose record as the released code applies it with the devkit's
    LidarPointCloud: rotate then translate; its inverse translates by -t then rotates by R^T."""
    rotation = devkit_rotation(record.array("rotation", (4,)))
    translation = record.array("translation", (3,))
    if inverse:
        return (("translate", -translation), ("rotate", rotation.T))
    return (("rotate", rotation), ("translate", translation))


class NuScenes(LidarDataset):
    """nuScenes keyframes of one split; labels from lidarseg when its table is present."""

    meta = META

    def __init__(self, root: str | Path, split: str = "train", keep_going: bool = False):
        super().__init__(root, split, keep_going)
        self.version = SPLIT_VERSION[split]
        tables_dir = self.root / self.version
        if not tables_dir.is_dir():
            raise DatasetError(tables_dir, f"nuScenes table folder for split {split!r} is missing")
        self._records = self._index(tables_dir)
        self.index_files = tuple(sorted(tables_dir.glob("*.json")))  # every scan is read through them
        if not self._records:
            raise DatasetError(tables_dir / "scene.json", f"no keyframes of split {split!r}")
        self._ids = [r.token for r in self._records]

    @property
    def scan_ids(self) -> list[str]:
        return self._ids

    def scan_aliases(self) -> dict[str, str]:
        """The lidar file of each keyframe (samples/LIDAR_TOP/*.pcd.bin, as the released frame lists name it)."""
        return {Path(r.filename).name: r.token for r in self._records}

    def _index(self, tables_dir: Path) -> list[_ScanRecord]:
        """Every table is a list of records and every field is read through a checker. A table
        that cannot be parsed stops the index; a bad record breaks only the scans that use it."""

        def table(name: str, required: bool = True) -> list[Record] | None:
            path = tables_dir / f"{name}.json"
            if not path.is_file() and not required:
                return None
            return records(path, read_json(path, "nuScenes table"), name)

        def by_token(rows: list[Record]) -> dict[str, Record]:
            return {r.str("token"): r for r in rows}

        def lookup(rows: dict[str, Record], token: str, name: str, referrer: str) -> Record:
            if token not in rows:
                raise DatasetError(tables_dir / f"{name}.json", f"token {token} (used by {referrer}) is missing")
            return rows[token]

        scenes = table("scene")
        samples = table("sample")
        sample_data = table("sample_data")
        calibrated = by_token(table("calibrated_sensor"))
        poses = by_token(table("ego_pose"))
        channels = {r.str("token"): r for r in table("sensor")}
        self._check_categories(table("category", required=False))
        lidarseg = {r.str("sample_data_token"): r.str("filename") for r in table("lidarseg", required=False) or []}

        scene_name = {s.str("token"): s.str("name") for s in scenes}
        wanted = split_scenes(self.split, list(scene_name.values()))
        scene_tokens = {t for t, name in scene_name.items() if name in wanted}

        keyframes: dict[str, dict[str, Record]] = {}
        for sd in sample_data:
            try:
                if not sd.bool("is_key_frame", False):
                    continue
                cs = lookup(
                    calibrated, sd.str("calibrated_sensor_token"), "calibrated_sensor", f"sample_data {sd.str('token')}"
                )
                channel = lookup(
                    channels, cs.str("sensor_token"), "sensor", f"calibrated_sensor {cs.str('token')}"
                ).str("channel")
                if channel == LIDAR or channel in CAMERAS:
                    keyframes.setdefault(sd.str("sample_token"), {})[channel] = sd
            except DatasetError as err:  # its scan then lacks this keyframe and says so below
                self.index_problem(err)

        def transform(record: Record) -> np.ndarray:
            with np.errstate(all="ignore"):  # a zero quaternion becomes NaN, reported below
                t = pose_matrix(record.array("rotation", (4,)), record.array("translation", (3,)))
            return check_rigid(t, record.path, f"{record.path.stem} {record.str('token')}")

        chosen = [s for s in samples if s.str("scene_token") in scene_tokens]
        chosen.sort(key=lambda s: (scene_name[s.str("scene_token")], s.int("timestamp")))
        out = []
        for sample in chosen:
            frames = keyframes.get(sample.str("token"), {})
            try:
                out.append(
                    self._scan_record(tables_dir, sample, frames, calibrated, poses, lidarseg, lookup, transform)
                )
            except DatasetError as err:  # this scan cannot be read; the others still can
                token = frames[LIDAR].str("token") if LIDAR in frames else f"sample {sample.str('token')}"
                self.index_problem(err, [token])
                out.append(_ScanRecord(token, "", None, np.eye(4), ()))
        return out

    def _scan_record(self, tables_dir, sample, frames, calibrated, poses, lidarseg, lookup, transform) -> _ScanRecord:
        missing = [c for c in (LIDAR, *CAMERAS) if c not in frames]
        if missing:
            raise DatasetError(
                tables_dir / "sample_data.json", f"sample {sample.str('token')} has no keyframe for {missing}"
            )
        lidar = frames[LIDAR]
        lidar_cs = lookup(
            calibrated, lidar.str("calibrated_sensor_token"), "calibrated_sensor", f"sample_data {lidar.str('token')}"
        )
        lidar_pose = lookup(poses, lidar.str("ego_pose_token"), "ego_pose", f"sample_data {lidar.str('token')}")
        lidar_to_global = transform(lidar_pose) @ transform(lidar_cs)
        cameras = []
        for name in CAMERAS:
            sd = frames[name]
            cs = lookup(
                calibrated, sd.str("calibrated_sensor_token"), "calibrated_sensor", f"sample_data {sd.str('token')}"
            )
            pose = lookup(poses, sd.str("ego_pose_token"), "ego_pose", f"sample_data {sd.str('token')}")
            k = check_intrinsics(
                cs.array("camera_intrinsic", (3, 3)), cs.path, f"camera_intrinsic of {cs.str('token')}"
            )
            global_to_camera = invert_rigid(transform(pose) @ transform(cs))
            size = (sd.int("height"), sd.int("width"))
            if min(size) <= 0:
                raise DatasetError(
                    sd.path, f"sample_data {sd.str('token')}: image size {size[1]}x{size[0]} is not positive"
                )
            steps = devkit_steps(pose, inverse=True) + devkit_steps(cs, inverse=True)
            cameras.append(_CameraRecord(name, sd.str("filename"), size, k, global_to_camera, steps))
        return _ScanRecord(
            lidar.str("token"),
            lidar.str("filename"),
            lidarseg.get(lidar.str("token")),
            lidar_to_global,
            tuple(cameras),
            devkit_steps(lidar_cs) + devkit_steps(lidar_pose),
        )

    def _check_categories(self, categories: list[Record] | None) -> None:
        for cat in categories or []:
            if "index" not in cat.value:
                continue  # pre-lidarseg table: labels cannot be read anyway
            index, name = cat.int("index"), cat.str("name")
            if self.meta.raw_names.get(index) != name:
                raise DatasetError(
                    cat.path, f"category index {index} is {name!r}, expected {self.meta.raw_names.get(index)!r}"
                )

    def load(self, index: int) -> Scan:
        rec = self._records[index]
        path = self.root / rec.filename
        raw = read_point_records(path, fields=5, keep=5)
        points = raw[:, :4]
        raw_labels = labels = None
        if rec.lidarseg is not None:
            label_path = self.root / rec.lidarseg
            raw_labels = read_labels(label_path, np.uint8, count=len(points))
            labels = self.meta.map_labels(raw_labels, label_path)
        cameras = tuple(
            Camera(
                name=c.name,
                image_path=self.root / c.filename,
                image_size=c.size,
                intrinsics=c.intrinsics,
                lidar_to_camera=c.global_to_camera @ rec.lidar_to_global,
                steps=rec.steps + c.steps,
            )
            for c in rec.cameras
        )
        sources = (path,) + ((self.root / rec.lidarseg,) if rec.lidarseg is not None else ())
        ring = raw[:, 4].astype(np.int16)
        return Scan(rec.token, points, cameras, raw_labels, labels, extras={"ring": ring}, sources=sources)
