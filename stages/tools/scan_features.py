"""One scan's features, wherever they come from, for the pictures (`inspect --plot`,
`plot-features`) and the live viewer (`scalr view`).

A `ScanFeatures` holds a scan's points, one feature per point, the raw point index of each row,
the labels when the dataset still has them, and for each camera the rows it sees with their
pixels on its image. Two sources fill it:

- `StoreScans`: a feature store (teacher targets, or a student's `scalr embed` store). A scan's
  rows are its entries, camera after camera (a point seen by two cameras appears twice, with each
  camera's target). Only that scan's chunks are read: a store of any size opens in the time it
  takes to read its manifests. Images and labels come from the raw dataset when it is still where
  the store says it was extracted from; without it, bird's-eye views only (`note` says why).
- `StudentScans`: a student checkpoint run on the raw scan (its evaluation inputs: voxels keeping
  each voxel's first point, eval mode), every camera projected with the dataset's calibration.

Each source fits one PCA basis (`pca()`), once: colours mean the same for every scan it shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.datasets import open_dataset
from pipeline.datasets.base import load_image
from pipeline.errors import NotFoundError, ScalrError
from stages.extract.images import load_resized
from stages.student.checkpoints import build_backbone, read_checkpoint_for
from stages.student.infer import run_on_scan, trained_sample_config
from stages.tools.colours import PcaBasis, to_uint8
from storage.feature_store import FeatureStore
from storage.runs import RunFolder

PCA_ENTRIES = 16  # a store's PCA basis: entries spread evenly over the store ...
PCA_ROWS_PER_ENTRY = 2048  # ... and at most this many rows of each


@dataclass
class CameraView:
    name: str
    rows: np.ndarray  # rows of the scan's arrays seen by this camera
    pixels: np.ndarray  # (len(rows), 2) column, row in `image`
    image: np.ndarray | None  # (H, W, 3) uint8, the image the pixels refer to; None when unavailable


@dataclass
class ScanFeatures:
    scan_id: str
    source: str  # what made the features, for titles ("teacher dinov2-vits14 (random init)")
    xyz: np.ndarray  # (N, 3)
    features: np.ndarray  # (N, D)
    point_index: np.ndarray  # (N,) index of each row's point in the raw scan
    labels: np.ndarray | None = None  # (N,) class indices, when the dataset has them
    class_names: tuple[str, ...] = ()
    cameras: list[CameraView] = field(default_factory=list)
    note: str = ""  # what is missing and why (no image, no labels)

    def row_of_point(self, point: int) -> int:
        """The first row holding raw point `point` (NotFoundError naming the scan if none does)."""
        rows = np.flatnonzero(self.point_index == point)
        if not len(rows):
            raise NotFoundError(
                f"point {point} of scan {self.scan_id} is not among the {len(self.xyz):,} points shown "
                f"({self.source}: only visible or kept points have features)"
            )
        return int(rows[0])

    def class_of(self, row: int) -> str | None:
        if self.labels is None:
            return None
        label = int(self.labels[row])
        return self.class_names[label] if 0 <= label < len(self.class_names) else "ignored"

    def camera_of(self, row: int) -> CameraView | None:
        return next((c for c in self.cameras if np.any(c.rows == row)), None)

    def only(self, camera: str) -> ScanFeatures:
        """The same scan restricted to the rows one camera sees."""
        view = next((c for c in self.cameras if c.name == camera), None)
        if view is None:
            raise NotFoundError(
                f"scan {self.scan_id} has no camera {camera!r} ({self.source}); cameras: "
                f"{', '.join(c.name for c in self.cameras)}"
            )
        rows = view.rows
        return ScanFeatures(
            self.scan_id,
            self.source,
            self.xyz[rows],
            self.features[rows],
            self.point_index[rows],
            None if self.labels is None else self.labels[rows],
            self.class_names,
            [CameraView(view.name, np.arange(len(rows)), view.pixels, view.image)],
            self.note,
        )

    def describe(self, row: int) -> str:
        """`point 1234 (car) at (3.1, -2.0, 0.4) m, CAM_FRONT`: for titles and the viewer."""
        what = self.class_of(row)
        camera = self.camera_of(row)
        x, y, z = self.xyz[row]
        return f"point {int(self.point_index[row])}{f' ({what})' if what else ''} at ({x:.1f}, {y:.1f}, {z:.1f}) m" + (
            f", {camera.name}" if camera and len(self.cameras) > 1 else ""
        )


def pick_query(scan: ScanFeatures, point: int | None = None, class_name: str | None = None) -> int:
    """The row of the query point: raw point `point`; else the point of class `class_name`
    (default "car", when present) nearest that class's centroid; else the point nearest the sensor."""
    if point is not None:
        return scan.row_of_point(point)
    if scan.labels is not None:
        if class_name is not None and class_name not in scan.class_names:
            raise NotFoundError(f"unknown class {class_name!r}; classes: {', '.join(scan.class_names)}")
        wanted = class_name or "car"
        members = (
            np.flatnonzero(scan.labels == scan.class_names.index(wanted))
            if wanted in scan.class_names
            else np.zeros(0, int)
        )
        if len(members):
            centre = scan.xyz[members].mean(axis=0)
            return int(members[np.argmin(np.linalg.norm(scan.xyz[members] - centre, axis=1))])
    return int(np.argmin(np.linalg.norm(scan.xyz[:, :2], axis=1)))


