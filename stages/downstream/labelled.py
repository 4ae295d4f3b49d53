"""Labelled scans for downstream training: which scans carry labels (every (1/fraction)-th of the
sorted list, or a frame list), and their training samples (voxelise, crop, augment, student inputs)
with the labels of the kept points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.datasets import LidarDataset
from pipeline.errors import ConfigError, DatasetError
from pipeline.files import read_regular
from pipeline.safe_pickle import load_npy
from stages.student.samples import SampleConfig, student_inputs


def frames_from_file(ds: LidarDataset, path: Path) -> list[int]:
    """Indices of the scans a frame list names: a text file (one scan id per line; # comments)
    or a released ScaLR .npy list (rows of strings: lidar file, label file, token; each row is
    matched by any of its strings that is a scan id or a lidar file name). Every entry must match."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "frame list is missing")
    if path.suffix == ".npy":  # the released lists are object arrays of strings, which numpy pickles
        rows = [[str(v) for v in np.atleast_1d(row)] for row in load_npy(path)]
    else:
        lines = read_regular(path, DatasetError).decode(errors="replace").splitlines()
        rows = [[line.strip()] for line in lines if line.strip() and not line.lstrip().startswith("#")]
    position = {scan_id: i for i, scan_id in enumerate(ds.scan_ids)}
    aliases = ds.scan_aliases()
    indices = []
    for n, row in enumerate(rows, 1):
        found = next((position[s] for s in row if s in position), None)
        if found is None:
            found = next((position[aliases[Path(s).name]] for s in row if Path(s).name in aliases), None)
        if found is None:
            raise DatasetError(path, f"entry {n} ({' '.join(row)[:120]}) names no scan of {ds.meta.name} {ds.split}")
        indices.append(found)
    if not indices:
        raise DatasetError(path, "frame list is empty")
    return sorted(set(indices))


def label_subset(ids: list[str], fraction: float) -> list[int]:
    """Indices of every (1/fraction)-th scan of the sorted id list (SemanticKITTI's 1% rule,
    applied to every dataset)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"labels fraction {fraction} is not in (0, 1]")
    step = int(round(1 / fraction))
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return sorted(order[::step])


class LabelledScans(torch.utils.data.Dataset):
    """Labelled scans of a reader; items keyed by (position, seed) like the distillation data."""

    def __init__(self, ds: LidarDataset, indices: list[int], cfg: SampleConfig, train: bool):
        self.ds, self.indices, self.cfg, self.train = ds, indices, cfg, train

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        position, seed = key
        scan = self.ds[self.indices[position]]
        if scan.labels is None:
            what = f"{self.ds.meta.name} {self.ds.split}"
            raise DatasetError(self.ds.root, f"scan {scan.scan_id} has no labels; {what} cannot train a segmenter")
        rng = np.random.default_rng(seed)
        keep, inputs = student_inputs(scan.points, self.ds.meta.intensity_norm, self.cfg, rng, self.train)
        return {**inputs, "labels": scan.labels[keep].astype(np.int64), "scan_id": scan.scan_id, "keep": keep}
