import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import stages.cli.tools
from pipeline.datasets import open_dataset
from stages.cli import COMMANDS, main
from stages.cli.extract import LAYOUT
from stages.cli.extract import QUANTIZE_OPTION as QUANTIZE
from storage.layout import LAYOUTS
from storage.layout import QUANTIZE as STORE_QUANTIZE


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_not_blank(png):
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 20


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("synth", "check-dataset", "plot-projection"):
        assert command in result.output


def test_layout_choices_are_the_stores():
    """The CLI spells the choices out (importing the store module would slow every --help)."""

    choices = {
        p.name: set(p.type.choices)
        for p in (LAYOUT(lambda: None).__click_params__ + QUANTIZE(lambda: None).__click_params__)
    }
    assert choices == {"layout": set(LAYOUTS), "quantize": set(STORE_QUANTIZE)}


def test_synth_then_check_dataset_with_plots(tmp_path):
    root = tmp_path / "kitti"
    result = run(
        "synth",
        "--format",
        "semantickitti",
        "--out",
        root,
        "--scenes",
        1,
        "--frames",
        2,
        "--azimuth-steps",
        256,
        "--image-scale",
        0.4,
    )
    assert result.exit_code == 0, result.output
    result = run(
        "check-dataset",
        "--dataset",
        "semantickitti",
        "--root",
        root,
        "--split",
        "train",
        "--plot-dir",
        tmp_path / "plots",
    )
    assert result.exit_code == 0, result.output
    assert "semantickitti train: 2 scans" in result.output
    assert "image_2" in result.output and "road" in result.output and "problems: 0" in result.output
    plots = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["semantickitti-00-000000-depth.png", "semantickitti-00-000000-label.png"]
    for png in plots:
        assert_not_blank(png)


def test_check_dataset_lists_every_bad_file(nuscenes_copy):
    lidar = sorted((nuscenes_copy / "samples/LIDAR_TOP").iterdir())
    lidar[0].write_bytes(lidar[0].read_bytes()[:-3])
    image = sorted((nuscenes_copy / "samples/CAM_FRONT").iterdir())[1]
    image.write_bytes(image.read_bytes()[:300])
    result = run(
        "check-dataset", "--dataset", "nuscenes", "--root", nuscenes_copy, "--split", "mini_train", "--decode-images"
    )
    assert result.exit_code == 1
    assert "problems: 2" in result.output
    assert f"{lidar[0]}: size" in result.output
    assert f"{image}: corrupt or unreadable image" in result.output


def test_bad_root_is_a_one_line_error(tmp_path):
    result = run("check-dataset", "--dataset", "nuscenes", "--root", tmp_path, "--split", "mini_train")
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'v1.0-mini'}: nuScenes table folder for split 'mini_train' is missing" in result.output


def test_plot_projection(nuscenes_root, tmp_path):

    scan_id = open_dataset("nuscenes", nuscenes_root, "mini_train").scan_ids[0]
    out = tmp_path / "p.png"
    result = run(
        "plot-projection",
        "--dataset",
        "nuscenes",
        "--root",
        nuscenes_root,
        "--split",
        "mini_train",
        "--scan",
        scan_id,
        "--colour-by",
        "label",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert_not_blank(out)


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    result = run("runs", tmp_path / "nothing")
    assert result.exit_code == 1 and result.output == f"Error: {tmp_path / 'nothing'}: no such run or folder\n"

    def bug(paths):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(stages.cli.tools, "find_runs", bug)
    with pytest.raises(ValueError, match="a bug"):  # not turned into a one-line message
        run("runs", tmp_path)


def test_help_lists_every_command_without_loading_them():
    """`scalr --help` answers without importing any stage (torch, timm: seconds)."""
    code = (
        "import sys\nfrom stages.cli import main\n"
        "try: main(['--help'])\nexcept SystemExit: print('torch loaded:', 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert all(name in done.stdout for name in COMMANDS) and done.stdout.strip().endswith("torch loaded: False")
    for name in COMMANDS:  # each name is a command of its room
        assert main.get_command(None, name).name == name
