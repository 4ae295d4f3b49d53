"""Commands on datasets as they lie on disk: make a synthetic one, check one, draw its projection."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from tqdm import tqdm

from pipeline.datasets import open_dataset
from pipeline.synth import SynthConfig, generate, resolve
from stages.cli.options import DATASET, ROOT, SPLIT
from stages.tools.check_dataset import CheckConfig, check_dataset
from stages.tools.pictures import projection_figure


@click.command("synth")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["nuscenes", "semantickitti", "pandaset", "semanticposs"]),
    required=True,
    help="On-disk format to write (pandaset: both Pandar64 and PandarGT).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Dataset root to create.")
@click.option("--seed", default=0, help="Random seed: the same seed writes the same dataset.")
@click.option(
    "--scenes", type=int, default=None, help="nuScenes scenes / SemanticKITTI sequences [format default: 4 / 2]."
)
@click.option("--frames", type=int, default=None, help="Keyframes per scene / frames per sequence [default: 4 / 8].")
@click.option("--beams", type=int, default=None, help="Lidar beams [default: 32 / 64].")
@click.option("--azimuth-steps", type=int, default=None, help="Lidar rays per beam per revolution [default: 1024].")
@click.option(
    "--image-scale",
    type=float,
    default=None,
    help="Camera resolution relative to the real sensor [default: 0.3 / 0.5].",
)
@click.option("--speed", type=float, default=10.0, help="Ego speed in m/s.")
@click.option("--overwrite", is_flag=True, help="Replace a synthetic dataset already in --out (never other files).")
def synth_command(fmt, out, seed, scenes, frames, beams, azimuth_steps, image_scale, speed, overwrite):
    """Write a synthetic driving dataset (street scenes, ray-cast lidar, rendered cameras) in a
    real dataset's on-disk format, readable by the same reader as the real data."""
    cfg = resolve(fmt, SynthConfig(seed, scenes, frames, azimuth_steps, beams, image_scale, speed))
    with tqdm(total=cfg.scenes * cfg.frames, desc=f"synth {fmt}", unit="scan") as bar:
        summary = generate(fmt, out, cfg, progress=bar.update, overwrite=overwrite)
    click.echo(f"wrote {out}: " + json.dumps(summary))


@click.command("check-dataset")
@DATASET
@ROOT
@SPLIT
@click.option("--max-scans", type=int, default=None, help="Check only the first N scans.")
@click.option(
    "--plot-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Draw points projected on the images of the first scan(s) here.",
)
@click.option("--plot-scans", default=1, help="How many scans to draw with --plot-dir.")
@click.option(
    "--decode-images",
    is_flag=True,
    help="Decode every image fully (finds truncated files; slow) instead of reading headers.",
)
def check_dataset_command(**fields):
    """Validate a dataset root: read every scan, its labels and calibration, and print counts
    (scans, points, visible points per camera, label histogram). Exits 1 if any file is bad."""
    report = check_dataset(CheckConfig(**fields))
    click.echo("\n".join(report.lines()))
    if report.errors:
        sys.exit(1)


@click.command("plot-projection")
@DATASET
@ROOT
@SPLIT
@click.option("--scan", "scan_id", required=True, help="Scan id (nuScenes lidar token, SemanticKITTI SS/FFFFFF).")
@click.option("--camera", default=None, help="One camera (default: all the scan's cameras).")
@click.option("--colour-by", type=click.Choice(["depth", "label"]), default="depth")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="PNG file to write.")
def plot_projection_command(dataset, root, split, scan_id, camera, colour_by, out):
    """Draw one scan's points on its camera image(s), coloured by depth or label."""
    ds = open_dataset(dataset, root, split)
    scan = ds[ds.index_of(scan_id)]
    cameras = [scan.camera(camera)] if camera else list(scan.cameras)
    views = [(c, ds.project(scan, c.name)) for c in cameras]
    click.echo(projection_figure(scan, views, colour_by, out, ds.meta.class_names))
