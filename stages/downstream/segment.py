"""Downstream training, one trainer for three modes: linear probing, finetuning (finetune.py) and
training from scratch, each with its released recipe's settings (stages/recipes.py).

Data flow: a dataset reader (labels) -> labelled samples (labelled.py: voxelise, crop, augment,
student inputs) -> the pretrained backbone (frozen in eval mode for probing; layer-wise
learning-rate decay for finetuning) + a new BatchNorm1d + linear head (segmenter.py) ->
cross-entropy + Lovasz-softmax -> the training loop of pretraining (stages/student/train.py):
checkpoints, exact resume, torchrun, autocast.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.config import to_dict
from pipeline.datasets import READERS, LidarDataset, open_dataset
from pipeline.errors import ConfigError, DatasetError
from pipeline.transforms import Augment, Grid
from stages.downstream import finetune
from stages.downstream.labelled import LabelledScans, frames_from_file, label_subset
from stages.downstream.segmenter import SegmentationModel
from stages.recipes import DownstreamRules, check_recipe, downstream_rules, pretrain_settings
from stages.runtime import seeded
from stages.student.checkpoints import build_backbone, read_checkpoint_for
from stages.student.losses import segmentation_loss
from stages.student.samples import EpochSampler, SampleConfig, collate
from stages.student.train import OptimConfig, TrainConfig, fit
from stages.student.waffleiron import STUDENTS, WaffleIron

log = logging.getLogger(__name__)

MODES = ("probe", "finetune", "scratch")  # scratch: the supervised baseline, trained as finetuning
CROP_POINTS = 20000  # training samples: the points nearest a random point, as the released code


@dataclass(frozen=True)
class SegmentConfig:
    dataset: str
    root: Path
    out: Path
    mode: str = "probe"  # probe (frozen backbone), finetune, scratch (supervised baseline)
    checkpoint: Path | None = None  # a pretraining (or segmentation) checkpoint; not for scratch
    split: str = "train"
    student: str = "WI-48-256"  # scratch only: the preset to train
    labels_fraction: float = 1.0  # 1.0, 0.1 or 0.01: every (1/fraction)-th scan of the sorted list
    frames_file: Path | None = None  # the labelled scans instead: a text list of scan ids or a released .npy list
    layer_decay: float | None = None  # finetune: None = the recipe's (CVPR 0.99 at 100% labels, 0.95 below)
    drop_path: float | None = None  # None = the recipe's (0.2 for finetune/scratch)
    warmup_epochs: float = 2.0
    sample: SampleConfig = field(
        default_factory=lambda: SampleConfig(max_points=CROP_POINTS)
    )  # `for_mode`: the dataset's
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = "cvpr"  # the released recipe of these settings (stages/recipes.py), recorded
    mixed_recipes: bool = False  # allow a checkpoint pretrained with the other recipe

    @classmethod
    def for_mode(cls, mode: str, recipe: str = "cvpr", **kw) -> SegmentConfig:
        """The mode's settings in `recipe` for the dataset and label fraction, with `kw` on top."""
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}: {', '.join(MODES)}")
        r = downstream_rules(check_recipe(recipe), mode, kw.get("dataset"), kw.get("labels_fraction", 1.0))
        if "dataset" in kw and "sample" not in kw:
            sample = downstream_sample(kw["dataset"], mode)
        else:
            sample = kw.pop("sample", SampleConfig(max_points=CROP_POINTS))
        optim = OptimConfig(lr=r.lr, weight_decay=r.weight_decay, min_lr=r.min_lr)
        warmup = kw.pop("warmup_epochs", r.warmup_epochs)
        train = TrainConfig(epochs=r.epochs, precision=r.precision)
        return cls(mode=mode, optim=optim, train=train, warmup_epochs=warmup, sample=sample, recipe=recipe, **kw)

    def rules(self) -> DownstreamRules:
        return downstream_rules(self.recipe, self.mode, self.dataset, self.labels_fraction)


def downstream_sample(dataset: str, mode: str = "probe") -> SampleConfig:
    """Training samples of the released downstream code: 20,000 points nearest a random point,
    the dataset's field of view in 0.5 m cells (PandaSet 512 x 512 over +-128 m; PandarGT
    finetuning 384 x 384 over +-96 m)."""
    fov = READERS[dataset].meta.field_of_view if dataset in READERS else (Grid().lo, Grid().hi)
    if mode in ("finetune", "scratch"):
        fov = finetune.FIELD_OF_VIEW.get(dataset, fov)
    return SampleConfig(max_points=CROP_POINTS, grid=Grid(*fov))


