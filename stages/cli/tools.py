"""Commands around the stages: inspecting stores and runs, pictures, the live viewer, benchmarks,
the demo."""

from __future__ import annotations

import json
from pathlib import Path

import click

from stages.cli.extract import LAYOUT, QUANTIZE_OPTION, RECIPE
from stages.cli.options import (
    DATASET,
    JSON_OUT,
    ROOT,
    SPLIT,
    STUDENT_RECIPE,
    device_option,
    image_size_option,
    precision_option,
    recipe_option,
)
from stages.extract.extract import ExtractConfig
from stages.tools.bench_extract import BenchExtractConfig, bench_extract, bench_open, open_report_lines, report_lines
from stages.tools.bench_pretrain import BenchPretrainConfig, bench_pretrain, pretrain_report_lines
from stages.tools.demo import DemoConfig, run_demo
from stages.tools.inspect import InspectConfig, inspect
from stages.tools.pictures import plot_student
from stages.tools.runs import find_runs, plot_losses, run_row, table_lines
from stages.tools.view import ViewConfig, serve


@click.command("inspect")
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--scan",
    default=None,
    help="Show one scan's entries (with --plot: its pictures, every camera and a whole-scan bird's-eye view).",
)
@click.option("--camera", default=None, help="With --scan: only this camera.")
@click.option(
    "--stats",
    is_flag=True,
    help="Feature statistics over the whole store (dask, out of core): norms and their histogram, zero-norm rows, "
    "channels, "
    "per-camera visible fractions.",
)
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Write PNGs here: with --scan the feature correlation map and PCA colours; with --stats the norm histogram.",
)
@click.option(
    "--point",
    type=int,
    default=None,
    help="Query point of the correlation map: its index in the raw scan (the lidar file's order).",
)
@click.option(
    "--class",
    "class_name",
    default=None,
    help="Query a point of this class (default: a car, when the dataset's labels are still there).",
)
@click.option(
    "--pca-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Fit the PCA colours on this store (same feature size) so two stores share one palette.",
)
def inspect_command(**fields):
    """Summarise a feature store: teacher, image size, entries, points, bytes on disk, per-camera
    counts, skipped entries; one scan's entries with --scan (--camera for one); statistics with
    --stats; pictures of the cached targets with --plot, their PCA colours fitted once per store so
    they mean the same on every scan. Refuses a damaged or unfinished store (see `verify`)."""
    if fields["plot_dir"] and not (fields["scan"] or fields["stats"]):
        raise click.UsageError("--plot needs --scan (pictures of a scan) or --stats (the norm histogram)")
    if fields["camera"] and not fields["scan"]:
        raise click.UsageError("--camera needs --scan")
    click.echo("\n".join(inspect(InspectConfig(**fields))))


@click.command("view")
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="A student checkpoint: also show its features on the store's raw scans (the dataset must still be where the "
    "store was extracted from).",
)
@click.option("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8080)
@click.option("--scan", default=None, help="Scan shown first (default: the store's first).")
@click.option("--point-size", type=float, default=0.12, help="Point size in metres.")
@STUDENT_RECIPE
def view_command(**fields):
    """A live feature viewer in the browser: pick a scan and a camera, see its points in 3D
    coloured by the PCA of the cached features (or of a student's), click a point to colour the
    whole scan by the cosine similarity to its feature, in 3D and on the camera image (the paper's
    Fig. 1). Reads only the shown scan's chunks: a store of any size opens in seconds."""
    if not Path(fields["store"]).exists():
        raise click.BadParameter(f"{fields['store']}: no such store", param_hint="STORE")
    serve(ViewConfig(**fields))


@click.command("plot-features")
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    required=True,
    help="A student checkpoint (pretraining or downstream).",
)
@DATASET
@ROOT
@SPLIT
@click.option("--scan", "scan_id", required=True)
@click.option(
    "--camera",
    default=None,
    help="Only this camera (default: every camera of the scan, and a whole-scan bird's-eye view).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the PNGs.")
@click.option(
    "--point", type=int, default=None, help="Query point: its index in the raw scan (it must survive the voxelisation)."
)
@click.option("--class", "class_name", default=None, help="Query a point of this class (default: a car).")
@STUDENT_RECIPE
def plot_features_command(checkpoint, dataset, root, split, scan_id, camera, out, point, class_name, recipe):
    """A student's feature correlation map (cosine similarity to a query point, as the paper's
    Fig. 1) and PCA of its features on a scan, in bird's-eye view and on the camera images (PCA
    fitted once for the checkpoint, on the split's first scan)."""
    for path in plot_student(checkpoint, dataset, root, split, scan_id, camera, out, point, class_name, recipe):
        click.echo(f"plot: {path}")


