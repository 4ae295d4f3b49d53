"""A student on one scan, as the released evaluation code runs it: voxels keeping each voxel's first
point in scan order, no augmentation, no crop, the field of view and cells of the evaluation
settings, one forward in eval mode. `evaluate`, `embed`, the pictures and the viewer all run a
student through `run_on_scan`, on the samples chosen here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.scan import DatasetMeta
from pipeline.transforms import Grid
from stages.runtime import to_device
from stages.student.samples import SampleConfig, collate, student_inputs

WHOLE_SCAN = 10**9  # no crop at evaluation


def released_eval_sample(meta: DatasetMeta) -> SampleConfig:
    """The released evaluation settings of a dataset: 0.1 m voxels, its field of view in 0.5 m
    cells, 16 neighbours, no crop."""
    return SampleConfig(voxel=0.1, max_points=WHOLE_SCAN, grid=Grid(*meta.field_of_view), neighbours=16)


def trained_sample_config(record: dict, meta: DatasetMeta) -> SampleConfig:
    """Evaluation samples for a checkpoint: the voxel size, grid and neighbours it was trained
    with; for a released checkpoint (no record of them) the dataset's released settings."""
    s = record.get("config", {}).get("sample")
    if s is None:
        return released_eval_sample(meta)
    grid = Grid(tuple(s["grid"]["lo"]), tuple(s["grid"]["hi"]), s["grid"]["cell"])
    return SampleConfig(voxel=s["voxel"], max_points=WHOLE_SCAN, grid=grid, neighbours=s["neighbours"])


@torch.no_grad()
def run_on_scan(
    model: nn.Module,
    points: np.ndarray,
    intensity_norm: tuple[float, float],
    sample: SampleConfig,
    device: torch.device,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """(indices of the points the student sees, its output for them; None when it sees none) on
    one cloud. `model` (a backbone, or a segmenter on one) is in eval mode and was built on
    `sample`'s grid."""
    keep, inputs = student_inputs(points, intensity_norm, sample, None, train=False)
    if len(keep) == 0:
        return keep, None
    return keep, model(to_device(collate([{**inputs, "scan_id": ""}]), device))
