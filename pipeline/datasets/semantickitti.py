"""SemanticKITTI read natively from its folders.

Layout under ROOT:
    sequences/SS/velodyne/FFFFFF.bin    float32 x 4: x, y, z, reflectance (0..1)
    sequences/SS/labels/FFFFFF.label    uint32: semantic label in the low 16 bits, instance above
    sequences/SS/image_2/FFFFFF.png     left colour camera
    sequences/SS/calib.txt              P0..P3 (3x4) and Tr (velodyne -> camera 0, 3x4)
    sequences/SS/poses.txt, times.txt   not needed for distillation; not read
Scan id: "SS/FFFFFF" (sequence / frame, as in the file names).
Projection (as the released ScaLR code): keep lidar x > 1 m, pixel = P2 @ Tr @ [x y z 1] without
R0_rect, keep pixels inside the image.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets.base import LidarDataset, image_size, read_labels, read_point_records
from pipeline.datasets.records import read_text
from pipeline.errors import DatasetError
from pipeline.geometry import check_intrinsics, check_rigid, rigid
from pipeline.scan import IGNORE_INDEX, Camera, DatasetMeta, Scan, VisibilityRule

log = logging.getLogger(__name__)

CLASSES = (
    "car",
    "bicycle",
    "motorcycle",
    "truck",
    "other-vehicle",
    "person",
    "bicyclist",
    "motorcyclist",
    "road",
    "parking",
    "sidewalk",
    "other-ground",
    "building",
    "fence",
    "vegetation",
    "trunk",
    "terrain",
    "pole",
    "traffic-sign",
)

# Raw id -> (name, benchmark class or None): the standard semantic-kitti.yaml learning map
# (moving objects fold into their static class; unlabeled/outlier/other-* are ignored).
RAW_LABELS: dict[int, tuple[str, str | None]] = {
    0: ("unlabeled", None),
    1: ("outlier", None),
    10: ("car", "car"),
    11: ("bicycle", "bicycle"),
    13: ("bus", "other-vehicle"),
    15: ("motorcycle", "motorcycle"),
    16: ("on-rails", "other-vehicle"),
    18: ("truck", "truck"),
    20: ("other-vehicle", "other-vehicle"),
    30: ("person", "person"),
    31: ("bicyclist", "bicyclist"),
    32: ("motorcyclist", "motorcyclist"),
    40: ("road", "road"),
    44: ("parking", "parking"),
    48: ("sidewalk", "sidewalk"),
    49: ("other-ground", "other-ground"),
    50: ("building", "building"),
    51: ("fence", "fence"),
    52: ("other-structure", None),
    60: ("lane-marking", "road"),
    70: ("vegetation", "vegetation"),
    71: ("trunk", "trunk"),
    72: ("terrain", "terrain"),
    80: ("pole", "pole"),
    81: ("traffic-sign", "traffic-sign"),
    99: ("other-object", None),
    252: ("moving-car", "car"),
    253: ("moving-bicyclist", "bicyclist"),
    254: ("moving-person", "person"),
    255: ("moving-motorcyclist", "motorcyclist"),
    256: ("moving-on-rails", "other-vehicle"),
    257: ("moving-bus", "other-vehicle"),
    258: ("moving-truck", "truck"),
    259: ("moving-other-vehicle", "other-vehicle"),
}

SPLITS = {
    "train": ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10"),
    "val": ("08",),
    "test": tuple(f"{s:02d}" for s in range(11, 22)),
}
CAMERA = "image_2"

META = DatasetMeta(
    name="semantickitti",
    class_names=CLASSES,
    raw_names={k: name for k, (name, _) in RAW_LABELS.items()},
    learning_map={k: (CLASSES.index(c) if c else IGNORE_INDEX) for k, (_, c) in RAW_LABELS.items()},
    splits=tuple(SPLITS),
    camera_names=(CAMERA,),
    # The released ScaLR code (datasets/semantic_kitti_for_scalr.py): no depth test.
    visibility=VisibilityRule(
        name="released ScaLR: lidar x > 1.0 m, P2 @ Tr, 0 < u < W-1, 0 < v < H-1",
        min_depth=None,
        min_lidar_x=1.0,
        far_margin=1.0,
    ),
    intensity_max=1.0,
    intensity_mean=0.28613698,
    intensity_std=0.14090556,
)


def read_calib(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K, lidar_to_camera) of image_2 from a calib.txt, such that pixel ~ K @ lidar_to_camera @ p."""
    lines = read_text(path, "calibration file").splitlines()
    entries = {}
    for line in lines:
        key, sep, values = line.partition(":")
        if not sep:
            continue
        try:
            entries[key.strip()] = np.array([float(v) for v in values.split()])
        except ValueError:
            raise DatasetError(path, f"entry {key.strip()} has a value that is not a number") from None
    for key in ("P2", "Tr"):
        if key not in entries:
            raise DatasetError(path, f"no {key} entry")
        if entries[key].size != 12:
            raise DatasetError(path, f"{key} has {entries[key].size} values, expected 12")
    p2 = entries["P2"].reshape(3, 4)
    tr = np.vstack([entries["Tr"].reshape(3, 4), [0, 0, 0, 1]])
    k = check_intrinsics(p2[:, :3], path, "P2[:, :3]")
    check_rigid(tr, path, "Tr")
    # P2 = K @ [I | K^-1 p4]: a translation of camera 0 into camera 2, then K.
    cam0_to_cam2 = rigid(np.eye(3), np.linalg.solve(k, p2[:, 3]))
    return k, cam0_to_cam2 @ tr


