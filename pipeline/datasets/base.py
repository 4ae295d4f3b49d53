"""What every reader shares: the reader interface and the checked binary-file helpers."""

from __future__ import annotations

import abc
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DatasetError, NotFoundError
from pipeline.files import check_regular, read_regular
from pipeline.geometry import Projection, project
from pipeline.scan import DatasetMeta, Scan


class LidarDataset(abc.ABC):
    """A lazy, ordered list of scans of one split.

    Construction reads only the dataset's index (tables, file listings, calibration); points,
    labels and images are read by `__getitem__`. Instances hold plain Python/numpy data and no
    open files, so they pickle and are safe to use from DataLoader workers.
    """

    meta: DatasetMeta
    index_files: tuple[Path, ...] = ()  # files read to index the split (e.g. nuScenes' tables): inputs of every scan

    def __init__(self, root: str | Path, split: str, keep_going: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(self.root, f"{self.meta.name} root is not a directory")
        if split not in self.meta.splits:
            raise DatasetError(self.root, f"unknown split {split!r} for {self.meta.name}; one of {self.meta.splits}")
        self.split = split
        # Bad index files found while indexing. Each also makes its scans fail to load (`broken`)
        # or, where not even the scans can be listed, stands alone. Raised at once unless
        # `keep_going` (check-dataset lists them all and goes on).
        self.keep_going = keep_going
        self.problems: list[DatasetError] = []
        self.broken: dict[str, DatasetError] = {}  # scan id -> why it cannot be read

    def index_problem(self, error: DatasetError, scan_ids=()) -> None:
        """Record a bad index file; the scans it describes will raise it when loaded."""
        if not self.keep_going:
            raise error
        self.problems.append(error)
        for scan_id in scan_ids:
            self.broken[scan_id] = error

    @property
    @abc.abstractmethod
    def scan_ids(self) -> list[str]:
        """The dataset's own ids of the scans of this split, in a fixed order."""

    @abc.abstractmethod
    def load(self, index: int) -> Scan:
        """Read scan number `index` (points, labels if any, cameras)."""

    def __len__(self) -> int:
        return len(self.scan_ids)

    def __getitem__(self, index: int) -> Scan:
        if not 0 <= index < len(self):
            raise IndexError(f"scan index {index} out of range for {len(self)} scans")
        if self.broken and self.scan_ids[index] in self.broken:
            raise self.broken[self.scan_ids[index]]
        return self.load(index)

    def scan_aliases(self) -> dict[str, str]:
        """Other names of scans (e.g. a lidar file's name) -> scan id, for frame lists."""
        return {}

    def index_of(self, scan_id: str) -> int:
        try:
            return self.scan_ids.index(scan_id)
        except ValueError:
            raise NotFoundError(f"no scan {scan_id!r} in {self.meta.name} {self.split} at {self.root}") from None

    def project(self, scan: Scan, camera_name: str, float64: bool = False) -> Projection:
        """Visible points of `scan` in one camera, with this dataset's visibility rule, rounded as
        the released code rounds (or, with `float64`, in float64 throughout)."""
        return project(scan.points, scan.camera(camera_name), self.meta.visibility, float64)

    def fingerprint(self, scan: Scan) -> dict[str, list[int]]:
        """Size and modification time (ns) of every file a scan was read from, by its path under
        the root: a cheap record of the inputs, compared when an extraction resumes."""
        return file_stats([*self.index_files, *scan.input_files()], self.root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, scans={len(self)})"


def file_stats(paths, root: Path) -> dict[str, list[int]]:
    """{path under root: [size, mtime_ns]}; a missing file is [-1, -1]."""
    stats = {}
    for path in paths:
        key = str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else str(path)
        try:
            st = os.stat(path)
            stats[key] = [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            stats[key] = [-1, -1]
    return stats


def read_point_records(path: Path, fields: int, keep: int = 4) -> np.ndarray:
    """float32 records of `fields` values; the first `keep` columns, checked finite."""
    raw = _read_bytes(path)
    record = 4 * fields
    if not raw:
        raise DatasetError(path, "file is empty (0 bytes): a damaged file, not a scan without points")
    if len(raw) % record:
        raise DatasetError(
            path, f"size {len(raw)} bytes is not a multiple of the {record}-byte record (float32 x {fields})"
        )
    points = np.frombuffer(raw, dtype=np.float32).reshape(-1, fields)[:, :keep].copy()
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points)).any(axis=1).sum())
        raise DatasetError(path, f"{bad} of {len(points)} points have NaN or infinite values")
    return points


def read_labels(path: Path, dtype: np.dtype, count: int, mask: int | None = None) -> np.ndarray:
    """Per-point labels; their number must equal the number of points."""
    raw = _read_bytes(path)
    size = np.dtype(dtype).itemsize
    if len(raw) % size:
        raise DatasetError(path, f"size {len(raw)} bytes is not a multiple of {size} ({np.dtype(dtype).name} labels)")
    labels = np.frombuffer(raw, dtype=dtype).astype(np.int64)
    if len(labels) != count:
        raise DatasetError(path, f"{len(labels)} labels for {count} points")
    return labels & mask if mask is not None else labels


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) read from the image header only."""
    check_regular(path, DatasetError)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise DatasetError(path, "image file is missing") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(path, f"unreadable image ({err})") from None
    return h, w


def load_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; a missing, truncated or corrupt file is a DatasetError."""
    check_regular(path, DatasetError)
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(path, "image file is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(path, f"corrupt or unreadable image ({err})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return read_regular(path, DatasetError)
    except FileNotFoundError:
        raise DatasetError(path, "file is missing") from None
    except OSError as err:
        raise DatasetError(path, f"unreadable ({err.strerror})") from None
