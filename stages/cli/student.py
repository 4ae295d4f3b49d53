"""Stage 2's commands: pretraining a student from feature stores, and converting its checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import layered
from stages.cli.options import (
    MIXED_RECIPES,
    STUDENT_RECIPE,
    device_option,
    precision_option,
    recipe_option,
    stores_option,
)
from stages.student.checkpoints import convert_checkpoint
from stages.student.pretrain import PretrainConfig, pretrain, stores_recipe
from stages.student.waffleiron import STUDENTS
from storage.runs import RunFolder

CONFIG_FILE = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML file of overrides ([optim] lr = 1e-3 ...).",
)

SEED = click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of the initialisation and the samples [config: 0]; runs that differ "
    "only in it are grouped by `scalr runs` (mean +- std).",
)
CONTINUE_WITH_CHANGES = click.option(
    "--continue-with-changes",
    is_flag=True,
    help="Resume --out's run although settings that change what is trained differ from its record "
    "(they are recorded in the run); without it such a resume is refused.",
)


@click.command("pretrain")
@stores_option(
    "--store",
    "stores",
    "Feature store; repeat it. Stores of one dataset split (one per teacher) are joined, stores of different "
    "datasets mixed.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Run folder (config, metrics, checkpoints, loss curve).",
)
@click.option(
    "--student", default="WI-48-256", help=f"WaffleIron preset: {', '.join(STUDENTS)} (the last for CPU demos)."
)
@CONFIG_FILE
@click.option(
    "--set", "sets", multiple=True, help="Override any config key, e.g. --set optim.lr=1e-3 --set model.drop_path=0.2."
)
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Global batch size (all ranks).")
@click.option(
    "--max-steps", type=int, default=None, help="Stop after this many steps (the schedule still spans all epochs)."
)
@precision_option(default=None)
@device_option(default=None)
@click.option("--num-workers", type=int, default=None)
@click.option(
    "--loss", type=click.Choice(["cosine", "ppkt"]), default=None, help="cosine: ScaLR; ppkt: contrastive baseline."
)
@click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in --out instead of resuming from it.")
@SEED
@CONTINUE_WITH_CHANGES
@recipe_option(
    "The released recipe to pretrain with: cvpr (WarmupCosine, 25 epochs, ReLU, linear head) or scalr-plus (GELU, "
    "LayerNorm, drop path 0.2, MLP head, bf16, reciprocal-sqrt schedule, 65 epochs). Default: the stores' recipe."
)
@MIXED_RECIPES
def pretrain_command(stores, out, student, config_file, sets, fresh, continue_with_changes, recipe, **options):
    """Stage 2: train a WaffleIron student against cached teacher targets (no teacher, images or
    raw dataset needed). Resumes from --out's last checkpoint. Multi-GPU:
    torchrun --nproc-per-node N --no-python scalr pretrain ..."""
    preset = PretrainConfig.preset(stores, out, student, recipe or stores_recipe(stores))
    cfg = layered(preset, config_file, sets, config_flags(options))
    summary = pretrain(cfg, resume=not fresh, accept_changes=continue_with_changes)
    loss_curve = RunFolder(out).loss_plot
    click.echo(f"pretrained {summary['steps']} steps; checkpoint {summary['checkpoint']}; loss curve {loss_curve}")


# Options of the training commands that set a config key (None: not given, the config's value stands).
FLAG_KEYS = {
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "max_steps": "train.max_steps",
    "precision": "train.precision",
    "device": "train.device",
    "num_workers": "train.num_workers",
    "seed": "train.seed",
    "loss": "loss.kind",
    "mixed_recipes": "mixed_recipes",
}


def config_flags(options: dict) -> dict:
    """The dotted config keys of a training command's options."""
    return {FLAG_KEYS[name]: value for name, value in options.items()}


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--to", type=click.Choice(["auto", "scalr", "released"]), default="auto", help="auto: the other format than SRC's."
)
@STUDENT_RECIPE
def convert_command(src, dst, to, recipe):
    """Convert a student checkpoint between the released ScaLR code's format (`model_points` /
    `net` state dicts of its WaffleIron segmenter; the published checkpoints) and scalr's. The
    weights are moved and reshaped, never changed: a round trip is bitwise. probe, finetune,
    evaluate and plot-features also read released checkpoints directly."""
    written = convert_checkpoint(src, dst, to, recipe)
    click.echo(f"{dst}: {written} checkpoint written from {src}")
