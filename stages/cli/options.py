"""Options several commands share, each spelled once."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.datasets import READERS
from stages.recipes import RECIPES
from stages.runtime import PRECISIONS

DATASET = click.option("--dataset", type=click.Choice(sorted(READERS)), required=True, help="Dataset format of ROOT.")
ROOT = click.option("--root", type=click.Path(path_type=Path), required=True, help="Dataset root folder.")
SPLIT = click.option(
    "--split",
    default="train",
    show_default=True,
    help="Split: nuScenes train, val, mini_train, mini_val, paper_mini_train, paper_mini_val, test; "
    "SemanticKITTI train, val, test.",
)


def stores_option(flag: str, dest: str, help_text: str):
    """A repeatable, required feature-store path (pretrain's --store, probe-store's --train / --val)."""
    return click.option(flag, dest, multiple=True, required=True, type=click.Path(path_type=Path), help=help_text)


def precision_option(default: str | None = "fp32", help_text: str = "Autocast precision."):
    """None: the config's (pretrain, probe, finetune layer flags over their config)."""
    return click.option("--precision", type=click.Choice(list(PRECISIONS)), default=default, help=help_text)


def device_option(default: str | None = "auto"):
    return click.option(
        "--device", default=default, help="auto (this process's GPU, else the CPU), cpu, cuda or cuda:N."
    )


CHECKPOINT = click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    required=True,
    help="Pretraining checkpoint (RUN/checkpoints/last.pt).",
)
JSON_OUT = click.option(
    "--json-out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON here."
)


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    try:
        return int(h), int(w)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not HEIGHTxWIDTH, e.g. 224x448") from None


def image_size_option(help_text: str, default: str | None = "224x448"):
    return click.option(
        "--image-size",
        default=default,
        callback=lambda c, p, v: None if v is None else parse_size(v),
        help=help_text,
    )


def recipe_option(help_text: str, default: str | None = None):
    """--recipe cvpr|scalr-plus (stages/recipes.py); None: what the command's inputs record."""
    return click.option("--recipe", type=click.Choice(RECIPES), default=default, help=help_text)


MIXED_RECIPES = click.option(
    "--mixed-recipes",
    is_flag=True,
    default=None,
    help="Allow inputs made with the other recipe (stores, a pretrained checkpoint); recorded in the run. Without "
    "it, mixing recipes is refused.",
)

STUDENT_RECIPE = recipe_option(
    "The recipe that made the checkpoint: its activation (cvpr ReLU, scalr-plus GELU) for a released file that does "
    "not show it; checked against a scalr checkpoint's record. Default: the record's, or what the file shows, else "
    "cvpr."
)
