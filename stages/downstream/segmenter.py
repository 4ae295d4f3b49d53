"""The segmentation model of every downstream mode: a WaffleIron backbone, then BatchNorm1d and a
linear classifier; and its reading back from a checkpoint (scalr's or a released finetuned one)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stages.student.checkpoints import SEGMENTER_STAGES, recorded_student
from stages.student.waffleiron import WaffleIron
from storage.checkpoint import CheckpointError, load_weights


class SegmentationModel(nn.Module):
    """Backbone + BatchNorm1d + linear classifier. With `frozen`, the backbone stays in eval mode
    and gets no gradient, whatever the training loop asks."""

    def __init__(self, backbone: WaffleIron, num_classes: int, frozen: bool):
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        width = backbone.cfg.width
        # As the released ScaLR code: default BatchNorm (weight 1, bias 0), the linear layer zeroed
        # ("both zero-initialised" read literally would leave the head without any gradient).
        self.head = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, num_classes))
        nn.init.zeros_(self.head[1].weight)
        nn.init.zeros_(self.head[1].bias)
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, batch: dict) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                features = self.backbone(batch)
        else:
            features = self.backbone(batch)
        return self.head(features)


def segmenter_classes(path: Path, record: dict) -> int:
    """The number of classes of a segmentation model's run record; CheckpointError for a record of
    anything else. A released finetuned checkpoint's record has no dataset: the caller knows it."""
    stage = record.get("stage", "unknown")
    if stage not in SEGMENTER_STAGES:
        raise CheckpointError(
            path, f"a {stage} checkpoint, not a segmentation model (run probe, finetune or scratch first)"
        )
    classes = record.get("num_classes")
    released = stage == "released-segmenter"
    if not isinstance(classes, int) or classes <= 0 or not (released or isinstance(record.get("dataset"), dict)):
        raise CheckpointError(path, "run record lacks the dataset and number of classes")
    return classes


def build_segmenter(path: Path, state: dict, grid_shape: tuple[int, int, int] | None = None) -> SegmentationModel:
    """The trained segmentation model of a checkpoint's `state` (`read_student_checkpoint`), on
    `grid_shape` (None: the recorded one), in eval mode."""
    record = state["config"]
    classes = segmenter_classes(path, record)
    cfg = recorded_student(path, record, **({} if grid_shape is None else {"grid_shape": tuple(grid_shape)}))
    model = SegmentationModel(WaffleIron(cfg), classes, frozen=False)
    what = f"a {record['stage']} model (depth {cfg.depth}, width {cfg.width}, {classes} classes)"
    load_weights(path, model, state["model"], what)
    return model.eval()