class StoreScans:
    """Scans of a feature store (see the module docstring)."""

    def __init__(self, store: FeatureStore):
        self.store = store
        a = store.attrs
        t = a["teacher"]
        kind = t.get("kind", "teacher")
        self.source = f"{kind} {t['name']}{' (random init)' if t['random_init'] else ''}"
        self._dataset = None
        self._dataset_note: str | None = None
        self._pca: PcaBasis | None = None
        manifest = store.manifest().to_pylist()
        self._rows: dict[str, list[dict]] = {}
        for row in manifest:
            if row["status"] == "ok" and row["count"] > 0:
                self._rows.setdefault(row["scan_id"], []).append(row)
        self.scan_ids = list(self._rows)  # scans with at least one stored point, in store order

    def dataset(self):
        """The raw dataset the store was extracted from, or None (`dataset_note` says why)."""
        if self._dataset is None and self._dataset_note is None:
            a = self.store.attrs
            try:
                self._dataset = open_dataset(a["dataset"]["name"], a["dataset_root"], a["dataset"]["split"])
            except (ScalrError, OSError) as err:
                self._dataset_note = f"raw dataset not readable at {a['dataset_root']} ({err}): no images or labels"
        return self._dataset

    def load(self, scan_id: str) -> ScanFeatures:
        if scan_id not in self._rows:
            raise NotFoundError(f"{self.store.path}: no stored point for scan {scan_id!r}")
        parts = [
            (row, self.store.read(row["part"], row["offset"], row["count"], row["grid"])) for row in self._rows[scan_id]
        ]
        xyz = np.concatenate([d["points"][:, :3] for _, d in parts])
        features = np.concatenate([d["features"] for _, d in parts])
        point_index = np.concatenate([d["point_index"] for _, d in parts]).astype(np.int64)
        starts = np.cumsum([0] + [len(d["points"]) for _, d in parts])
        ds = self.dataset()
        raw = labels = None
        notes = [self._dataset_note] if self._dataset_note else []
        if ds is not None:
            try:
                raw = ds[ds.index_of(scan_id)]
                labels = raw.labels[point_index] if raw.labels is not None else None
            except (ScalrError, OSError) as err:
                notes.append(f"raw scan {scan_id} unreadable ({err})")
        size = self.store.attrs["image_size"]
        cameras = []
        for (row, data), start in zip(parts, starts):
            image = None
            if raw is not None and size:  # a student store (`scalr embed`) has no image
                try:
                    cam = raw.camera(row["camera"])
                    image = to_uint8(load_resized(cam.image_path, cam.image_size, tuple(size)))
                except (ScalrError, OSError) as err:
                    notes.append(f"{row['camera']}: no image ({err})")
            cameras.append(
                CameraView(row["camera"], np.arange(start, start + len(data["points"])), data["pixel"], image)
            )
        class_names = ds.meta.class_names if labels is not None else ()
        return ScanFeatures(
            scan_id, self.source, xyz, features, point_index, labels, class_names, cameras, "; ".join(notes)
        )

    def pca(self) -> PcaBasis:
        """One basis for the whole store: fitted on up to PCA_ENTRIES entries spread evenly over
        it (PCA_ROWS_PER_ENTRY rows of each, evenly strided), so it is the same on every call."""
        if self._pca is None:
            entries = [row for rows in self._rows.values() for row in rows]
            if not entries:
                raise NotFoundError(f"{self.store.path}: no stored point to fit colours on")
            chosen = [
                entries[i]
                for i in np.unique(np.linspace(0, len(entries) - 1, min(PCA_ENTRIES, len(entries))).astype(int))
            ]
            samples = []
            for row in chosen:
                f = self.store.read(row["part"], row["offset"], row["count"], row["grid"])["features"]
                samples.append(f[:: max(1, len(f) // PCA_ROWS_PER_ENTRY)])
            self._pca = PcaBasis.fit(np.concatenate(samples))
        return self._pca


class StudentScans:
    """A student checkpoint's backbone features on the scans of a raw dataset split."""

    def __init__(self, checkpoint: Path, dataset: str, root: Path, split: str, recipe: str | None = None):
        self.checkpoint = Path(checkpoint)
        state = read_checkpoint_for(self.checkpoint, recipe, "this evaluation")
        self.record = state["config"]
        self.ds = open_dataset(dataset, root, split)
        self.sample = trained_sample_config(self.record, self.ds.meta)
        self.backbone = build_backbone(self.checkpoint, state, self.sample.grid.shape).eval()
        self.run_name = RunFolder.of_checkpoint(self.checkpoint).name or self.checkpoint.stem
        self.source = f"student {self.record.get('stage', '')} {self.run_name}".replace("  ", " ")
        self.scan_ids = self.ds.scan_ids
        self._pca: PcaBasis | None = None
        self._last: ScanFeatures | None = None  # the PCA fit and the first picture or view share a forward

    def load(self, scan_id: str) -> ScanFeatures:
        if self._last is None or self._last.scan_id != scan_id:
            self._last = self._run(scan_id)
        return self._last

    def _run(self, scan_id: str) -> ScanFeatures:
        scan = self.ds[self.ds.index_of(scan_id)]
        keep, features = run_on_scan(
            self.backbone, scan.points, self.ds.meta.intensity_norm, self.sample, torch.device("cpu")
        )
        if features is None:
            raise NotFoundError(f"scan {scan_id}: no point inside the student's field of view")
        features = features.numpy()
        row_of = np.full(scan.num_points, -1)
        row_of[keep] = np.arange(len(keep))
        cameras = []
        for cam in scan.cameras:
            proj = self.ds.project(scan, cam.name)
            rows = row_of[proj.point_index]
            seen = rows >= 0
            cameras.append(CameraView(cam.name, rows[seen], proj.uv[seen], load_image(cam.image_path)))
        labels = scan.labels[keep] if scan.labels is not None else None
        return ScanFeatures(
            scan_id,
            self.source,
            scan.points[keep, :3],
            features,
            keep.astype(np.int64),
            labels,
            self.ds.meta.class_names if labels is not None else (),
            cameras,
        )

    def pca(self) -> PcaBasis:
        """One basis for the checkpoint: fitted on the split's first scan, so colours mean the
        same on every scan shown."""
        if self._pca is None:
            self._pca = PcaBasis.fit(self.load(self.scan_ids[0]).features)
        return self._pca
