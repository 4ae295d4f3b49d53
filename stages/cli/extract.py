"""Stage 1's commands: the teacher registry, extraction into a feature store, the store's full check."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.config import apply, parse_sets
from stages.cli.options import (
    DATASET,
    ROOT,
    SPLIT,
    device_option,
    image_size_option,
    precision_option,
    recipe_option,
)
from stages.extract.extract import PROJECTIONS, ExtractConfig, extract
from stages.extract.registry import TEACHERS
from stages.tools.inspect import summary_lines
from storage.layout import LAYOUTS, QUANTIZE
from storage.verify import verify_store

LAYOUT = click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default="grid",
    help="grid: each image's token grid, targets sampled when read (~8x smaller at 224x448 with a /14 teacher); "
    "points: per-point features.",
)
QUANTIZE_OPTION = click.option(
    "--quantize",
    type=click.Choice(QUANTIZE),
    default="none",
    help="int8 grids with a float32 scale per token (grid layout; 0.54x the float16 grid store, targets within cosine "
    "0.999).",
)
RECIPE = recipe_option(
    "The released recipe's stage 1: cvpr (224x448, resize without antialias, DINOv2's 518-px position embeddings "
    "interpolated at every forward) or scalr-plus (448x896, antialiased resize, position embeddings resized once by "
    "timm).",
    default="cvpr",
)


@click.command("teachers")
def teachers_command():
    """List the registered teachers and the weights file each expects."""
    for spec in TEACHERS.values():
        weights = "random init only" if spec.random_init_only else f"{spec.weights_file}  ({spec.weights_source})"
        click.echo(f"{spec.name:<20}{spec.timm_name:<45}dim {spec.dim:<5}patch {spec.patch:<3}{weights}")


@click.command("extract-features")
@DATASET
@ROOT
@SPLIT
@click.option("--teacher", required=True, help="Teacher name (see `scalr teachers`).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Feature store to create or finish (e.g. stores/nuscenes-train-dinov2-vitl14.zarr).",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    default=None,
    help="Teacher weights file (original release checkpoint or timm state dict). Without --weights and --weights-dir: "
    "the teacher's weights by name from the Hugging Face cache (timm's repository; fetched once when online).",
)
@click.option(
    "--weights-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder holding weights under their documented file names.",
)
@click.option(
    "--random-init", is_flag=True, help="Random teacher weights, for tests and demos only; recorded in the store."
)
@click.option("--seed", default=0, help="Seed of --random-init.")
@image_size_option(
    "HEIGHTxWIDTH the images are resized to. Default: the recipe's (cvpr 224x448, scalr-plus 448x896).", default=None
)
@device_option()
@precision_option(help_text="Autocast precision of the teacher.")
@click.option("--batch-size", default=12, help="Images per teacher forward pass.")
@click.option("--num-workers", default=2, help="DataLoader workers decoding images and projecting points.")
@click.option(
    "--scans-per-part", default=16, help="Scans per part: the unit of work, of crash recovery and of parallelism."
)
@click.option(
    "--on-error",
    type=click.Choice(["raise", "skip"]),
    default="raise",
    help="On bad input: stop with the file named, or record a skip in the store.",
)
@click.option(
    "--workers", "dask_workers", default=0, help="> 1: run parts on a local dask cluster of this many processes."
)
@click.option(
    "--scheduler", default=None, help="Address of a running dask scheduler: run parts as tasks on its workers."
)
@click.option("--max-scans", type=int, default=None, help="Only the first N scans of the split.")
@LAYOUT
@QUANTIZE_OPTION
@RECIPE
@click.option(
    "--redo-changed",
    is_flag=True,
    help="Compute again the committed parts whose dataset files changed since (size or modification time); "
    "without it, resuming over changed files is refused.",
)
@click.option(
    "--projection",
    type=click.Choice(PROJECTIONS),
    default="released",
    help="released: points moved to each camera as the released code does, rounding where it rounds (nuScenes: the "
    "devkit's float32 steps); float64: one float64 transform (pixels up to ~0.1 px apart on nuScenes).",
)
@click.option(
    "--set", "sets", multiple=True, help="Set any field of the extraction config, e.g. --set oracle_noise=0.5."
)
def extract_features_command(sets, **options):
    """Stage 1: run a frozen teacher over every camera image and write its targets into a Zarr
    feature store keyed by (scan, camera). Rerunning the same command finishes an interrupted
    store. Under torchrun, each rank takes parts rank::world."""
    store = extract(apply(ExtractConfig(**options), parse_sets(list(sets))))
    click.echo("\n".join(summary_lines(store)))


@click.command("verify")
@click.argument("store", type=click.Path(path_type=Path))
def verify_command(store):
    """Check a feature store fully: every part committed, every manifest row consistent with its
    arrays, every chunk present, of its recorded size, decodable and passing its CRC-32C, every
    array's SHA-256 as recorded at commit, no NaN/inf, the teacher as in the registry. Exits 1
    naming each problem. (Every command that reads a store runs the cheap part of this.)"""
    problems, counts = verify_store(store, {name: (spec.dim, spec.patch) for name, spec in TEACHERS.items()})
    for p in problems:
        click.echo(f"PROBLEM {p}")
    if problems:
        click.echo(f"{store}: {len(problems)} problem(s)")
        sys.exit(1)
    parts, entries, skipped, points = (counts[k] for k in ("parts", "entries", "skipped", "points"))
    what = f"{parts} parts, {entries} entries, {skipped} skipped, {points:,} points"
    click.echo(f"{store}: OK ({what})")
