"""Two processes, one store or one run: real processes, real files. Parts are claimed before they
are written (a lock that dies with its writer), a committed part is never rewritten, a run is
trained by one process at a time, and a resume with other settings is refused unless asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner
from helpers import assert_same_store, tiny_config, tiny_store

from pipeline.datasets import open_dataset
from pipeline.errors import PathError
from pipeline.synth import SynthConfig, generate
from pipeline.transforms import Grid
from stages.cli import main
from stages.extract.extract import extract, store_attributes
from stages.extract.registry import get_spec
from stages.extract.weights import resolve_weights
from stages.student.pretrain import PretrainConfig, pretrain
from stages.student.samples import SampleConfig
from stages.student.train import OptimConfig, TrainConfig
from stages.student.waffleiron import WaffleIronConfig
from storage.feature_store import FeatureStore, PartWriter, StoreError
from storage.verify import verify_store

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCALR = [sys.executable, "-m", "stages.cli"]


@pytest.fixture(scope="module")
def kitti10(tmp_path_factory):
    root = tmp_path_factory.mktemp("kitti10")
    generate("semantickitti", root, SynthConfig(seed=1, scenes=1, frames=10, azimuth_steps=256, image_scale=0.3))
    return root


def extract_args(root, out):
    return [
        *("--dataset", "semantickitti", "--root", root, "--split", "train", "--teacher", "dino-vits8"),
        *("--random-init", "--out", out, "--scans-per-part", "1", "--num-workers", "0", "--image-size", "112x224"),
    ]


def start(*args, log=None):
    return subprocess.Popen(
        [*SCALR, *map(str, args)], env=ENV, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


def wait_for(condition, seconds=120.0):
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.01)
    assert condition(), "timed out"


def test_two_extractions_into_one_store_share_its_parts(kitti10, tmp_path, one_thread):
    """The second writer starts once the first has committed a part: it skips committed parts and
    parts the first holds, and the store equals one written by a single process."""
    out = tmp_path / "shared.zarr"
    first = start("extract-features", *extract_args(kitti10, out))
    wait_for(lambda: list((out / "manifest").glob("part-*.parquet")))
    with open(tmp_path / "second.log", "w") as log:
        second = start("extract-features", *extract_args(kitti10, out), log=log)
        assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    assert verify_store(out)[0] == []
    straight = tiny_config(
        kitti10, tmp_path / "straight.zarr", teacher="dino-vits8", image_size=(112, 224), scans_per_part=1
    )
    extract(straight)
    assert_same_store(out, straight.out)


def test_a_part_held_by_another_process_is_waited_for_until_its_writer_dies(kitti10, tmp_path):
    cfg = tiny_config(kitti10, tmp_path / "s.zarr", scans_per_part=5)
    ds = open_dataset("semantickitti", kitti10, "train")
    weights = resolve_weights(get_spec("test-vit"), None, None, True)
    store = FeatureStore.create_or_open(cfg.out, store_attributes(cfg, ds, ds.scan_ids, weights))
    (store.path / "claims").mkdir()
    claim = store.path / "claims/part-000001.lock"
    code = (
        f"import time; from storage.locks import try_lock; lock = try_lock({str(claim)!r}); "
        "print('held', flush=True); time.sleep(2)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    extract(cfg)  # writes part 0, then waits for part 1 until its holder is gone (it never committed it)
    assert holder.poll() is not None, "part 1 was written while another process held it"
    assert verify_store(store.path)[0] == [] and FeatureStore(store.path).committed_parts() == [0, 1]


def test_a_committed_part_is_never_rewritten(kitti10, tmp_path):
    cfg = tiny_config(kitti10, tmp_path / "s.zarr", scans_per_part=5)
    store = extract(cfg)
    with pytest.raises(StoreError, match="part-000000.parquet: part 0 is committed and is never rewritten"):
        PartWriter(FeatureStore(store.path, check=False), 0)
    assert verify_store(store.path)[0] == []


TINY = WaffleIronConfig(depth=2, width=16, grid_shape=(32, 32, 4))


def pretrain_args(store, out, epochs):
    return [
        *("pretrain", "--store", store, "--out", out, "--student", "WI-12-64", "--epochs", epochs),
        *("--batch-size", "2", "--num-workers", "0", "--set", "model.depth=2", "--set", "model.width=16"),
        *("--set", "model.grid_shape=[32, 32, 4]", "--set", "sample.grid.cell=4.0", "--set", "sample.max_points=1000"),
    ]


@pytest.fixture(scope="module")
def store(kitti10, tmp_path_factory):
    cfg = tiny_config(kitti10, tmp_path_factory.mktemp("s") / "s.zarr")
    return extract(cfg)


def test_a_run_is_trained_by_one_process_at_a_time(store, tmp_path):
    out = tmp_path / "run"
    first = start(*pretrain_args(store.path, out, 40))
    wait_for(lambda: (out / "metrics.jsonl").is_file())
    result = CliRunner().invoke(main, [str(a) for a in pretrain_args(store.path, out, 40)])
    assert result.exit_code == 1 and f"Error: {out}: is being trained by " in result.output and " pid " in result.output
    assert first.wait(timeout=300) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 40 * 5  # 10 scans / batch 2


def tiny(store, out, **train) -> PretrainConfig:
    return PretrainConfig(
        (store.path,),
        out,
        model=TINY,
        sample=SampleConfig(max_points=1000, grid=Grid(cell=4.0)),
        optim=OptimConfig(warmup_iters=2),
        train=TrainConfig(**{"batch_size": 2, "epochs": 1, "num_workers": 0, **train}),
    )


def test_resuming_with_other_settings_is_refused_unless_asked(store, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny(store, run, max_steps=2))
    changed = replace(tiny(store, run, batch_size=4, epochs=2), optim=OptimConfig(lr=1e-3, warmup_iters=2))
    said = r"run: this run was trained with other settings \(optim.lr: 0.002 -> 0.001; train.batch_size: 2 -> 4; "
    with pytest.raises(ValueError, match=said):
        pretrain(changed)
    # Batches of 4 from batch 2 on: 10 scans make 2 such batches, so epoch 0 is over (it hung before).
    summary = pretrain(changed, accept_changes=True)
    record = json.loads((run / "config.json").read_text())
    assert summary["steps"] == 4 and summary["epochs"] == 2
    assert record["changes"] == [
        {"step": 2, "changes": {"optim.lr": [0.002, 0.001], "train.batch_size": [2, 4], "train.epochs": [1, 2]}}
    ]
    pretrain(replace(changed, train=replace(changed.train, num_workers=1, log_every=3)))  # how, not what: resumes


def test_runs_go_only_into_empty_folders_or_their_own(store, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text("{}")  # the user's own file, not a run record
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(PathError, match=r"mine: holds files that are not a scalr run's \(config.json, notes.txt\)"):
        pretrain(tiny(store, user))
    assert (user / "config.json").read_text() == "{}"
    with pytest.raises(PathError, match="is a feature store: a run is never written into a store"):
        pretrain(tiny(store, store.path))


def test_resuming_on_another_store_names_it(store, kitti_root, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny(store, run, max_steps=1))
    other = tiny_store(kitti_root, tmp_path / "other.zarr")  # another split's scans
    with pytest.raises(
        ValueError, match=r"stores: \['test-vit \(random-init seed 0\) on semantickitti/train \(\w+\)'\] -> "
    ):
        pretrain(replace(tiny(store, run), stores=(other.path,)))
