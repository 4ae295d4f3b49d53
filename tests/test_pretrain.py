"""Stage 2: the student, sample pairing, training exactness (resume, DDP), stores-only training."""

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import reseal, tiny_store

from pipeline.synth import SynthConfig, generate
from pipeline.transforms import Augment, Grid, crop_nearest, voxel_downsample
from stages.cli import main
from stages.student.pretrain import PretrainConfig, build_student, pretrain
from stages.student.samples import DistillationData, EpochSampler, SampleConfig, collate
from stages.student.train import NonFiniteLoss, OptimConfig, TrainConfig
from stages.student.waffleiron import STUDENTS, WaffleIron, WaffleIronConfig, param_count_closed_form
from stages.tools.runs import find_runs, run_row, seed_lines, table_lines
from storage.checkpoint import load_checkpoint
from storage.feature_store import StoreError

SMALL_GRID = Grid(cell=4.0)  # 32 x 32 x 4 cells: fast on CPU
TINY = WaffleIronConfig(depth=3, width=16, grid_shape=SMALL_GRID.shape)
SAMPLE = SampleConfig(max_points=3000, grid=SMALL_GRID)


def tiny_cfg(stores, out, **train) -> PretrainConfig:
    return PretrainConfig(
        stores=tuple(stores),
        out=out,
        model=TINY,
        sample=SAMPLE,
        optim=OptimConfig(warmup_iters=2),
        train=TrainConfig(**{"batch_size": 2, "epochs": 2, "num_workers": 0, "log_every": 1, **train}),
    )


@pytest.fixture(scope="module")
def nus_store(tmp_path_factory):
    """8 training scans (2 scenes x 4 keyframes) of the nuScenes-format rig."""
    root = tmp_path_factory.mktemp("nus8")
    generate("nuscenes", root, SynthConfig(seed=5, scenes=3, frames=4, azimuth_steps=384, image_scale=0.2))
    return tiny_store(root, tmp_path_factory.mktemp("st") / "nus.zarr", "nuscenes", "mini_train")


@pytest.fixture(scope="module")
def kitti_store(kitti_root, tmp_path_factory):
    return tiny_store(kitti_root, tmp_path_factory.mktemp("st") / "kitti.zarr")


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_parameter_counts_match_the_closed_form(name):
    cfg = STUDENTS[name]
    with torch.device("meta"):
        n = sum(p.numel() for p in WaffleIron(cfg).parameters())
    assert n == param_count_closed_form(cfg.width, cfg.depth)
    if name == "WI-48-256":
        assert n == 6_835_732


def test_voxel_and_crop():
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-5, 5, (20000, 3)).astype(np.float32)
    keep = voxel_downsample(xyz, 1.0, rng)
    cells = (xyz - xyz.min(0)).astype(int)  # the released rule: voxels from the cloud's minimum
    assert (
        len(np.unique(cells[keep], axis=0)) == len(keep) == len(np.unique(cells, axis=0))
    )  # one point per occupied voxel
    first = voxel_downsample(xyz, 1.0, None)  # evaluation: the first point of each voxel in scan order
    _, expected = np.unique(cells, axis=0, return_index=True)
    assert first.tolist() == sorted(expected.tolist())
    crop = crop_nearest(xyz, 500, rng)
    assert len(crop) == 500 and len(np.unique(crop)) == 500
    d = np.linalg.norm(xyz - xyz[crop][:, None].mean(0), axis=1)
    assert np.median(d[crop]) < np.median(d)  # a compact neighbourhood, not a random subset


