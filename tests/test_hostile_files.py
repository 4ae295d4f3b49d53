"""No file a user points scalr at can run code: PandaSet's pickled tables, teacher weights and
released frame lists are each crafted to create a marker file when unpickled; scalr refuses them,
names the file and what it refused, and the marker never appears. Their honest forms still load."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from click.testing import CliRunner
from helpers import tiny_store

from pipeline.datasets import open_dataset
from pipeline.errors import DatasetError
from pipeline.safe_pickle import load_dataframe, load_npy
from stages.cli import main
from stages.extract.registry import TEACHERS
from stages.extract.teachers import load_teacher
from stages.extract.weights import WeightsError
from stages.runtime import seeded
from storage.feature_store import FeatureStore, StoreError


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "ran-code"
    yield path
    assert not path.exists(), "code from a data file ran"


@pytest.fixture
def pandaset_copy(pandaset_root, tmp_path):
    return shutil.copytree(pandaset_root, tmp_path / "pandaset")


def write_gz_pickle(path, obj, protocol=4):
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.mark.parametrize("table", ["lidar/00.pkl.gz", "annotations/semseg/00.pkl.gz"])
@pytest.mark.parametrize("how", ["bare", "inside-a-dataframe"])
def test_pandaset_tables_never_run_code(pandaset_copy, marker, tmp_path, table, how):
    path = pandaset_copy / "001" / table
    payload = Payload(marker)
    write_gz_pickle(path, payload if how == "bare" else pd.DataFrame({"x": [1.0], "class": [payload]}))
    result = run("check-dataset", "--dataset", "pandar64", "--root", pandaset_copy, "--split", "train")
    assert result.exit_code == 1 and f"{path}: refused to unpickle posix.system" in result.output, result.output
    args = ["--dataset", "pandar64", "--root", pandaset_copy, "--split", "train", "--teacher", "test-vit"]
    result = run("extract-features", *args, "--random-init", "--image-size", "32x64", "--out", tmp_path / "s.zarr")
    assert result.exit_code == 1 and f"Error: {path}: refused to unpickle posix.system" in result.output


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_honest_tables_load(tmp_path, protocol):
    frame = pd.DataFrame(
        {
            "x": np.linspace(0, 1, 5),
            "i": np.arange(5, dtype=np.float32),
            "class": np.arange(5),
            "name": np.array(list("abcde"), dtype=object),
        },
        index=pd.Index([3, 4, 5, 6, 7]),
    )
    write_gz_pickle(tmp_path / "t.pkl.gz", frame, protocol)
    with open(tmp_path / "t.pkl", "wb") as f:
        pickle.dump(frame, f, protocol=protocol)
    for path in (tmp_path / "t.pkl.gz", tmp_path / "t.pkl"):
        pd.testing.assert_frame_equal(load_dataframe(path), frame)


def test_pandaset_reader_reads_the_synthetic_tables(pandaset_root):
    scan = open_dataset("pandar64", pandaset_root, "train")[0]
    expected = pd.read_pickle(pandaset_root / "001/lidar/00.pkl.gz")
    assert len(scan.points) == (expected["d"] == 0).sum()


@pytest.fixture
def weights_teacher(monkeypatch):
    """A registry entry with a weights file, on the tiny test architecture."""
    spec = dataclasses.replace(
        TEACHERS["test-vit"], name="test-vit-file", weights_file="test_vit.pth", random_init_only=False
    )
    monkeypatch.setitem(TEACHERS, spec.name, spec)
    return spec


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_teacher_weights_never_run_code(weights_teacher, kitti_root, marker, tmp_path, how):
    path = tmp_path / "test_vit.pth"
    if how == "torch.save":
        torch.save({"pos_embed": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    for given in ({"weights": path}, {"weights_dir": tmp_path}):
        with pytest.raises(WeightsError, match=rf"{path}: cannot load as test-vit-file .*refused"):
            load_teacher("test-vit-file", (32, 64), **given)
    args = ["--dataset", "semantickitti", "--root", kitti_root, "--teacher", "test-vit-file", "--weights", path]
    result = run("extract-features", *args, "--image-size", "32x64", "--out", tmp_path / "s.zarr")
    assert result.exit_code == 1 and f"Error: {path}: cannot load as test-vit-file" in result.output, result.output


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict"])
def test_released_weight_files_still_load(weights_teacher, tmp_path, layout):
    """The official DINO / DINOv2 / MAE / CLIP files are dicts of tensors (MAE's under "model"):
    the weights-only loader reads them."""
    with seeded(4):
        source = timm.create_model("test_vit", pretrained=False, img_size=(32, 64), num_classes=0).state_dict()
    path = tmp_path / "test_vit.pth"
    torch.save(source if layout == "plain" else {layout: source, "epoch": 7}, path)
    teacher = load_teacher("test-vit-file", (32, 64), weights=path)
    assert all(torch.equal(teacher.model.state_dict()[k], v) for k, v in source.items())


def test_frame_lists_never_run_code(kitti_root, marker, tmp_path):
    path = tmp_path / "frames.npy"
    rows = np.empty((1, 3), dtype=object)
    rows[0] = ["sequences/00/velodyne/000000.bin", "labels", Payload(marker)]
    np.save(path, rows, allow_pickle=True)
    with pytest.raises(DatasetError, match=rf"{path}: refused to unpickle posix.system"):
        load_npy(path)
    for mode in ("probe", "finetune"):
        args = ["--dataset", "semantickitti", "--root", kitti_root, "--checkpoint", tmp_path / "none.pt"]
        result = run(mode, *args, "--out", tmp_path / mode, "--frames-file", path)
        assert result.exit_code == 1 and f"Error: {path}: refused to unpickle posix.system" in result.output


def test_honest_frame_lists_load(tmp_path):
    rows = np.array([["a.bin", "a.label", "token-a"], ["b.bin", "b.label", "token-b"]], dtype=object)
    np.save(tmp_path / "f.npy", rows, allow_pickle=True)
    assert load_npy(tmp_path / "f.npy").tolist() == rows.tolist()
    np.save(tmp_path / "n.npy", np.arange(4))
    assert load_npy(tmp_path / "n.npy").tolist() == [0, 1, 2, 3]
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DatasetError, match="bad.npy: not a readable .npy file"):
        load_npy(tmp_path / "bad.npy")


def test_student_checkpoints_never_run_code(kitti_root, marker, tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": Payload(marker)}, path)
    args = ["--dataset", "semantickitti", "--root", kitti_root, "--split", "val", "--checkpoint", path]
    result = run("evaluate", *args)
    assert (
        result.exit_code == 1
        and f"Error: {path}: not a readable checkpoint (refused: it needs the object posix.system" in result.output
    )


def test_a_store_naming_foreign_codecs_is_never_decoded(kitti_root, tmp_path):
    """Zarr decodes with whatever codecs an array's zarr.json names (some unpickle): scalr reads
    only its own codecs, in the gate and in the direct chunk reader of the lazy viewer path."""
    store = tiny_store(kitti_root, tmp_path / "s.zarr")
    meta_path = store.path / "parts/part-000000/points/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [
        {"name": "bytes", "configuration": {"endian": "little"}},
        {"name": "numcodecs.zlib", "configuration": {"level": 1}},
    ]  # noqa: E501
    meta_path.write_text(json.dumps(meta))
    result = run("inspect", store.path)
    assert (
        result.exit_code == 1
        and "are not the store's ['transpose', 'bytes', 'blosc', 'crc32c']: refused" in result.output
    )
    lazy = FeatureStore(store.path, check=False)
    row = lazy.manifest().to_pylist()[0]
    with pytest.raises(StoreError, match="codecs other than the store's own; refused"):
        lazy.read(row["part"], row["offset"], row["count"], row["grid"])


def scalr_with_timeout(*args, seconds=120):
    """A command in its own process, so that a hang fails the test instead of stopping the suite."""
    done = subprocess.run(
        [sys.executable, "-m", "stages.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=seconds,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return done.returncode, done.stdout + done.stderr


def test_pipes_named_like_data_files_are_refused_not_waited_on(kitti_copy, tmp_path):
    scan = kitti_copy / "sequences/00/velodyne/000001.bin"
    scan.unlink()
    os.mkfifo(scan)
    image = kitti_copy / "sequences/00/image_2/000000.png"
    image.unlink()
    os.mkfifo(image)
    code, said = scalr_with_timeout(
        "check-dataset", "--dataset", "semantickitti", "--root", kitti_copy, "--split", "train"
    )
    assert code == 1 and f"{scan}: not a regular file (a pipe, device or folder): refused" in said, said
    assert f"{image}: not a regular file" in said
    config = tmp_path / "c.toml"
    os.mkfifo(config)
    code, said = scalr_with_timeout(
        "pretrain", "--store", tmp_path / "none.zarr", "--out", tmp_path / "r", "--config", config
    )
    assert code == 1 and f"Error: {config}: not a regular file" in said, said


def test_a_store_file_replaced_by_a_pipe_is_refused(kitti_root, tmp_path):
    store = tiny_store(kitti_root, tmp_path / "s.zarr")
    chunk = next((store.path / "parts/part-000000/points/c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    os.mkfifo(chunk)
    code, said = scalr_with_timeout("inspect", store.path)
    assert code == 1 and "refusing a damaged or unfinished feature store" in said, said
    lazy = FeatureStore(store.path, check=False)
    row = lazy.manifest().to_pylist()[0]
    with pytest.raises(StoreError, match="not a regular file"):
        lazy.read_points(row["part"], row["offset"], row["count"])
    manifest = store.path / "manifest/part-000000.parquet"
    manifest.unlink()
    os.mkfifo(manifest)
    code, said = scalr_with_timeout("verify", store.path)
    assert code == 1 and f"{manifest}: unreadable manifest" in said and "not a regular file" in said, said