@click.command("runs")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    default=None,
    help="Also draw every run's loss curve on one figure (PNG).",
)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
def runs_command(paths, plot, json_out):
    """One table of runs: RUN folders, or folders searched for runs (any folder with config.json).
    Per run: stage, student and its parameters, teachers (or the pretraining run it started from),
    datasets, steps, final loss, the best mIoU of the eval-*.json files in or under it, wall time."""
    rows = [run_row(r) for r in find_runs(list(paths))]
    click.echo("\n".join(table_lines(rows)))
    if json_out:
        Path(json_out).write_text(json.dumps([{k: v for k, v in r.items() if k != "losses"} for r in rows], indent=2))
    if plot:
        click.echo(f"plot: {plot_losses(rows, plot)}")


@click.command("demo")
@click.option("--data", type=click.Path(path_type=Path), default=Path("data"), help="Where the synthetic datasets go.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("out/demo"),
    help="Folder for every figure and the results table.",
)
@click.option("--teacher", default="test-vit", help="Teacher (random init).")
@click.option("--student", default="WI-12-64")
@click.option("--pretrain-epochs", default=8)
@click.option("--probe-epochs", default=10)
@click.option("--no-scratch", is_flag=True, help="Skip the supervised-from-scratch reference.")
@recipe_option("The released recipe of every step: cvpr (ScaLR) or scalr-plus (ScaLR+).", default="cvpr")
@precision_option(
    default="fp32", help_text="Autocast precision of training and evaluation (bf16 is slow on most CPUs)."
)
def demo_command(no_scratch, **fields):
    """The whole method on the synthetic rigs: data, extraction, pretraining on the mix, linear
    probing of the distilled vs random-init student, a results table and pictures. Reruns reuse
    what is there."""
    run_demo(DemoConfig(scratch=not no_scratch, **fields))


@click.group("bench")
def bench_command():
    """Benchmarks on your hardware (figures for the README; never timed tests)."""


@bench_command.command("extract")
@DATASET
@ROOT
@SPLIT
@click.option("--teacher", default="dinov2-vits14", help="Teacher name.")
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    default=None,
    help="Weights file (default: random init; speed does not depend on weights).",
)
@image_size_option("HEIGHTxWIDTH.")
@device_option()
@precision_option()
@click.option("--batch-size", default=12)
@click.option("--num-workers", default=2)
@click.option("--scans-per-part", default=16)
@click.option("--max-scans", type=int, default=None, help="Only the first N scans.")
@click.option("--repeats", default=1, help="Repeat and keep the best time.")
@JSON_OUT
@LAYOUT
@QUANTIZE_OPTION
@RECIPE
def bench_extract_command(repeats, json_out, **fields):
    """Extraction: images/s, extraction time / bare teacher forward time on the same images
    (goal <= 1.15), store bytes on disk, per entry and / (points x dim x 2)."""
    ecfg = ExtractConfig(out=Path("unused"), random_init=fields["weights"] is None, **fields)
    result = bench_extract(BenchExtractConfig(ecfg, repeats))
    click.echo("\n".join(report_lines(result)))
    write_json_out(json_out, result)


@bench_command.command("open")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--repeats", default=3)
def bench_open_command(store, repeats):
    """Opening a store: the time of the integrity gate every reader runs (no chunk decoded), and of
    what `scalr view` reads before its page shows (manifests, PCA colours, the first scan)."""
    click.echo("\n".join(open_report_lines(bench_open(store, repeats))))


@bench_command.command("pretrain")
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    required=True,
    help="Feature store (its raw dataset must still be there for the online-teacher comparison).",
)
@click.option("--student", default="WI-48-256")
@click.option("--batch-size", default=2)
@click.option("--max-points", default=20000)
@click.option("--steps", default=6, help="Timed steps (after 2 warm-up steps).")
@click.option("--num-workers", default=2)
@device_option()
@precision_option()
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    default=("dinov2-vits14", "dinov2-vitb14"),
    help="Teachers to run online for comparison (repeat).",
)
@JSON_OUT
def bench_pretrain_command(json_out, teachers, **fields):
    """Pretraining: step time with the real store loader / with batches in memory (goal <= 1.05),
    step time with a teacher run online / with cached targets, peak memory."""
    result = bench_pretrain(BenchPretrainConfig(teachers=tuple(teachers), **fields))
    click.echo("\n".join(pretrain_report_lines(result)))
    write_json_out(json_out, result)


def write_json_out(path: Path | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
