"""The two released recipes, as data: what `--recipe cvpr|scalr-plus` means in every command.

cvpr:       valeoai/ScaLR, branch main (v0.1.0), the CVPR 2024 code.
scalr-plus: valeoai/ScaLR, branch scalr_plus (v0.2.0, commit 7cf02a2, 2026-04-27), ScaLR+.

Each value names the released file it comes from. Commands start from these settings; a config
file, `--set` and the command's flags go on top. The recipe is recorded in every store, run and
checkpoint, and a stage refuses inputs made with the other recipe unless told (`--mixed-recipes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError

RECIPES = ("cvpr", "scalr-plus")
PANDASET = ("pandar64", "pandargt")


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ConfigError(f"recipe {recipe!r}: one of {', '.join(RECIPES)}")
    return recipe


@dataclass(frozen=True)
class ImageRules:
    """Stage 1: how camera images reach the teacher."""

    image_size: tuple[int, int]  # (H, W): configs/pretrain/*.yaml `im_size`
    antialias: bool  # of the float image resize: torchvision 0.12 (CVPR) has none, >= 0.17 (ScaLR+) does
    pos_embed: str  # position embeddings at that size: stages.extract.teachers.POS_EMBED


IMAGES = {
    # WI_768_pretrain.yaml im_size [224, 448]; models/dinov2_vision_transformer.py interpolates
    # its 518-px table at every forward.
    "cvpr": ImageRules((224, 448), antialias=False, pos_embed="dinov2-cvpr"),
    # WI_768-ScaLR_plus.yaml im_size [448, 896]; models/image_teacher.py builds timm's model at
    # that size (its table resized once, at load).
    "scalr-plus": ImageRules((448, 896), antialias=True, pos_embed="timm"),
}


@dataclass(frozen=True)
class MixRules:
    """What a recipe's WaffleIron computes that its weights do not show (so a released file's
    student is rebuilt from these too: stages/student/released.py)."""

    activation: str  # of the channel-mix MLP and the spatial-mix FFN (the embedding keeps ReLU)
    cell_mean: str  # how a spatial mix averages a cell: stages.student.waffleiron.CELL_MEANS


MIXES = {
    # valeoai/WaffleIron backbone.py: ReLU; helper_projection.py: occupied / (n + 1e-6) per point, summed
    "cvpr": MixRules("relu", "weights"),
    # scalr_plus waffleiron/backbone.py `gelu: True` (exact GELU); helper_projection.py scatter_reduce "mean"
    "scalr-plus": MixRules("gelu", "divide"),
}


def pretrain_settings(recipe: str, width: int) -> dict:
    """Dotted keys of a PretrainConfig: the student's architecture, head, optimisation, schedule
    and precision of the recipe's distill.py and configs/pretrain/*.yaml, for a student `width`."""
    if check_recipe(recipe) == "cvpr":
        return {
            # WI_768_pretrain.yaml `layernorm: True` at width 768 (BatchNorm NaNs under mixed
            # precision); the paper's narrower students use BatchNorm.
            "model.norm": "layer" if width == 768 else "batch",
            "model.activation": MIXES["cvpr"].activation,
            "model.cell_mean": MIXES["cvpr"].cell_mean,
            "model.drop_path": 0.0,
            "head": "auto",  # one teacher: segmenter.py's 1x1 conv; several: an MLP (the paper)
            "optim.lr": 2e-3,  # WI_768_pretrain.yaml optim
            "optim.weight_decay": 0.03,  # distill.py: AdamW on every parameter
            "optim.schedule": "warmup-cosine",  # utils/scheduler.py WarmupCosine, per iteration
            "optim.warmup_iters": 3500,
            "optim.min_lr": 1e-5,
            "train.epochs": 25,  # dataloader.num_epochs
            "train.batch_size": 8,
        }
    return {
        "model.norm": "layer",  # waffleiron/backbone.py: myLayerNorm in every mix
        "model.activation": MIXES["scalr-plus"].activation,
        "model.cell_mean": MIXES["scalr-plus"].cell_mean,
        "model.drop_path": 0.2,  # `drop_path: 0.2`, every residual branch, per sample
        "model.checkpointing": True,  # `checkpointing: True`, around each mix
        "head": "mlp",  # `mlp_classif: True`: conv 1x1 to `hidden`, ReLU, conv 1x1 (segmenter.py)
        "head_hidden": 2048,
        "optim.lr": 2e-3,  # WI_768-ScaLR_plus.yaml optim
        "optim.weight_decay": 0.03,
        "optim.schedule": "rsqrt-cooldown",  # utils/scheduler.py LinWarmup_ReciprocalSqrt_LinCoolDown
        "optim.warmup_epochs": 1.0,  # epoch_warmup
        "optim.cooldown_epochs": 2.0,  # cooldown_start 63 of num_epochs 65
        "optim.timescale_epochs": 0.45,  # timescale
        "train.epochs": 65,  # dataloader.num_epochs
        "train.batch_size": 8,
        "train.precision": "bf16",  # utils/distiller.py: bf16 autocast unless --fp16 (not in its README)
    }


@dataclass(frozen=True)
class DownstreamRules:
    """Optimisation and schedule of one downstream run (configs/downstream/<dataset>/WI_768_*.yaml)."""

    lr: float
    weight_decay: float
    drop_path: float
    epochs: int
    warmup_epochs: float
    min_lr: float  # the cosine's end
    layer_decay: float | None  # finetuning's layer-wise lr decay; None for probing
    precision: str  # autocast of the released Finetuner


def downstream_precision(recipe: str) -> str:
    """Autocast of the released Finetuner, in training and in evaluation alike: ScaLR+'s
    utils/finetuner.py runs both under bf16 unless --fp16; the CVPR code's default is fp32."""
    return "bf16" if check_recipe(recipe) == "scalr-plus" else "fp32"


def downstream_rules(recipe: str, mode: str, dataset: str | None, labels_fraction: float) -> DownstreamRules:
    """The recipe's settings for probing (`probe`) or finetuning (`finetune`, and `scratch`, which
    trains from a random initialisation the same way) `dataset` with a fraction of its labels."""
    plus = check_recipe(recipe) == "scalr-plus"
    precision = downstream_precision(recipe)
    if mode == "probe":  # WI_768_linprob.yaml: frozen backbone, no drop path; the fraction changes nothing
        epochs = 50 if dataset in PANDASET else 20
        return DownstreamRules(1e-3, 3e-3, 0.0, epochs, 2.0, 0.0 if plus else 1e-5, None, precision)
    if mode not in ("finetune", "scratch"):
        raise ConfigError(f"unknown mode {mode!r}: probe, finetune or scratch")
    if labels_fraction < 1.0:  # WI_768_finetune_1p.yaml, _10p.yaml
        epochs, warmup = 45, 4.0
    elif dataset == "semantickitti" and not plus:  # semantic_kitti/WI_768_finetune_100p.yaml (CVPR)
        epochs, warmup = 10, 1.0
    else:
        epochs, warmup = 25, 2.0
    if plus:  # lr 1e-4 and layer decay 0.99 in every ScaLR+ finetuning config
        return DownstreamRules(1e-4, 0.0, 0.2, epochs, warmup, 0.0, 0.99, precision)
    decay = 0.99 if labels_fraction == 1.0 else 0.95
    return DownstreamRules(2e-3, 0.0, 0.2, epochs, warmup, 0.0, decay, precision)