def _image_sizes(folder: Path, frames: list[str]) -> Counter:
    """How many of a sequence's images have each (H, W) (headers only; unreadable images are
    reported when their scan is read). The calibration is per sequence: the sequence's size is its
    images' majority, and an image of another size is the odd one."""
    sizes = Counter()
    for frame in frames:
        with contextlib.suppress(DatasetError):
            sizes[image_size(folder / f"{frame}.png")] += 1
    return sizes


@dataclass(frozen=True)
class _Sequence:
    name: str
    intrinsics: np.ndarray | None
    lidar_to_camera: np.ndarray | None
    has_labels: bool
    image_sizes: Counter | None = None  # (H, W) -> images of that size; the majority is the calibration's

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self.image_sizes.most_common(1)[0][0] if self.image_sizes else None

    def sizes_found(self) -> str:
        return ", ".join(f"{w}x{h} ({n} images)" for (h, w), n in self.image_sizes.most_common())


class SemanticKITTI(LidarDataset):
    """Also the base of SemanticKITTI-like layouts (SemanticPOSS): subclasses set `meta`,
    `sequences` and whether there is a calibrated camera."""

    meta = META
    sequences = SPLITS
    camera = CAMERA

    def __init__(self, root: str | Path, split: str = "train", keep_going: bool = False):
        super().__init__(root, split, keep_going)
        self._sequences: dict[str, _Sequence] = {}
        self._ids: list[str] = []
        missing = []
        for seq in self.sequences[split]:
            folder = self.root / "sequences" / seq
            if not (folder / "velodyne").is_dir():
                missing.append(seq)
                continue
            frames = sorted(e.name[:-4] for e in os.scandir(folder / "velodyne") if e.name.endswith(".bin"))
            ids = [f"{seq}/{f}" for f in frames]
            self._ids.extend(ids)
            k = lidar_to_camera = size = None
            if self.camera:
                try:
                    k, lidar_to_camera = read_calib(folder / "calib.txt")
                except DatasetError as err:  # every scan of the sequence is unreadable, not the others
                    self.index_problem(err, ids)
                size = _image_sizes(folder / self.camera, frames)
            self._sequences[seq] = _Sequence(seq, k, lidar_to_camera, (folder / "labels").is_dir(), size)
        if not self._sequences:
            raise DatasetError(
                self.root / "sequences", f"none of the {split} sequences {self.sequences[split]} has a velodyne/ folder"
            )
        if missing:
            log.debug("%s: %s split: sequences %s are absent and skipped", self.root, split, ", ".join(missing))
        self.missing_sequences = tuple(missing)

    @property
    def scan_ids(self) -> list[str]:
        return self._ids

    def load(self, index: int) -> Scan:
        scan_id = self._ids[index]
        seq_name, frame = scan_id.split("/")
        seq = self._sequences[seq_name]
        folder = self.root / "sequences" / seq_name
        points = read_point_records(folder / "velodyne" / f"{frame}.bin", fields=4)
        raw_labels = labels = None
        if seq.has_labels:
            label_path = folder / "labels" / f"{frame}.label"
            raw_labels = read_labels(label_path, np.uint32, count=len(points), mask=0xFFFF)
            labels = self.meta.map_labels(raw_labels, label_path)
        sources = (folder / "velodyne" / f"{frame}.bin",) + ((label_path,) if seq.has_labels else ())
        if not self.camera:
            return Scan(scan_id, points, (), raw_labels, labels, sources=sources)
        image_path = folder / self.camera / f"{frame}.png"
        size = image_size(image_path)
        if seq.image_size is not None and size != seq.image_size:  # one calibration per sequence
            raise DatasetError(
                image_path,
                f"image is {size[1]}x{size[0]} but sequence {seq_name}'s images (and its calibration) are "
                f"{seq.image_size[1]}x{seq.image_size[0]} (sizes found: {seq.sizes_found()})",
            )
        camera = Camera(self.camera, image_path, size, seq.intrinsics, seq.lidar_to_camera)
        return Scan(scan_id, points, (camera,), raw_labels, labels, sources=(*sources, folder / "calib.txt"))
