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

DATASET = click.option("--dataset", type=click.Choice(sorted(READERS)), required=True, help="Dataset format of ROOT.")
ROOT = click.option("--root", type=click.Path(path_type=Path), required=True, help="Dataset root folder.")
SPLIT = click.option(
    "--split",
    default="train",
    show_default=True,
    help="Split: nuScenes train, val, mini_train, mini_val, paper_mini_train, paper_mini_val, test; SemanticKITTI train, val, test.",
)


# Errors caused by the user's input: each names its file and problem, and ends the command with
# that one message and exit code 1, never a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = ("DatasetError", "StoreError", "CheckpointError", "WeightsError", "NonFiniteLoss", "ValueError", "FileNotFoundError", "KeyError")


def user_error_message(err: BaseException) -> str | None:
    """The message of a user-input error, or None. An error raised in a DataLoader worker reaches
    this process re-wrapped with the worker's traceback: its original message is recovered."""
    text = str(err)
    if "Original Traceback" in text:
        lines = text.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            name, sep, rest = lines[i].partition(": ")
            if sep and name.rsplit(".", 1)[-1] in USER_ERRORS and not name.startswith(" "):
                return "\n".join([rest, *lines[i + 1 :]]).strip()
        return None
    names = {cls.__name__ for cls in type(err).__mro__}
    if not names & set(USER_ERRORS):
        return None
    return text.strip('"').strip("'") if isinstance(err, KeyError) else text


def reports_bad_input(fn):
    """Bad input ends the command with its file and problem, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs below
            message = user_error_message(err)
            if message is None:
                raise
            raise click.ClickException(message) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="scalr")
@click.option("-v", "--verbose", count=True, help="Debug log output.")
def main(verbose: int) -> None:
    """scalr: distil frozen vision foundation models into lidar backbones (ScaLR).

    Stage 1 extracts teacher features once into a Zarr feature store; stage 2 trains lidar
    students from the store. Start with `scalr synth` to make a dataset with no download.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for package in ("pipeline", "stages", "storage"):  # scalr's own progress notes at INFO
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["nuscenes", "semantickitti", "pandaset", "semanticposs"]), required=True, help="On-disk format to write (pandaset: both Pandar64 and PandarGT).")
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
    from stages.tools.check_dataset import CheckConfig, check_dataset

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
    from stages.tools.pictures import projection_figure

    ds = open_dataset(dataset, root, split)
    scan = ds[ds.index_of(scan_id)]
    cameras = [scan.camera(camera)] if camera else list(scan.cameras)
    views = [(c, ds.project(scan, c.name)) for c in cameras]
    click.echo(projection_figure(scan, views, colour_by, out, ds.meta.class_names))


LAYOUT = click.option("--layout", type=click.Choice(["grid", "points"]), default="grid",
                      help="grid: each image's token grid, targets sampled when read (~8x smaller at 224x448 with a /14 teacher); points: per-point features.")
RECIPE = click.option("--recipe", type=click.Choice(["cvpr", "scalr-plus"]), default="cvpr",
                       help="Where the released CVPR code and ScaLR+ differ: cvpr resizes images without antialias and interpolates DINOv2's 518-px position embeddings at every forward; scalr-plus antialiases and resizes the embeddings once (timm).")
QUANTIZE = click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", help="int8 grids with a float32 scale per token (grid layout; 0.54x the float16 grid store, targets within cosine 0.999).")


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    try:
        return int(h), int(w)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not HEIGHTxWIDTH, e.g. 224x448") from None


