"""check-dataset: read every scan of a split through its reader, validate it, and count.

Reports scans, points, visible points per camera and the label histogram; every bad file is
listed with its problem (the check goes on past it) and makes the check fail. Optionally draws
the points projected on the camera images (the classic calibration check).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.datasets import open_dataset
from pipeline.datasets.base import image_size, load_image
from pipeline.errors import DatasetError
from pipeline.scan import IGNORE_INDEX
from stages.tools.pictures import projection_figure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckConfig:
    dataset: str
    root: Path
    split: str
    max_scans: int | None = None  # check only the first N scans (all by default)
    plot_dir: Path | None = None  # where to draw projection overlays
    plot_scans: int = 1  # how many scans to draw (the first ones)
    decode_images: bool = False  # decode every image fully (slow) instead of reading headers


@dataclass
class CheckReport:
    dataset: str
    split: str
    scans: int = 0
    points: int = 0
    visible: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # camera -> per-scan counts
    labels: Counter = field(default_factory=Counter)  # class name -> points
    unlabelled_scans: int = 0
    empty_scans: list[str] = field(default_factory=list)  # scans with zero points (read fine, nothing to train on)
    errors: list[str] = field(default_factory=list)  # one line per bad file (the same file breaking many scans: once)
    absent: list[str] = field(default_factory=list)  # parts of the split not on disk (e.g. KITTI sequences)
    plots: list[Path] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set, repr=False)

    def lines(self) -> list[str]:
        out = [
            f"{self.dataset} {self.split}: {self.scans} scans, {self.points:,} points "
            f"({self.points / max(self.scans, 1):,.0f} per scan)"
        ]
        if self.absent:
            out.append(f"  absent from disk, skipped: {', '.join(self.absent)}")
        out.append(f"  {'camera':<18}{'visible points':>16}{'per scan':>12}{'min':>8}{'max':>8}")
        for cam, counts in self.visible.items():
            c = np.array(counts)
            out.append(f"  {cam:<18}{int(c.sum()):>16,}{c.mean():>12,.0f}{int(c.min()):>8,}{int(c.max()):>8,}")
        if self.labels:
            total = sum(self.labels.values())
            out.append("  labels:")
            for name, n in sorted(self.labels.items(), key=lambda kv: -kv[1]):
                out.append(f"    {name:<22}{n:>12,}  {100 * n / total:5.1f}%")
        if self.unlabelled_scans:
            out.append(f"  {self.unlabelled_scans} scans have no labels")
        if self.empty_scans:
            shown = ", ".join(self.empty_scans[:20]) + (" ..." if len(self.empty_scans) > 20 else "")
            out.append(f"  {len(self.empty_scans)} scans have zero points: {shown}")
        for path in self.plots:
            out.append(f"  plot: {path}")
        out.append(f"  problems: {len(self.errors)}")
        out.extend(f"    {e}" for e in self.errors)
        return out

    def add_error(self, error: DatasetError) -> None:
        message = str(error)
        if message not in self._seen:
            self._seen.add(message)
            self.errors.append(message)


def check_dataset(cfg: CheckConfig) -> CheckReport:
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split, keep_going=True)
    meta = ds.meta
    report = CheckReport(cfg.dataset, cfg.split)
    for problem in ds.problems:  # bad index files: listed, and the check goes on
        report.add_error(problem)
    report.absent = list(getattr(ds, "missing_sequences", ()))
    count = len(ds) if cfg.max_scans is None else min(cfg.max_scans, len(ds))
    for index in tqdm(range(count), desc=f"check {cfg.dataset} {cfg.split}", unit="scan"):
        try:
            scan = ds[index]
            views = []
            for camera in scan.cameras:
                on_disk = (
                    load_image(camera.image_path).shape[:2] if cfg.decode_images else image_size(camera.image_path)
                )
                if on_disk != camera.image_size:
                    raise DatasetError(
                        camera.image_path,
                        f"image is {on_disk[1]}x{on_disk[0]} but the calibration says "
                        f"{camera.image_size[1]}x{camera.image_size[0]}",
                    )
                views.append((camera, ds.project(scan, camera.name)))
        except DatasetError as err:
            report.add_error(err)
            continue
        report.scans += 1
        report.points += scan.num_points
        if scan.num_points == 0:
            report.empty_scans.append(scan.scan_id)
        for camera, proj in views:
            report.visible[camera.name].append(len(proj))
        if scan.labels is None:
            report.unlabelled_scans += 1
        else:
            hist = np.bincount(scan.labels, minlength=IGNORE_INDEX + 1)
            for cls, n in enumerate(hist):
                if n:
                    report.labels[meta.class_names[cls] if cls < meta.num_classes else "ignored"] += int(n)
        if cfg.plot_dir is not None and index < cfg.plot_scans:
            stem = scan.scan_id.replace("/", "-")
            for colour_by in ("depth", "label") if scan.labels is not None else ("depth",):
                out = Path(cfg.plot_dir) / f"{cfg.dataset}-{stem}-{colour_by}.png"
                report.plots.append(projection_figure(scan, views, colour_by, out, meta.class_names))
    return report
