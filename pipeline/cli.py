"""The `scalr` command line: one subcommand per stage, each a thin wrapper over a typed config."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.datasets import READERS
from pipeline.errors import DatasetError

DATASET = click.option("--dataset", type=click.Choice(sorted(READERS)), required=True, help="Dataset format of ROOT.")
ROOT = click.option("--root", type=click.Path(path_type=Path), required=True, help="Dataset root folder.")
SPLIT = click.option(
    "--split",
    default="train",
    show_default=True,
    help="Split: nuScenes train, val, mini_train, mini_val, paper_mini_train, paper_mini_val, test; SemanticKITTI train, val, test.",
)


def reports_bad_input(fn):
    """Bad input ends the command with its file and problem, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DatasetError as err:
            raise click.ClickException(str(err)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="scalr")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """scalr: distil frozen vision foundation models into lidar backbones (ScaLR).

    Stage 1 extracts teacher features once into a Zarr feature store; stage 2 trains lidar
    students from the store. Start with `scalr synth` to make a dataset with no download.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["nuscenes", "semantickitti"]), required=True, help="On-disk format to write.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Dataset root to create.")
@click.option("--seed", default=0, help="Random seed: the same seed writes the same dataset.")
@click.option("--scenes", type=int, default=None, help="nuScenes scenes / SemanticKITTI sequences [format default: 4 / 2].")
@click.option("--frames", type=int, default=None, help="Keyframes per scene / frames per sequence [default: 4 / 8].")
@click.option("--beams", type=int, default=None, help="Lidar beams [default: 32 / 64].")
@click.option("--azimuth-steps", type=int, default=None, help="Lidar rays per beam per revolution [default: 1024].")
@click.option("--image-scale", type=float, default=None, help="Camera resolution relative to the real sensor [default: 0.3 / 0.5].")
@click.option("--speed", type=float, default=10.0, help="Ego speed in m/s.")
def synth(fmt, out, seed, scenes, frames, beams, azimuth_steps, image_scale, speed):
    """Write a synthetic driving dataset (street scenes, ray-cast lidar, rendered cameras) in a
    real dataset's on-disk format, readable by the same reader as the real data."""
    from tqdm import tqdm

    from pipeline.synth import SynthConfig, generate, resolve

    cfg = resolve(fmt, SynthConfig(seed, scenes, frames, azimuth_steps, beams, image_scale, speed))
    with tqdm(total=cfg.scenes * cfg.frames, desc=f"synth {fmt}", unit="scan") as bar:
        summary = generate(fmt, out, cfg, progress=bar.update)
    click.echo(f"wrote {out}: " + json.dumps(summary))


@main.command("check-dataset")
@DATASET
@ROOT
@SPLIT
@click.option("--max-scans", type=int, default=None, help="Check only the first N scans.")
@click.option("--plot-dir", type=click.Path(path_type=Path), default=None, help="Draw points projected on the images of the first scan(s) here.")
@click.option("--plot-scans", default=1, help="How many scans to draw with --plot-dir.")
@click.option("--decode-images", is_flag=True, help="Decode every image fully (finds truncated files; slow) instead of reading headers.")
@reports_bad_input
def check_dataset(dataset, root, split, max_scans, plot_dir, plot_scans, decode_images):
    """Validate a dataset root: read every scan, its labels and calibration, and print counts
    (scans, points, visible points per camera, label histogram). Exits 1 if any file is bad."""
    from stages.check_dataset import CheckConfig, check_dataset

    report = check_dataset(CheckConfig(dataset, root, split, max_scans, plot_dir, plot_scans, decode_images))
    click.echo("\n".join(report.lines()))
    if report.errors:
        sys.exit(1)


@main.command("plot-projection")
@DATASET
@ROOT
@SPLIT
@click.option("--scan", "scan_id", required=True, help="Scan id (nuScenes lidar token, SemanticKITTI SS/FFFFFF).")
@click.option("--camera", default=None, help="One camera (default: all the scan's cameras).")
@click.option("--colour-by", type=click.Choice(["depth", "label"]), default="depth")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="PNG file to write.")
@reports_bad_input
def plot_projection(dataset, root, split, scan_id, camera, colour_by, out):
    """Draw one scan's points on its camera image(s), coloured by depth or label."""
    from pipeline.datasets import open_dataset
    from stages.plots import projection_figure

    ds = open_dataset(dataset, root, split)
    scan = ds[ds.index_of(scan_id)]
    cameras = [scan.camera(camera)] if camera else list(scan.cameras)
    views = [(c, ds.project(scan, c.name)) for c in cameras]
    click.echo(projection_figure(scan, views, colour_by, out, ds.meta.class_names))


if __name__ == "__main__":
    main()