@main.command("extract-features")
@DATASET
@ROOT
@SPLIT
@click.option("--teacher", required=True, help="Teacher name (see `scalr teachers`).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Feature store to create or finish (e.g. stores/nuscenes-train-dinov2-vitl14.zarr).")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Teacher weights file (original release checkpoint or timm state dict). Without --weights and --weights-dir: the teacher's weights by name from the Hugging Face cache (timm's repository; fetched once when online).")
@click.option("--weights-dir", type=click.Path(path_type=Path), default=None, help="Folder holding weights under their documented file names.")
@click.option("--random-init", is_flag=True, help="Random teacher weights, for tests and demos only; recorded in the store.")
@click.option("--seed", default=0, help="Seed of --random-init.")
@click.option("--image-size", default="224x448", callback=lambda c, p, v: parse_size(v), help="HEIGHTxWIDTH the images are resized to (ScaLR+: 448x896).")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Autocast precision of the teacher.")
@click.option("--batch-size", default=12, help="Images per teacher forward pass.")
@click.option("--num-workers", default=2, help="DataLoader workers decoding images and projecting points.")
@click.option("--scans-per-part", default=16, help="Scans per part: the unit of work, of crash recovery and of parallelism.")
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", help="On bad input: stop with the file named, or record a skip in the store.")
@click.option("--workers", "dask_workers", default=0, help="> 1: run parts on a local dask cluster of this many processes.")
@click.option("--scheduler", default=None, help="Address of a running dask scheduler: run parts as tasks on its workers.")
@click.option("--max-scans", type=int, default=None, help="Only the first N scans of the split.")
@LAYOUT
@QUANTIZE
@RECIPE
@reports_bad_input
def extract_features(dataset, root, split, teacher, out, weights, weights_dir, random_init, seed, image_size, device, precision, batch_size, num_workers, scans_per_part, on_error, dask_workers, scheduler, max_scans, layout, quantize, recipe):
    """Stage 1: run a frozen teacher over every camera image and write its targets into a Zarr
    feature store keyed by (scan, camera). Rerunning the same command finishes an interrupted
    store. Under torchrun, each rank takes parts rank::world."""
    from stages.extract.extract import ExtractConfig, extract
    from stages.tools.inspect import summary_lines

    cfg = ExtractConfig(
        dataset, root, split, teacher, out, weights, weights_dir, random_init, seed, image_size, device, precision,
        batch_size, num_workers, scans_per_part, on_error, None, None, dask_workers, scheduler, max_scans, layout, quantize, recipe,
    )  # fmt: skip
    store = extract(cfg)
    click.echo("\n".join(summary_lines(store)))


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
def verify(store):
    """Check a feature store fully: every part committed, every manifest row consistent with its
    arrays, every chunk present, of its recorded size, decodable and passing its CRC-32C, every
    array's SHA-256 as recorded at commit, no NaN/inf, the teacher as in the registry. Exits 1
    naming each problem. (Every command that reads a store runs the cheap part of this.)"""
    from stages.extract.teachers import TEACHERS
    from storage.verify import verify_store

    problems, counts = verify_store(store, {name: (spec.dim, spec.patch) for name, spec in TEACHERS.items()})
    for p in problems:
        click.echo(f"PROBLEM {p}")
    if problems:
        click.echo(f"{store}: {len(problems)} problem(s)")
        sys.exit(1)
    click.echo(f"{store}: OK ({counts['parts']} parts, {counts['entries']} entries, {counts['skipped']} skipped, {counts['points']:,} points)")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--scan", default=None, help="Show one scan's entries (with --plot: its pictures, every camera and a whole-scan bird's-eye view).")
@click.option("--camera", default=None, help="With --scan: only this camera.")
@click.option("--stats", is_flag=True, help="Feature statistics over the whole store (dask, out of core): norms and their histogram, zero-norm rows, channels, per-camera visible fractions.")
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path), default=None,
              help="Write PNGs here: with --scan the feature correlation map and PCA colours; with --stats the norm histogram.")
