"""The `scalr` command line, on top of every stage: one subcommand per task, each a thin wrapper over
a typed config. The commands live by room (data.py, extract.py, student.py, downstream.py,
tools.py); a command's module is imported only when that command runs, so `scalr --help` answers
at once while each module imports what it uses at its top.

A `ScalrError` (a user's file, option or name that cannot be used) ends the command with its
one-line message and exit code 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys

import click

from pipeline import __version__
from pipeline.errors import ScalrError
from storage.atomic import DISK_PROBLEMS, disk_error_in

# name -> (module of stages/cli defining NAME_command, one line for `scalr --help`), in the order of the data flow
COMMANDS = {
    "synth": ("data", "Write a synthetic driving dataset in a real dataset's on-disk format."),
    "check-dataset": ("data", "Validate a dataset root: every scan, label and calibration; counts."),
    "plot-projection": ("data", "Draw one scan's points on its camera images, by depth or label."),
    "teachers": ("extract", "List the registered teachers and the weights each expects."),
    "extract-features": ("extract", "Stage 1: a frozen teacher's targets into a Zarr feature store."),
    "verify": ("extract", "Check a feature store fully: every chunk, checksum and manifest."),
    "inspect": ("tools", "Summarise a feature store; statistics and pictures of its targets."),
    "view": ("tools", "A live feature viewer in the browser (click a point: its similarity)."),
    "pretrain": ("student", "Stage 2: train a WaffleIron student against cached targets."),
    "convert": ("student", "Convert a student checkpoint between the released code's format and scalr's."),
    "probe-store": ("downstream", "What a teacher can teach: a linear probe of its cached targets (mIoU)."),
    "probe": ("downstream", "Linear probing of a pretrained backbone on labelled scans."),
    "finetune": ("downstream", "Finetune a pretrained backbone with a new head."),
    "train-scratch": ("downstream", "The supervised baseline: the same training from random init."),
    "evaluate": ("downstream", "mIoU of a segmentation model; robustness to corruptions."),
    "embed": ("downstream", "A student's per-point features of a split, as a feature store."),
    "plot-features": ("tools", "A student's feature correlation map and PCA colours on a scan."),
    "runs": ("tools", "One table of runs and their loss curves."),
    "bench": ("tools", "Benchmarks on your hardware (figures for the README)."),
    "demo": ("tools", "The whole method on the synthetic rigs, with a results table."),
}


class Commands(click.Group):
    """The command table above: each command imported from its module when it is run or asked
    for; user errors turned into one-line messages."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"stages.cli.{COMMANDS[name][0]}")  # the command's room, when asked for
        return getattr(module, name.replace("-", "_") + "_command")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ScalrError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:  # a disk refusing a write outside scalr's own writers (a picture, a JSON)
            if (refused := disk_error_in(err)) is None:
                raise
            where = refused.filename or "a file"
            raise click.ClickException(f"{where}: {DISK_PROBLEMS[refused.errno]}") from None
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated): workers stopped, nothing half committed
            signal_number = stop.signal if isinstance(stop, Terminated) else signal.SIGINT
            name = ctx.invoked_subcommand or "scalr"
            click.echo(
                f"scalr {name}: stopped by {signal.Signals(signal_number).name}; nothing was committed half: "
                "rerun the same command to resume",
                err=True,
            )
            sys.exit(128 + signal_number)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt), so that data
    loaders, writer threads and clusters shut down as they do on Ctrl-C."""

    def __init__(self, number: int):
        super().__init__(number)
        self.signal = number


def on_terminate(number, frame) -> None:
    raise Terminated(number)


@click.group(
    cls=Commands,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 120},
)
@click.version_option(__version__, prog_name="scalr")
@click.option("-v", "--verbose", count=True, help="Debug log output.")
def main(verbose: int) -> None:
    """scalr: distil frozen vision foundation models into lidar backbones (ScaLR).

    Stage 1 extracts teacher features once into a Zarr feature store; stage 2 trains lidar
    students from the store. Start with `scalr synth` to make a dataset with no download.
    """
    signal.signal(signal.SIGTERM, on_terminate)  # the command line is the program: it decides how it stops
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for package in ("pipeline", "stages", "storage"):  # scalr's own progress notes at INFO
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)