def segmentation_model(cfg: SegmentConfig, num_classes: int) -> SegmentationModel:
    """The model a mode trains: a pretrained backbone (probe, finetune; made with the run's recipe
    unless `mixed_recipes`) or a preset at random initialisation (scratch, as the recipe builds its
    students), on the sample grid, with a new head."""
    drop = cfg.rules().drop_path if cfg.drop_path is None else cfg.drop_path
    grid = cfg.sample.grid.shape
    if cfg.mode == "scratch":
        if cfg.checkpoint is not None:
            raise ConfigError("training from scratch takes no --checkpoint")
        preset = STUDENTS[cfg.student]
        model = {
            k[len("model.") :]: v
            for k, v in pretrain_settings(cfg.recipe, preset.width).items()
            if k.startswith("model.")
        }
        with seeded(cfg.train.seed):
            backbone = WaffleIron(dataclasses.replace(preset, **{**model, "drop_path": drop, "grid_shape": grid}))
    else:
        if cfg.checkpoint is None:
            raise ConfigError(f"{cfg.mode} needs --checkpoint (a pretraining run's checkpoints/last.pt)")
        state = read_checkpoint_for(cfg.checkpoint, cfg.recipe, f"this {cfg.mode} run", cfg.mixed_recipes)
        backbone = build_backbone(cfg.checkpoint, state, grid, drop)  # WaffleIron's weights do not depend on the grid
    with seeded(cfg.train.seed):
        return SegmentationModel(backbone, num_classes, frozen=cfg.mode == "probe")


def parameter_groups(cfg: SegmentConfig, model: SegmentationModel) -> list[dict]:
    """Finetuning: one group per layer with its decayed lr; otherwise the trainable parameters."""
    if cfg.mode == "finetune":
        decay = cfg.layer_decay if cfg.layer_decay is not None else cfg.rules().layer_decay
        return finetune.layer_decay_groups(model, cfg.optim.lr, decay)
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def labelled_indices(cfg: SegmentConfig, ds: LidarDataset) -> list[int]:
    if len(ds) == 0:
        raise DatasetError(cfg.root, f"split {cfg.split} is empty")
    return frames_from_file(ds, cfg.frames_file) if cfg.frames_file else label_subset(ds.scan_ids, cfg.labels_fraction)


def segmentation_step(net, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    loss = segmentation_loss(net(batch), batch["labels"])
    count = torch.tensor(float(len(batch["labels"])), device=loss.device)
    return loss * count, count


def train_segmentation(cfg: SegmentConfig, resume: bool = True, accept_changes: bool = False) -> dict:
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split)
    indices = labelled_indices(cfg, ds)
    model = segmentation_model(cfg, ds.meta.num_classes)
    augment = Augment(scale=(0.9, 1.1), separate_features=True)
    data = LabelledScans(ds, indices, dataclasses.replace(cfg.sample, augment=augment), train=True)
    steps_per_epoch = len(indices) // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise DatasetError(cfg.root, f"{len(indices)} labelled scans cannot fill one batch of {cfg.train.batch_size}")
    optim = dataclasses.replace(cfg.optim, warmup_epochs=cfg.warmup_epochs)  # warm-up end: epochs x steps an epoch
    backbone = model.backbone.cfg
    record = {
        "stage": cfg.mode,
        "scalr_version": __version__,
        "config": {**to_dict(cfg), "model": to_dict(backbone)},
        "dataset": {
            "name": ds.meta.name,
            "split": cfg.split,
            "classes": list(ds.meta.class_names),
            "scans": len(indices),
        },
        "num_classes": ds.meta.num_classes,
        "pretrained": str(cfg.checkpoint) if cfg.checkpoint else None,
    }
    log.info(
        "%s on %s %s: %d labelled scans (%.0f%%), %s backbone %dx%d",
        cfg.mode,
        ds.meta.name,
        cfg.split,
        len(indices),
        100 * cfg.labels_fraction,
        "frozen" if model.frozen else "trainable",
        backbone.depth,
        backbone.width,
    )

    def sampler(rank: int, world: int) -> EpochSampler:
        return EpochSampler([len(indices)], cfg.train.batch_size, cfg.train.seed, rank, world)

    groups = parameter_groups(cfg, model)
    frames = {"frames.txt": "\n".join(ds.scan_ids[i] for i in indices) + "\n"}
    return fit(
        model,
        groups,
        data,
        sampler,
        collate,
        segmentation_step,
        optim,
        cfg.train,
        cfg.out,
        record,
        resume,
        accept_changes,
        frames,
    )