@click.option("--point", type=int, default=None, help="Query point of the correlation map: its index in the raw scan (the lidar file's order).")
@click.option("--class", "class_name", default=None, help="Query a point of this class (default: a car, when the dataset's labels are still there).")
@click.option("--pca-from", type=click.Path(path_type=Path), default=None, help="Fit the PCA colours on this store (same feature size) so two stores share one palette.")
@reports_bad_input
def inspect(store, scan, camera, stats, plot_dir, point, class_name, pca_from):
    """Summarise a feature store: teacher, image size, entries, points, bytes on disk, per-camera
    counts, skipped entries; one scan's entries with --scan (--camera for one); statistics with
    --stats; pictures of the cached targets with --plot, their PCA colours fitted once per store so
    they mean the same on every scan. Refuses a damaged or unfinished store (see `verify`)."""
    from stages.tools.inspect import InspectConfig, inspect

    if plot_dir and not (scan or stats):
        raise click.UsageError("--plot needs --scan (pictures of a scan) or --stats (the norm histogram)")
    if camera and not scan:
        raise click.UsageError("--camera needs --scan")
    click.echo("\n".join(inspect(InspectConfig(store, scan, camera, stats, plot_dir, point, class_name, pca_from))))


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", type=click.Choice(["auto", "scalr", "released"]), default="auto", help="auto: the other format than SRC's.")
@reports_bad_input
def convert(src, dst, to):
    """Convert a student checkpoint between the released ScaLR code's format (`model_points` /
    `net` state dicts of its WaffleIron segmenter; the published checkpoints) and scalr's. The
    weights are moved and reshaped, never changed: a round trip is bitwise. probe, finetune,
    evaluate and plot-features also read released checkpoints directly."""
    from stages.student.checkpoints import convert as run

    written = run(src, dst, to)
    click.echo(f"{dst}: {written} checkpoint written from {src}")


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="A student checkpoint: scalr's (pretraining or downstream) or the released ScaLR code's.")
@DATASET
@ROOT
@click.option("--split", default="val", help="Split to embed (every scan of it).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Store to create or finish (e.g. stores/nuscenes-val-wi768.zarr).")
@click.option("--voxel-size", type=float, default=None, help="Voxel size in metres; 0 keeps every point in the field of view. Default: the released evaluation's 0.1 m (first point of each voxel).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored feature type.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--max-scans", type=int, default=None, help="Only the first N scans of the split.")
@reports_bad_input
def embed(checkpoint, dataset, root, split, out, voxel_size, dtype, device, max_scans):
    """Write a student backbone's per-point features for every scan of a split into a feature
    store (one entry per scan, camera "lidar": the kept points, their point_index into the raw
    scan, their features), in eval mode, without augmentation or crop, on the dataset's released
    evaluation grid (PandaSet 512 x 512 cells over +-128 m; others 256 x 256 over +-64 m).
    inspect, verify, plain zarr and the pictures read it like a teacher store. Rerunning the same
    command finishes an interrupted store."""
    from stages.downstream.embed import EmbedConfig
    from stages.downstream.embed import embed as run

    store = run(EmbedConfig(checkpoint, dataset, root, out, split=split, voxel_size=voxel_size, dtype=dtype, device=device, max_scans=max_scans))
    click.echo(f"{out}: {store.plan.scans} scans embedded ({store.attrs['teacher']['dim']} dims, {dtype}); see `scalr inspect {out}`")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Also draw every run's loss curve on one figure (PNG).")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
