"""Faults and signals, with real processes and real files: a full disk, SIGTERM, a killed
checkpoint write, a read-only store, a viewer bound beyond this machine."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_same_store, tiny_config

from pipeline.synth import SynthConfig, generate
from stages.extract.extract import extract
from stages.tools.view import exposure_warning
from storage.atomic import HOST
from storage.checkpoint import save_checkpoint
from storage.verify import verify_store

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SCALR = f"{shlex.quote(sys.executable)} -m stages.cli"


@pytest.fixture(scope="module")
def kitti10(tmp_path_factory):
    root = tmp_path_factory.mktemp("kitti10")
    generate("semantickitti", root, SynthConfig(seed=1, scenes=1, frames=10, azimuth_steps=256, image_scale=0.3))
    return root


def extract_args(root, out, teacher="test-vit", size="32x64", workers=0):
    return (
        f"extract-features --dataset semantickitti --root {root} --split train --teacher {teacher} --random-init "
        f"--out {out} --scans-per-part 1 --num-workers {workers} --image-size {size} --layout points"
    )


def small_disk() -> str | None:
    """How to give a command a small disk: a private tmpfs (needs mount rights), else a file-size
    limit (EFBIG instead of ENOSPC); None when neither is possible."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
        return "tmpfs"
    return "ulimit" if shutil.which("bash") else None


def on_small_disk(folder: Path, kib: int, *commands: str) -> str:
    """Run `commands` (one after the other, each followed by its exit code) with `folder` on a disk
    of `kib` KiB; returns their output."""
    how = small_disk()
    if how is None:
        pytest.skip("no way to make a small disk here (neither unshare nor bash)")
    body = "; ".join(f"{c} 2>&1; echo rc=$?" for c in commands)
    if how == "tmpfs":
        script = f"mount -t tmpfs -o size={kib}k tmpfs {folder} && {body}"
        argv = ["unshare", "-m", "bash", "-c", script]
    else:
        argv = ["bash", "-c", f"ulimit -f {kib}; {body}"]
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=600).stdout


def test_a_full_disk_during_extraction_is_one_line_and_commits_nothing_half(kitti10, tmp_path):
    disk = tmp_path / "disk"
    out = disk / "s.zarr"
    said = on_small_disk(disk, 160, f"{SCALR} {extract_args(kitti10, out)}", f"{SCALR} verify {out}")
    problem = "no space left on device" if small_disk() == "tmpfs" else "file too large"
    lines = [line for line in said.splitlines() if line.startswith("Error:")]
    assert "rc=1" in said and len(lines) == 1 and f"{out}" in lines[0] and problem in lines[0], said
    assert "nothing was committed half" in lines[0] and "Traceback" not in said
    verified = said.split(f"verify {out}")[-1] if f"verify {out}" in said else said.split("rc=1", 1)[1]
    problems = [line for line in verified.splitlines() if line.startswith("PROBLEM")]
    assert problems and all("not committed" in p for p in problems), verified  # committed parts verify


def test_a_full_disk_during_a_checkpoint_write_keeps_the_last_one(tmp_path):
    disk = tmp_path / "disk"
    python = shlex.quote(sys.executable)
    write = (
        "import sys, torch; from pathlib import Path; from storage.checkpoint import save_checkpoint; "
        "path = Path(sys.argv[1]); save_checkpoint(path, {'w': torch.zeros(4)}); "
        "save_checkpoint(path, {'w': torch.zeros(200_000)})"
    )
    look = "import sys, os, torch; print('kept', tuple(torch.load(sys.argv[1])['w'].shape), os.listdir(sys.argv[2]))"
    last = disk / "last.pt"
    said = on_small_disk(
        disk, 256, f"{python} -c {shlex.quote(write)} {last}", f"{python} -c {shlex.quote(look)} {last} {disk}"
    )
    problem = "no space left on device" if small_disk() == "tmpfs" else "file too large"
    assert f"PathError: {last}: {problem}; nothing was committed half" in said, said
    assert "kept (4,) ['last.pt']" in said  # the last good checkpoint, and no temporary left


