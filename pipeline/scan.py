"""One data model for every dataset: a lidar scan with its labels and calibrated cameras.

Readers (pipeline/datasets) produce these; every later stage consumes only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import DatasetError, NotFoundError

IGNORE_INDEX = 255  # mapped label of points that no benchmark class covers


@dataclass(frozen=True)
class VisibilityRule:
    """Which projected points a dataset counts as visible in a camera.

    A point is kept when (if set) its depth along the camera axis exceeds `min_depth`, when (if
    set) its lidar-frame x exceeds `min_lidar_x`, and when its continuous pixel lies strictly
    inside the image less `far_margin` on the far sides: `0 < u < W - far_margin`,
    `0 < v < H - far_margin` (the released ScaLR code's rules).
    """

    name: str
    min_depth: float | None
    min_lidar_x: float | None = None
    far_margin: float = 0.0


@dataclass(frozen=True)
class Camera:
    """One camera image of a scan, with the calibration valid for that scan.

    `lidar_to_camera` maps lidar-frame xyz of THIS scan into the camera frame at the image's
    timestamp (for nuScenes it contains the ego motion between the two timestamps). The camera
    frame is x right, y down, z forward; pixels are `K @ (x, y, z) / z` (see pipeline.geometry).
    """

    name: str
    image_path: Path
    image_size: tuple[int, int]  # (height, width) of the original image, in pixels
    intrinsics: np.ndarray  # (3, 3) float64
    lidar_to_camera: np.ndarray  # (4, 4) float64, rigid
    # The released code's own steps from the lidar to this camera, where it rounds between them
    # (nuScenes: the devkit's chain on float32 points): ("rotate", (3, 3)) or ("translate", (3,)),
    # in order (pipeline.geometry.float32_steps). Empty: one float64 transform, lidar_to_camera.
    steps: tuple[tuple[str, np.ndarray], ...] = ()


@dataclass
class Scan:
    """A lidar scan: points in the lidar frame, optional labels, and its cameras."""

    scan_id: str
    # (N, 4) x, y, z, intensity (the dataset's own intensity units), in the number type the released
    # code reads and computes in: float32 (nuScenes, SemanticKITTI, SemanticPOSS binaries) or float64
    # (PandaSet's pickled tables); voxels, crops, cells and neighbours are cut in that type.
    points: np.ndarray
    cameras: tuple[Camera, ...]
    raw_labels: np.ndarray | None = None  # (N,) int64, the dataset's own label ids
    labels: np.ndarray | None = None  # (N,) uint8, benchmark class index or IGNORE_INDEX
    extras: dict = field(default_factory=dict)  # reader-specific facts (e.g. nuScenes ring index)
    sources: tuple[Path, ...] = ()  # the files it was read from, besides its camera images

    def input_files(self) -> tuple[Path, ...]:
        """Every file this scan was read from: its sources and its camera images."""
        return self.sources + tuple(c.image_path for c in self.cameras)

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    def camera(self, name: str) -> Camera:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        names = ", ".join(c.name for c in self.cameras)
        raise NotFoundError(f"scan {self.scan_id} has no camera {name!r} (it has: {names})")


@dataclass(frozen=True)
class DatasetMeta:
    """Facts of a dataset that do not depend on the files: classes, label map, splits, rule."""

    name: str
    class_names: tuple[str, ...]
    raw_names: dict[int, str]  # raw label id -> the dataset's own name
    learning_map: dict[int, int]  # raw label id -> class index or IGNORE_INDEX
    splits: tuple[str, ...]
    camera_names: tuple[str, ...]
    visibility: VisibilityRule
    intensity_max: float  # intensity range of the raw points is [0, intensity_max]
    # The student's intensity input is (i - mean) / std, with the released ScaLR code's statistics
    # of each dataset (datasets/*_for_scalr.py there).
    intensity_mean: float
    intensity_std: float
    # The student's field of view (lo, hi) in metres at evaluation, probing and finetuning, as
    # the released configs: +-64 m (+-8 m in z) except PandaSet, +-128 m (512 x 512 cells).
    field_of_view: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        (-64.0, -64.0, -8.0),
        (64.0, 64.0, 8.0),
    )
    # How the released code's projection rounds (the cameras' `steps`); None: one float64 transform.
    projection_steps: str | None = None
    points_dtype: str = "float32"  # the number type of the scans' points (Scan.points)

    @property
    def intensity_norm(self) -> tuple[float, float]:
        """(mean, std) standardising raw intensities for the student."""
        return (self.intensity_mean, self.intensity_std)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def map_labels(self, raw: np.ndarray, source: str | Path = "labels") -> np.ndarray:
        """Raw ids -> class indices; an id outside the learning map is an error, not a guess."""
        raw = np.asarray(raw, dtype=np.int64)
        known = np.array(sorted(self.learning_map), dtype=np.int64)
        if raw.size and not np.isin(raw, known).all():
            unknown = np.setdiff1d(np.unique(raw), known)[:10].tolist()
            raise DatasetError(source, f"label ids {unknown} are not in the {self.name} learning map")
        lut = np.full(int(known.max()) + 1, IGNORE_INDEX, dtype=np.uint8)
        for raw_id, cls in self.learning_map.items():
            lut[raw_id] = cls
        return lut[raw]