@reports_bad_input
def runs(paths, plot, json_out):
    """One table of runs: RUN folders, or folders searched for runs (any folder with config.json).
    Per run: stage, student and its parameters, teachers (or the pretraining run it started from),
    datasets, steps, final loss, the best mIoU of the eval-*.json files in or under it, wall time."""
    from stages.tools.runs import find_runs, plot_losses, run_row, table_lines

    rows = [run_row(r) for r in find_runs(list(paths))]
    click.echo("\n".join(table_lines(rows)))
    if json_out:
        Path(json_out).write_text(json.dumps([{k: v for k, v in r.items() if k != "losses"} for r in rows], indent=2))
    if plot:
        click.echo(f"plot: {plot_losses(rows, plot)}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="A student checkpoint: also show its features on the store's raw scans (the dataset must still be where the store was extracted from).")
@click.option("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8080)
@click.option("--scan", default=None, help="Scan shown first (default: the store's first).")
@click.option("--point-size", type=float, default=0.12, help="Point size in metres.")
@reports_bad_input
def view(store, checkpoint, host, port, scan, point_size):
    """A live feature viewer in the browser: pick a scan and a camera, see its points in 3D
    coloured by the PCA of the cached features (or of a student's), click a point to colour the
    whole scan by the cosine similarity to its feature, in 3D and on the camera image (the paper's
    Fig. 1). Reads only the shown scan's chunks: a store of any size opens in seconds."""
    from stages.tools.view import ViewConfig, serve

    if not Path(store).exists():
        raise click.BadParameter(f"{store}: no such store", param_hint="STORE")
    serve(ViewConfig(store, checkpoint, host, port, scan, point_size))


@main.command("plot-features")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="A student checkpoint (pretraining or downstream).")
@DATASET
@ROOT
@SPLIT
@click.option("--scan", "scan_id", required=True)
@click.option("--camera", default=None, help="Only this camera (default: every camera of the scan, and a whole-scan bird's-eye view).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the PNGs.")
@click.option("--point", type=int, default=None, help="Query point: its index in the raw scan (it must survive the voxelisation).")
@click.option("--class", "class_name", default=None, help="Query a point of this class (default: a car).")
@reports_bad_input
def plot_features(checkpoint, dataset, root, split, scan_id, camera, out, point, class_name):
    """A student's feature correlation map (cosine similarity to a query point, as the paper's
    Fig. 1) and PCA of its features on a scan, in bird's-eye view and on the camera images (PCA
    fitted once for the checkpoint, on the split's first scan)."""
    from stages.tools.inspect import plot_student

    for path in plot_student(checkpoint, dataset, root, split, scan_id, camera, out, point, class_name):
        click.echo(f"plot: {path}")


@main.command()
@click.option("--store", "stores", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Feature store; repeat it. Stores of one dataset split (one per teacher) are joined, stores of different datasets mixed.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder (config, metrics, checkpoints, loss curve).")
@click.option("--student", default="WI-48-256", help="WaffleIron preset: WI-48-96, WI-48-256, WI-48-384, WI-48-768, WI-12-64 (CPU demos).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="TOML file of overrides ([optim] lr = 1e-3 ...).")
@click.option("--set", "sets", multiple=True, help="Override any config key, e.g. --set optim.lr=1e-3 --set model.drop_path=0.2.")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Global batch size (all ranks).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (the schedule still spans all epochs).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
@click.option("--device", default=None)
@click.option("--num-workers", type=int, default=None)
@click.option("--loss", type=click.Choice(["cosine", "ppkt"]), default=None, help="cosine: ScaLR; ppkt: contrastive baseline.")
@click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in --out instead of resuming from it.")
@reports_bad_input
def pretrain(stores, out, student, config_file, sets, epochs, batch_size, max_steps, precision, device, num_workers, loss, fresh):
    """Stage 2: train a WaffleIron student against cached teacher targets (no teacher, images or
    raw dataset needed). Resumes from --out's last checkpoint. Multi-GPU:
    torchrun --nproc-per-node N -m stages.cli pretrain ..."""
    from pipeline.config import layered
    from stages.student.pretrain import PretrainConfig, pretrain

    flags = {"train.epochs": epochs, "train.batch_size": batch_size, "train.max_steps": max_steps, "train.precision": precision,
             "train.device": device, "train.num_workers": num_workers, "loss.kind": loss}  # fmt: skip
    cfg = layered(PretrainConfig(tuple(stores), out, student).resolved(), config_file, sets, flags)
    summary = pretrain(cfg, resume=not fresh)
    click.echo(f"pretrained {summary['steps']} steps; checkpoint {summary['checkpoint']}; loss curve {Path(out) / 'loss.png'}")


def _segment_command(mode: str):
    @click.option("--dataset", type=click.Choice(sorted(READERS)), required=True, help="Labelled dataset format.")
    @ROOT
    @SPLIT
    @click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder.")
    @click.option("--labels", "labels_fraction", type=click.Choice(["1", "10", "100"]), default="100", help="Percent of the training scans with labels (every 100th / 10th scan of the sorted list).")
    @click.option("--frames-file", type=click.Path(path_type=Path), default=None,
                  help="The labelled scans: a text file of scan ids (one a line) or a released ScaLR .npy list (e.g. nuscenes-ratio_100-v_0.npy for 1%; read with pickle: use lists you trust). Give --labels too, for the schedule.")
    @click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="TOML file of overrides.")
    @click.option("--set", "sets", multiple=True, help="Override any config key, e.g. --set optim.lr=5e-4.")
    @click.option("--epochs", type=int, default=None)
    @click.option("--batch-size", type=int, default=None)
    @click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
    @click.option("--device", default=None)
    @click.option("--num-workers", type=int, default=None)
    @click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in --out.")
    def command(dataset, root, split, out, labels_fraction, frames_file, config_file, sets, epochs, batch_size, precision, device, num_workers, fresh, **extra):
        from pipeline.config import layered
        from stages.downstream.segment import SegmentConfig, train_segmentation

        flags = {"train.epochs": epochs, "train.batch_size": batch_size, "train.precision": precision, "train.device": device, "train.num_workers": num_workers}
        cfg = SegmentConfig.for_mode(mode, dataset=dataset, root=root, split=split, out=out, labels_fraction=int(labels_fraction) / 100, frames_file=frames_file, **extra)
        cfg = layered(cfg, config_file, sets, flags)
        summary = train_segmentation(cfg, resume=not fresh)
        click.echo(f"{mode}: {summary['steps']} steps; checkpoint {summary['checkpoint']}; evaluate with: scalr evaluate --checkpoint {summary['checkpoint']} ...")

    return reports_bad_input(command)


CHECKPOINT = click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="Pretraining checkpoint (RUN/checkpoints/last.pt).")
probe = main.command("probe", help="Linear probing: frozen pretrained backbone (eval mode), train a BatchNorm + linear head (AdamW lr 1e-3, wd 3e-3, 20 epochs (PandaSet 50), warm-up 2 epochs, cosine to 1e-5, as the released configs).")(CHECKPOINT(_segment_command("probe")))
finetune = main.command("finetune", help="Finetune a pretrained backbone with a new head: drop-path 0.2, layer-wise lr decay (0.99 at 100% labels, 0.95 below), AdamW lr 2e-3, wd 0, CE + Lovasz; 25 epochs, 2 warm-up (SemanticKITTI 10, 1; 1%/10% labels 45, 4), cosine to 0, as the released configs.")(
    CHECKPOINT(click.option("--layer-decay", type=float, default=None, help="Layer-wise lr decay (default by label fraction).")(_segment_command("finetune")))
)
scratch = main.command("train-scratch", help="Supervised baseline: the same training from a random initialisation.")(
    click.option("--student", default="WI-48-256", help="WaffleIron preset.")(_segment_command("scratch"))
)


@main.command()
@DATASET
@ROOT
@click.option("--split", default="val", show_default=True)
@CHECKPOINT
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON result (default: RUN/eval-DATASET-SPLIT.json).")
@click.option("--device", default="auto")
@click.option("--max-scans", type=int, default=None)
@click.option("--corruptions", default="", help="Robo3D-style corruptions to evaluate at 3 severities each: 'all' or a comma list of fog, wet_ground, snow, motion_blur, beam_missing, cross_talk, incomplete_echo, cross_sensor.")
@click.option("--seed", default=0, help="Seed of the corruptions.")
@click.option("--class-map", default=None, help="Across datasets: the shared-class map (default: the one registered for the two datasets).")
@reports_bad_input
def evaluate(dataset, root, split, checkpoint, out, device, max_scans, corruptions, seed, class_map):
    """mIoU (NaN-mean over classes) and accuracy of a segmentation model: predictions on the
    voxelised cloud, every point labelled by its nearest kept point, one confusion matrix. With
    --corruptions: mIoU per corruption and severity, CE, mCE (nuScenes: vs MinkUNet-18) and mRR."""
    from stages.downstream.evaluate import EvaluateConfig, evaluate, table_lines

    from pipeline.corruptions import CORRUPTIONS

    names = tuple(CORRUPTIONS) if corruptions == "all" else tuple(c.strip() for c in corruptions.split(",") if c.strip())
    result = evaluate(EvaluateConfig(dataset, root, checkpoint, split, out, device, max_scans, corruptions=names, seed=seed, class_map=class_map))
    click.echo("\n".join(table_lines(result)))


@main.command()
@click.option("--data", type=click.Path(path_type=Path), default=Path("data"), help="Where the synthetic datasets go.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/demo"), help="Folder for every figure and the results table.")
@click.option("--teacher", default="test-vit", help="Teacher (random init).")
@click.option("--student", default="WI-12-64")
@click.option("--pretrain-epochs", default=8)
@click.option("--probe-epochs", default=10)
@click.option("--no-scratch", is_flag=True, help="Skip the supervised-from-scratch reference.")
@reports_bad_input
def demo(data, out, teacher, student, pretrain_epochs, probe_epochs, no_scratch):
    """The whole method on the synthetic rigs: data, extraction, pretraining on the mix, linear
    probing of the distilled vs random-init student, a results table and pictures. Reruns reuse
    what is there."""
    from stages.tools.demo import DemoConfig, run_demo

    run_demo(DemoConfig(data=data, out=out, teacher=teacher, student=student, pretrain_epochs=pretrain_epochs, probe_epochs=probe_epochs, scratch=not no_scratch))