def test_points_and_targets_stay_paired(nus_store):
    """Through the random camera, voxelisation, crop, augmentation and field-of-view crop, each
    point keeps its own target; augmentation is a similarity transform of the stored points."""
    data = DistillationData(
        [nus_store.path], SampleConfig(max_points=2000, augment=Augment(rotate=False, flip=False, scale=(1.0, 1.0)))
    )
    aug = DistillationData([nus_store.path], SampleConfig(max_points=2000))
    for index in range(3):
        sample = data[(index, 123)]
        row, entry = nus_store.entry(sample["scan_id"], sample["camera"])
        pos = {int(p): i for i, p in enumerate(entry["point_index"])}
        rows = [pos[int(p)] for p in sample["point_index"]]
        assert np.array_equal(sample["targets"], entry["features"][rows])
        assert np.allclose(sample["feats"][:, 1:4], entry["points"][rows, :3])
        assert np.allclose(
            sample["feats"][:, 0], (entry["points"][rows, 3] - 18.742355) / 22.04632
        )  # nuScenes' released statistics
        assert np.allclose(sample["feats"][:, 4], np.linalg.norm(entry["points"][rows, :3], axis=1))
        assert len(sample["feats"]) <= 2000
        other = aug[(index, 123)]  # augmented: a similarity transform of the same stored points
        other_rows = [pos[int(p)] for p in other["point_index"][:60]]
        a, b = other["feats"][:60, 1:4], entry["points"][other_rows, :3]
        da, db = np.linalg.norm(a[:, None] - a[None], axis=-1), np.linalg.norm(b[:, None] - b[None], axis=-1)
        ratio = da[db > 1] / db[db > 1]
        assert np.allclose(ratio, ratio.mean(), atol=1e-3) and 0.9 <= ratio.mean() <= 1.1
        assert np.array_equal(other["targets"][:60], entry["features"][other_rows])


def test_sampler_is_deterministic_sharded_and_resumable():
    s = EpochSampler([5, 7], batch_size=4, seed=3)
    full = list(s.start(1))
    assert len(full) == 3 and all(len(b) == 4 for b in full)
    assert list(s.start(1, 2)) == full[2:]
    r0, r1 = (
        list(EpochSampler([5, 7], 4, 3, rank=0, world=2).start(1)),
        list(EpochSampler([5, 7], 4, 3, rank=1, world=2).start(1)),
    )
    assert [sorted(a + b) for a, b in zip(r0, r1)] == [sorted(b) for b in full]
    assert list(s.start(2)) != full
    balanced = EpochSampler([2, 98], batch_size=10, seed=0, balanced=True).order(0)
    assert 0.3 < (balanced < 2).mean() < 0.7  # the small dataset is drawn about half the time


