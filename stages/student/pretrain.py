"""Stage 2, pretrain: train a WaffleIron student against cached teacher targets only.

Data flow: feature stores -> DistillationData (random camera, voxelise, crop, augment, student
inputs) -> WaffleIron + distillation head -> loss against the stored targets -> the shared
training loop (train.py). No teacher, no image and no raw dataset is needed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.config import apply, to_dict
from pipeline.errors import ConfigError, ScalrError
from stages.recipes import check_recipe, pretrain_settings
from stages.runtime import seeded
from stages.student.losses import cosine_distance_loss, ppkt_loss
from stages.student.samples import DistillationData, EpochSampler, SampleConfig, collate
from stages.student.train import OptimConfig, TrainConfig, fit
from stages.student.waffleiron import STUDENTS, Student, WaffleIron, WaffleIronConfig, make_head
from storage.feature_store import FeatureStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossConfig:
    kind: str = "cosine"  # "cosine" (ScaLR) or "ppkt" (point-to-pixel InfoNCE baseline)
    ppkt_pairs: int = 4096
    ppkt_temperature: float = 0.07


@dataclass(frozen=True)
class PretrainConfig:
    stores: tuple[Path, ...]
    out: Path
    student: str = "WI-48-256"  # preset; adjust with model.* overrides
    model: WaffleIronConfig | None = None  # the resolved student (None: the preset's)
    head: str = "auto"  # linear (one teacher), mlp (several teachers; ScaLR+), auto picks
    head_hidden: int = 2048
    loss: LossConfig = field(default_factory=LossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    balanced: bool = False  # sample datasets equally instead of in proportion to their size
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = "cvpr"  # the released recipe these settings follow (stages/recipes.py), recorded
    mixed_recipes: bool = False  # allow stores extracted with the other recipe's stage-1 rules

    @classmethod
    def preset(cls, stores, out: Path, student: str = "WI-48-256", recipe: str = "cvpr") -> PretrainConfig:
        """The `student` preset pretrained as `recipe` prescribes: architecture, head, optimiser,
        schedule, epochs, batch and precision (stages/recipes.py); overrides go on top."""
        cfg = cls(tuple(Path(p) for p in stores), Path(out), student, recipe=check_recipe(recipe)).resolved()
        return apply(cfg, pretrain_settings(recipe, cfg.model.width))

    def resolved(self) -> PretrainConfig:
        if self.student not in STUDENTS:
            raise ConfigError(f"unknown student {self.student!r}; presets: {', '.join(STUDENTS)}")
        return self if self.model is not None else dataclasses.replace(self, model=STUDENTS[self.student])


def stores_recipe(paths) -> str:
    """The recipe the first of these stores was extracted with (pretraining checks them all);
    cvpr when it cannot be opened here (pretraining opens it again and says why)."""
    try:
        return FeatureStore(Path(next(iter(paths)))).attrs.get("recipe", "cvpr")
    except ScalrError:
        return "cvpr"


def check_stores_recipe(cfg: PretrainConfig, stores: list[FeatureStore]) -> None:
    """Stores extracted with another recipe's stage-1 rules are refused unless `mixed_recipes`."""
    other = [s for s in stores if s.attrs.get("recipe", "cvpr") != cfg.recipe]
    if other and not cfg.mixed_recipes:
        raise ConfigError(
            f"{other[0].path}: extracted with the {other[0].attrs.get('recipe', 'cvpr')} recipe, but this pretraining "
            f"follows {cfg.recipe}: use stores of the {cfg.recipe} recipe, or pass --mixed-recipes to mix them on "
            "purpose (recorded in the run)"
        )


def build_student(model_cfg: WaffleIronConfig, target_dim: int, head: str, hidden: int, teachers: int) -> Student:
    kind = ("mlp" if teachers > 1 else "linear") if head == "auto" else head
    return Student(WaffleIron(model_cfg), make_head(model_cfg.width, target_dim, kind, hidden))


def pretrain(cfg: PretrainConfig, resume: bool = True, accept_changes: bool = False) -> dict:
    cfg = cfg.resolved()
    data = DistillationData(list(cfg.stores), cfg.sample)
    groups = data.groups
    check_stores_recipe(cfg, [s for g in groups for s in g.stores])
    if cfg.model.grid_shape != cfg.sample.grid.shape:
        raise ConfigError(
            f"model.grid_shape {cfg.model.grid_shape} differs from the sample grid's {cfg.sample.grid.shape}"
        )
    with seeded(cfg.train.seed):
        model = build_student(cfg.model, data.target_dim, cfg.head, cfg.head_hidden, len(groups[0].teachers))
    log.info(
        "student %s (%.2f M parameters; %.2f M with its distillation head), teachers %s (%d dims), %s: %d scans",
        cfg.student,
        sum(p.numel() for p in model.backbone.parameters()) / 1e6,  # what `scalr runs` and the paper count
        sum(p.numel() for p in model.parameters()) / 1e6,
        groups[0].teachers,
        data.target_dim,
        ", ".join(f"{g.name} {n}" for g, n in zip(groups, data.sizes)),
        len(data),
    )
    record = {
        "stage": "pretrain",
        "scalr_version": __version__,
        "config": to_dict(cfg),
        "stores": [
            {"path": str(s.path), "teacher": s.attrs["teacher"], "dataset": s.attrs["dataset"]}
            for g in groups
            for s in g.stores
        ],
        "target_dim": data.target_dim,
        "head_input": cfg.model.width,
    }
    ppkt_gen = torch.Generator().manual_seed(cfg.train.seed)

    def step_loss(net, batch):
        pred = net(batch)
        if cfg.loss.kind == "cosine":
            per_point = cosine_distance_loss(pred, batch["targets"])
            return per_point.sum(), torch.tensor(float(len(per_point)), device=pred.device)
        if cfg.loss.kind == "ppkt":
            total = ppkt_loss(pred, batch["targets"], cfg.loss.ppkt_pairs, cfg.loss.ppkt_temperature, ppkt_gen)
            return total, torch.tensor(float(min(cfg.loss.ppkt_pairs, len(pred))), device=pred.device)
        raise ConfigError(f"unknown loss {cfg.loss.kind!r}: cosine or ppkt")

    return fit(
        model,
        [{"params": model.parameters()}],
        data,
        lambda rank, world: EpochSampler(data.sizes, cfg.train.batch_size, cfg.train.seed, rank, world, cfg.balanced),
        collate,
        step_loss,
        cfg.optim,
        cfg.train,
        cfg.out,
        record,
        resume,
        accept_changes,
    )