@main.group()
def bench():
    """Benchmarks on your hardware (figures for the README; never timed tests)."""


@bench.command("extract")
@DATASET
@ROOT
@SPLIT
@click.option("--teacher", default="dinov2-vits14", help="Teacher name.")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Weights file (default: random init; speed does not depend on weights).")
@click.option("--image-size", default="224x448", callback=lambda c, p, v: parse_size(v), help="HEIGHTxWIDTH.")
@click.option("--device", default="auto")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32")
@click.option("--batch-size", default=12)
@click.option("--num-workers", default=2)
@click.option("--scans-per-part", default=16)
@click.option("--max-scans", type=int, default=None, help="Only the first N scans.")
@click.option("--repeats", default=1, help="Repeat and keep the best time.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the figures as JSON here.")
@LAYOUT
@QUANTIZE
@RECIPE
@reports_bad_input
def bench_extract_cmd(dataset, root, split, teacher, weights, image_size, device, precision, batch_size, num_workers, scans_per_part, max_scans, repeats, json_out, layout, quantize, recipe):
    """Extraction: images/s, extraction time / bare teacher forward time on the same images
    (goal <= 1.15), store bytes on disk, per entry and / (points x dim x 2)."""
    from stages.tools.bench import BenchExtractConfig, bench_extract, report_lines
    from stages.extract.extract import ExtractConfig

    ecfg = ExtractConfig(dataset, root, split, teacher, Path("unused"), weights=weights, random_init=weights is None,
                         image_size=image_size, device=device, precision=precision, batch_size=batch_size,
                         num_workers=num_workers, scans_per_part=scans_per_part, max_scans=max_scans, layout=layout, quantize=quantize, recipe=recipe)  # fmt: skip
    result = bench_extract(BenchExtractConfig(ecfg, repeats))
    click.echo("\n".join(report_lines(result)))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))