def test_loss_decreases_and_the_run_is_recorded(nus_store, tmp_path):
    out = tmp_path / "run"
    summary = pretrain(tiny_cfg([nus_store.path], out, epochs=4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == len(rows) == 4 * 4
    assert np.mean([r["loss"] for r in rows[-4:]]) < np.mean([r["loss"] for r in rows[:4]])
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["model"]["width"] == 16 and record["stores"][0]["teacher"]["name"] == "test-vit"
    assert (out / "loss.png").stat().st_size > 10_000
    state = load_checkpoint(out / "checkpoints/last.pt")
    assert state["step"] == 16 and {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(state)


def test_resume_continues_exactly(nus_store, tmp_path, one_thread):
    straight = pretrain(tiny_cfg([nus_store.path], tmp_path / "a", epochs=2, num_workers=2))
    half = tiny_cfg([nus_store.path], tmp_path / "b", epochs=2, max_steps=5, num_workers=2)  # stops in epoch 1 of 2
    pretrain(half)
    assert load_checkpoint(tmp_path / "b/checkpoints/last.pt")["step"] == 5
    pretrain(replace(half, train=replace(half.train, max_steps=None)))  # the same command, resumed
    a, b = (
        load_checkpoint(Path(straight["checkpoint"]))["model"],
        load_checkpoint(tmp_path / "b/checkpoints/last.pt")["model"],
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_ddp_processes_agree_with_one(nus_store, tmp_path):
    """torchrun with 2 CPU processes (gloo, SyncBatchNorm, global-count loss normalisation)."""
    args = [
        "--store",
        str(nus_store.path),
        "--student",
        "WI-12-64",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--fresh",
        "--set",
        "model.depth=2",
        "--set",
        "model.width=16",
        "--set",
        f"model.grid_shape={list(SMALL_GRID.shape)}",
        "--set",
        "sample.grid.cell=4.0",
        "--set",
        "sample.max_points=2000",
        "--set",
        "optim.warmup_iters=1",
        "--set",
        "train.log_every=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for world, name in ((1, "one"), (2, "two")):
        bin_dir = Path(sys.executable).parent  # the README's command: torchrun ... --no-python scalr pretrain ...
        cmd = [
            str(bin_dir / "torchrun"),
            "--standalone",
            f"--nproc-per-node={world}",
            "--no-python",
            str(bin_dir / "scalr"),
            "pretrain",
            "--out",
            str(tmp_path / name),
            *args,
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    assert len(losses[1]) == 2 and np.allclose(losses[0], losses[1], rtol=1e-5)
    # Same function: parameters whose true gradient is zero (a BatchNorm bias right before
    # another BatchNorm) drift with float noise under Adam, so compare outputs, not raw weights.
    states = [load_checkpoint(tmp_path / name / "checkpoints/last.pt") for name in ("one", "two")]
    assert states[1]["step"] == 2
    cfg = PretrainConfig(**{**vars(tiny_cfg([nus_store.path], tmp_path)), "model": replace(TINY, depth=2)}).resolved()
    data = DistillationData([nus_store.path], replace(SAMPLE, max_points=2000))
    batch = collate([data[(i, 9)] for i in range(2)])
    outputs = []
    for state in states:
        model = build_student(cfg.model, data.target_dim, "auto", 2048, 1)
        model.load_state_dict(state["model"])
        outputs.append(model.eval()(batch).detach())
    assert torch.allclose(outputs[0], outputs[1], atol=1e-3 * outputs[0].abs().max().item())


def test_pretraining_needs_only_the_store(kitti_root, tmp_path):
    data = Path(shutil.copytree(kitti_root, tmp_path / "data"))
    store = tiny_store(data, tmp_path / "s.zarr")
    shutil.rmtree(data)
    summary = pretrain(tiny_cfg([store.path], tmp_path / "run", epochs=1))
    assert summary["steps"] == 1


def test_multi_teacher_joins_and_multi_dataset_mixes(kitti_root, nus_store, kitti_store, tmp_path):
    """Stores of different layouts join too: here test-vit in the grid layout, DINO per point."""
    dino = tiny_store(kitti_root, tmp_path / "kitti-dino.zarr", teacher="dino-vits8", layout="points")
    assert (kitti_store.layout, dino.layout) == ("grid", "points")
    data = DistillationData([kitti_store.path, dino.path], SAMPLE)
    assert data.target_dim == 64 + 384 and [g.teachers for g in data.groups] == [["dino-vits8", "test-vit"]]
    sample = data[(0, 5)]
    assert sample["targets"].shape[1] == 448
    run = tmp_path / "mt"
    pretrain(tiny_cfg([kitti_store.path, dino.path], run, epochs=1))
    head = {
        k: v.shape for k, v in load_checkpoint(run / "checkpoints/last.pt")["model"].items() if k.startswith("head")
    }
    assert head["head.2.weight"] == (448, 2048)  # auto head: a 2-layer MLP for several teachers
    mixed = DistillationData([nus_store.path, kitti_store.path], SAMPLE)
    assert sorted(mixed.sizes) == [2, 8] and {g.name for g in mixed.groups} == {
        "nuscenes/mini_train",
        "semantickitti/train",
    }
    with pytest.raises(StoreError, match="every dataset needs the same teachers"):
        DistillationData([nus_store.path, kitti_store.path, dino.path], SAMPLE)


def test_stores_that_cannot_be_joined(kitti_root, kitti_store, tmp_path):
    big = tiny_store(kitti_root, tmp_path / "big.zarr", image_size=(64, 128))
    with pytest.raises(StoreError, match="cannot be joined .* image_size differs"):
        DistillationData([kitti_store.path, big.path], SAMPLE)
    plus = tiny_store(kitti_root, tmp_path / "plus.zarr", teacher="dino-vits8", recipe="scalr-plus")
    with pytest.raises(StoreError, match="cannot be joined .* recipe differs"):
        DistillationData([kitti_store.path, plus.path], SAMPLE)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(kitti_root, tmp_path):

    store = tiny_store(kitti_root, tmp_path / "s.zarr")
    run = tmp_path / "run"
    pretrain(tiny_cfg([store.path], run, epochs=1))
    good = load_checkpoint(run / "checkpoints/last.pt")
    arr = zarr.open_array(str(store.path / "parts/part-000000/grids"), mode="r+")
    arr[:] = np.full(arr.shape, np.inf, dtype=np.float16)
    reseal(store.path, 0, keep_sha256=False)  # as if a teacher had produced these
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 2 .* last good checkpoint is .*last.pt"):
        pretrain(tiny_cfg([store.path], run, epochs=2), accept_changes=True)  # one more epoch
    after = load_checkpoint(run / "checkpoints/last.pt")
    assert after["step"] == good["step"] == 1


def test_cli_overrides_and_config_file(nus_store, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        "[optim]\nlr = 1e-3\n[model]\ndepth = 2\nwidth = 8\ngrid_shape = [32, 32, 4]\n[sample.grid]\ncell = 4.0\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "pretrain",
            "--store",
            str(nus_store.path),
            "--out",
            str(out),
            "--student",
            "WI-12-64",
            "--config",
            str(toml),
            "--set",
            "sample.max_points=1000",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["optim"]["lr"] == 1e-3 and cfg["model"]["width"] == 8 and cfg["sample"]["max_points"] == 1000
    bad = CliRunner().invoke(
        main, ["pretrain", "--store", str(nus_store.path), "--out", str(out), "--set", "optim.lrr=1"]
    )
    assert bad.exit_code == 1 and "unknown config key 'optim.lrr'" in bad.output


def test_ppkt_baseline_loss_trains(nus_store, tmp_path):
    cfg = tiny_cfg([nus_store.path], tmp_path / "ppkt", epochs=1)
    summary = pretrain(replace(cfg, loss=replace(cfg.loss, kind="ppkt", ppkt_pairs=256)))
    assert summary["steps"] == 4


def test_training_leaves_the_callers_random_state_as_it_was(nus_store, tmp_path):
    """The run's random state lives in a fork of torch's generator (seeded, saved, restored on
    resume): pretraining, and building its student, change nothing the caller sees."""
    before = torch.get_rng_state()
    pretrain(tiny_cfg([nus_store.path], tmp_path / "run", epochs=1))
    assert torch.equal(before, torch.get_rng_state())


def test_runs_that_differ_only_in_seed_are_grouped(nus_store, tmp_path):
    """The paper reports the std over three pretrainings: `--seed`, and `scalr runs` groups the runs
    that differ only in it (mean +- std, n)."""
    args = ["pretrain", "--store", nus_store.path, "--student", "WI-12-64", "--epochs", "1", "--batch-size", "2"]
    tiny = [
        *("--num-workers", "0", "--set", "model.depth=2", "--set", "model.width=8", "--set", "sample.max_points=1000")
    ]
    tiny += ["--set", f"model.grid_shape={list(SMALL_GRID.shape)}", "--set", "sample.grid.cell=4.0"]
    for seed in (0, 1, 2):
        result = CliRunner().invoke(
            main, [str(a) for a in (*args, *tiny, "--out", tmp_path / f"seed{seed}", "--seed", seed)]
        )
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "seed2/config.json").read_text())["config"]["train"]["seed"] == 2
    pretrain(tiny_cfg([nus_store.path], tmp_path / "other", epochs=2))  # another experiment: not grouped
    rows = [run_row(r) for r in find_runs([tmp_path])]
    lines = seed_lines(rows)
    losses = [r["final_loss"] for r in rows if Path(r["run"]).name.startswith("seed")]
    assert len(lines) == 2 and "pretrain WI-2-8, seeds 0, 1, 2" in lines[1], lines
    assert f"final loss {statistics.mean(losses):.4g} +- {statistics.stdev(losses):.2g} (n=3)" in lines[1]
    assert "\n".join(lines) in "\n".join(table_lines(rows))
