"""Downstream commands: linear probing, finetuning and the supervised baseline (one trainer, three
recipes), evaluation, and a student's per-point features as a store."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import layered
from pipeline.corruptions import CORRUPTIONS
from pipeline.datasets import READERS
from stages.cli.options import (
    CHECKPOINT,
    DATASET,
    MIXED_RECIPES,
    ROOT,
    SPLIT,
    STUDENT_RECIPE,
    device_option,
    precision_option,
    recipe_option,
    stores_option,
)
from stages.cli.student import CONFIG_FILE, CONTINUE_WITH_CHANGES, FLAG_KEYS, SEED, config_flags
from stages.downstream.embed import EmbedConfig, embed
from stages.downstream.evaluate import EvaluateConfig, evaluate, table_lines
from stages.downstream.probe_store import ProbeStoreConfig, probe_store, result_lines
from stages.downstream.segment import SegmentConfig, train_segmentation
from stages.student.checkpoints import checkpoint_recipe
from stages.student.waffleiron import STUDENTS

PROBE_HELP = (
    "Linear probing: frozen pretrained backbone (eval mode), train a BatchNorm + linear head (AdamW lr 1e-3, wd 3e-3, "
    "20 epochs (PandaSet 50), warm-up 2 epochs, cosine to 1e-5 (scalr-plus: to 0, bf16), as the released configs)."
)
FINETUNE_HELP = (
    "Finetune a pretrained backbone with a new head: drop-path 0.2, layer-wise lr decay, AdamW wd 0, CE + Lovasz, "
    "cosine to 0, as the released configs. cvpr: lr 2e-3, decay 0.99 at 100% labels, 0.95 below; 25 epochs, 2 of "
    "warm-up (SemanticKITTI 10, 1; 1%/10% labels 45, 4). scalr-plus: lr 1e-4, decay 0.99, bf16; 25 epochs, 2 of "
    "warm-up (1%/10% labels 45, 4)."
)
RECIPE = recipe_option(
    "The released recipe of the downstream settings: cvpr or scalr-plus. Default: the checkpoint's (cvpr for "
    "training from scratch, and for a released file that does not show it)."
)
FRAMES_HELP = (
    "The labelled scans: a text file of scan ids (one a line) or a released ScaLR .npy list (e.g. "
    "nuscenes-ratio_100-v_0.npy "
    "for 1%; its pickled strings are read without running code). Give --labels too, for the schedule."
)


def segment_command(mode: str, name: str, help_text: str, *extra_options):
    """The click command training a segmenter in `mode` (probe, finetune, scratch)."""

    @click.command(name, help=help_text)
    @click.option("--dataset", type=click.Choice(sorted(READERS)), required=True, help="Labelled dataset format.")
    @ROOT
    @SPLIT
    @click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder.")
    @click.option(
        "--labels",
        "labels_fraction",
        type=click.Choice(["1", "10", "100"]),
        default="100",
        help="Percent of the training scans with labels (every 100th / 10th scan of the sorted list).",
    )
    @click.option("--frames-file", type=click.Path(path_type=Path), default=None, help=FRAMES_HELP)
    @CONFIG_FILE
    @click.option("--set", "sets", multiple=True, help="Override any config key, e.g. --set optim.lr=5e-4.")
    @click.option("--epochs", type=int, default=None)
    @click.option("--batch-size", type=int, default=None)
    @precision_option(default=None)
    @device_option(default=None)
    @click.option("--num-workers", type=int, default=None)
    @click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in --out.")
    @CONTINUE_WITH_CHANGES
    @SEED
    @RECIPE
    @MIXED_RECIPES
    def command(labels_fraction, config_file, sets, fresh, continue_with_changes, recipe, **fields):
        flags = config_flags({name: fields.pop(name) for name in list(fields) if name in FLAG_KEYS})
        if recipe is None:  # the checkpoint's (a missing one is reported in its turn, after the labels)
            checkpoint = fields.get("checkpoint")
            recipe = checkpoint_recipe(checkpoint) if checkpoint and Path(checkpoint).is_file() else "cvpr"
        cfg = SegmentConfig.for_mode(mode, recipe, labels_fraction=int(labels_fraction) / 100, **fields)
        cfg = layered(cfg, config_file, sets, flags)
        summary = train_segmentation(cfg, resume=not fresh, accept_changes=continue_with_changes)
        ckpt = summary["checkpoint"]
        click.echo(
            f"{mode}: {summary['steps']} steps; checkpoint {ckpt}; evaluate with: scalr evaluate --checkpoint "
            f"{ckpt} ..."
        )

    for option in extra_options:
        command = option(command)
    return command


probe_command = segment_command("probe", "probe", PROBE_HELP, CHECKPOINT)
finetune_command = segment_command(
    "finetune",
    "finetune",
    FINETUNE_HELP,
    CHECKPOINT,
    click.option("--layer-decay", type=float, default=None, help="Layer-wise lr decay (default by label fraction)."),
)
train_scratch_command = segment_command(
    "scratch",
    "train-scratch",
    "Supervised baseline: the same training from a random initialisation.",
    click.option("--student", default="WI-48-256", help=f"WaffleIron preset: {', '.join(STUDENTS)}."),
)


@click.command("evaluate")
@DATASET
@ROOT
@click.option("--split", default="val", show_default=True)
@CHECKPOINT
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="JSON result (default: RUN/eval-DATASET-SPLIT.json)."
)
@device_option()
@click.option("--max-scans", type=int, default=None)
@click.option(
    "--corruptions",
    default="",
    help="Robo3D-style corruptions to evaluate at 3 severities each: 'all' or a comma list of "
    f"{', '.join(CORRUPTIONS)}.",
)
@click.option("--seed", default=0, help="Seed of the corruptions.")
@click.option(
    "--class-map",
    default=None,
    help="Across datasets: the shared-class map (default: the one registered for the two datasets).",
)
@precision_option(
    default=None,
    help_text="Autocast precision (default: the model's recipe's, as its released "
    "evaluation: fp32 for cvpr, bf16 for scalr-plus).",
)
@STUDENT_RECIPE
def evaluate_command(corruptions, **fields):
    """mIoU (NaN-mean over classes) and accuracy of a segmentation model: predictions on the
    voxelised cloud, every point labelled by its nearest kept point, one confusion matrix. With
    --corruptions: mIoU per corruption and severity, CE, mCE (nuScenes: vs MinkUNet-18) and mRR."""
    names = (
        tuple(CORRUPTIONS) if corruptions == "all" else tuple(c.strip() for c in corruptions.split(",") if c.strip())
    )
    result = evaluate(EvaluateConfig(corruptions=names, **fields))
    click.echo("\n".join(table_lines(result)))


@click.command("embed")
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    required=True,
    help="A student checkpoint: scalr's (pretraining or downstream) or the released ScaLR code's.",
)
@DATASET
@ROOT
@click.option("--split", default="val", help="Split to embed (every scan of it).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Store to create or finish (e.g. stores/nuscenes-val-wi768.zarr).",
)
@click.option(
    "--voxel-size",
    type=float,
    default=None,
    help="Voxel size in metres; 0 keeps every point in the field of view. Default: the released evaluation's 0.1 m "
    "(first point of each voxel).",
)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored feature type.")
@device_option()
@click.option("--max-scans", type=int, default=None, help="Only the first N scans of the split.")
@STUDENT_RECIPE
def embed_command(**fields):
    """Write a student backbone's per-point features for every scan of a split into a feature
    store (one entry per scan, camera "lidar": the kept points, their point_index into the raw
    scan, their features), in eval mode, without augmentation or crop, on the dataset's released
    evaluation grid (PandaSet 512 x 512 cells over +-128 m; others 256 x 256 over +-64 m).
    inspect, verify, plain zarr and the pictures read it like a teacher store. Rerunning the same
    command finishes an interrupted store."""
    store = embed(EmbedConfig(**fields))
    out, dim = fields["out"], store.attrs["teacher"]["dim"]
    click.echo(f"{out}: {store.plan.scans} scans embedded ({dim} dims, {fields['dtype']}); see `scalr inspect {out}`")


@click.command("probe-store")
@stores_option(
    "--train", "train", "Store of the training split; repeat it for several teachers (their targets concatenated)."
)
@stores_option("--val", "val", "Store of the validation split, the same teachers.")
@DATASET
@ROOT
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder (`scalr runs` lists it).")
@click.option(
    "--fraction", type=float, default=1.0, help="Fraction of each store's scans, spread evenly (terabyte stores)."
)
@click.option("--epochs", type=int, default=30)
@device_option()
@click.option("--seed", type=int, default=0)
def probe_store_command(train, val, **fields):
    """A teacher's linear-probe mIoU on the lidar classes, from its stores alone: a linear classifier
    on the cached targets of the labelled visible points of --train (labels through the dataset's
    reader at each entry's point_index), scored on the visible points of --val, with each class's
    number of visible points. The 2D upper bound a distilled student aims at; no pretraining needed."""
    result = probe_store(ProbeStoreConfig(tuple(train), tuple(val), **fields))
    click.echo("\n".join(result_lines(result)))