def test_sigterm_stops_workers_commits_nothing_half_and_says_how_to_resume(kitti10, tmp_path, one_thread):
    out = tmp_path / "s.zarr"
    args = shlex.split(extract_args(kitti10, out, teacher="dino-vits8", size="112x224", workers=2))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.cli", *args],
        env=ENV,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "manifest").glob("part-*.parquet")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    said = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, said
    assert "stopped by SIGTERM; nothing was committed half: rerun the same command to resume" in said
    assert "Traceback" not in said
    deadline = time.time() + 20  # the loader's workers are gone with it
    while time.time() < deadline and session_alive(proc.pid):
        time.sleep(0.1)
    assert not session_alive(proc.pid), "processes of the stopped extraction are still running"
    again = {"teacher": "dino-vits8", "image_size": (112, 224), "scans_per_part": 1, "layout": "points"}
    extract(tiny_config(kitti10, out, **again))  # the same command again
    assert verify_store(out)[0] == []
    extract(tiny_config(kitti10, tmp_path / "straight.zarr", **again))
    assert_same_store(out, tmp_path / "straight.zarr")


def session_alive(sid: int) -> bool:
    try:
        os.killpg(sid, 0)
    except ProcessLookupError:
        return False
    return True


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    path = tmp_path / "checkpoints/last.pt"
    path.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    stale = [path.with_name(f".last.pt.tmp-{HOST}-{pid}"), path.with_name(f".last.pt.tmp-{pid}")]  # now, 0.2.0
    for tmp in stale:
        tmp.write_bytes(b"half a checkpoint")
    other_host = path.with_name(f".last.pt.tmp-another-host-{pid}")
    other_host.write_bytes(b"someone else's")
    mine = path.with_name(f".last.pt.tmp-{HOST}-{os.getppid()}")  # a live process's (pytest's parent)
    mine.write_bytes(b"in progress")
    save_checkpoint(path, {"w": torch.zeros(2)})
    assert not any(t.exists() for t in stale) and other_host.exists() and mine.exists() and path.is_file()


def run_on_read_only(folder: Path, argv: list[str]) -> tuple[int, str]:
    """(exit code, output) of `argv` with `folder` not writable: a read-only bind mount in a private
    mount namespace for root (who writes anywhere else), else the folder's write permissions off."""
    command = " ".join(shlex.quote(a) for a in argv)
    if os.geteuid() == 0:
        if small_disk() != "tmpfs":
            pytest.skip("root without mount rights: no way to make a folder read-only here")
        script = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} {folder} && {command}"
        done = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, env=ENV)
        return done.returncode, done.stdout + done.stderr
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    try:
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        done = subprocess.run(argv, capture_output=True, text=True, env=ENV)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    return done.returncode, done.stdout + done.stderr


def test_extracting_into_a_read_only_unfinished_store_is_one_line(kitti10, tmp_path):
    out = tmp_path / "s.zarr"
    cfg = tiny_config(kitti10, out, scans_per_part=5)
    extract(cfg)
    (out / "manifest/part-000001.parquet").unlink()  # unfinished
    argv = [
        sys.executable,
        "-m",
        "stages.cli",
        "extract-features",
        "--dataset",
        "semantickitti",
        "--root",
        str(kitti10),
        "--teacher",
        "test-vit",
        "--random-init",
        "--image-size",
        "32x64",
        "--scans-per-part",
        "5",
        "--num-workers",
        "0",
        "--out",
        str(out),
    ]
    code, said = run_on_read_only(out, argv)
    assert code == 1 and "Traceback" not in said, said
    assert f"Error: {out / 'claims'}" in said and ("read-only file system" in said or "permission denied" in said)


def test_the_viewer_warns_when_it_serves_beyond_this_machine():
    assert exposure_warning("127.0.0.1") is None and exposure_warning("localhost") is None
    assert exposure_warning("::1") is None
    for host in ("0.0.0.0", "192.0.2.7", "myhost.example"):
        assert "anyone who can reach this machine's port can see" in exposure_warning(host)