@bench.command("open")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--repeats", default=3)
@reports_bad_input
def bench_open_cmd(store, repeats):
    """Opening a store: the time of the integrity gate every reader runs (no chunk decoded), and of
    what `scalr view` reads before its page shows (manifests, PCA colours, the first scan)."""
    from stages.tools.bench import bench_open, open_report_lines

    click.echo("\n".join(open_report_lines(bench_open(store, repeats))))


@bench.command("pretrain")
@click.option("--store", type=click.Path(path_type=Path), required=True, help="Feature store (its raw dataset must still be there for the online-teacher comparison).")
@click.option("--student", default="WI-48-256")
@click.option("--batch-size", default=2)
@click.option("--max-points", default=20000)
@click.option("--steps", default=6, help="Timed steps (after 2 warm-up steps).")
@click.option("--num-workers", default=2)
@click.option("--device", default="auto")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32")
@click.option("--teacher", "teachers", multiple=True, default=("dinov2-vits14", "dinov2-vitb14"), help="Teachers to run online for comparison (repeat).")
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
@reports_bad_input
def bench_pretrain_cmd(store, student, batch_size, max_points, steps, num_workers, device, precision, teachers, json_out):
    """Pretraining: step time with the real store loader / with batches in memory (goal <= 1.05),
    step time with a teacher run online / with cached targets, peak memory."""
    from stages.tools.bench import BenchPretrainConfig, bench_pretrain, pretrain_report_lines

    result = bench_pretrain(BenchPretrainConfig(store, student, batch_size, max_points, steps, num_workers, device, precision, tuple(teachers)))
    click.echo("\n".join(pretrain_report_lines(result)))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))


@main.command()
def teachers():
    """List the registered teachers and the weights file each expects."""
    from stages.extract.teachers import TEACHERS

    for spec in TEACHERS.values():
        weights = "random init only" if spec.random_init_only else f"{spec.weights_file}  ({spec.weights_source})"
        click.echo(f"{spec.name:<20}{spec.timm_name:<45}dim {spec.dim:<5}patch {spec.patch:<3}{weights}")


if __name__ == "__main__":
    main()
