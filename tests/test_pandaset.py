"""PandaSet in its own format: two lidars as two datasets, world -> ego frame, split by latitude,
bad input; and the four-lidar pretraining mix."""

import gzip
import json
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_store

from pipeline.datasets import open_dataset
from pipeline.datasets.pandaset import EGO_Z_SHIFT
from pipeline.errors import DatasetError
from pipeline.geometry import pose_matrix
from pipeline.scan import IGNORE_INDEX
from pipeline.transforms import Grid
from stages.student.pretrain import PretrainConfig, pretrain
from stages.student.samples import DistillationData, SampleConfig
from stages.student.train import OptimConfig, TrainConfig
from stages.student.waffleiron import WaffleIronConfig


def test_two_sensors_two_datasets(pandaset_root):
    p64 = open_dataset("pandar64", pandaset_root, "train")
    gt = open_dataset("pandargt", pandaset_root, "train")
    assert p64.scan_ids == gt.scan_ids == ["001/00", "001/01"]
    assert open_dataset("pandar64", pandaset_root, "val").scan_ids == ["002/00", "002/01"]  # latitude <= 37.6
    a, b = p64[0], gt[0]
    table = pd.read_pickle(pandaset_root / "001/lidar/00.pkl.gz")
    assert len(a.points) == (table["d"] == 0).sum() and len(b.points) == (table["d"] == 1).sum()
    assert [c.name for c in a.cameras] == [
        "back_camera",
        "front_camera",
        "front_left_camera",
        "front_right_camera",
        "left_camera",
        "right_camera",
    ]
    assert [c.name for c in b.cameras] == ["front_camera"]
    assert np.abs(np.degrees(np.arctan2(b.points[:, 1], b.points[:, 0]))).max() < 40  # the forward lidar
    assert set(np.unique(a.labels)) <= set(range(17)) | {IGNORE_INDEX}


def test_points_move_from_world_to_the_shifted_ego_frame(pandaset_root):
    scan = open_dataset("pandar64", pandaset_root, "train")[1]
    table = pd.read_pickle(pandaset_root / "001/lidar/01.pkl.gz")
    world = table[table["d"] == 0][["x", "y", "z"]].to_numpy()
    pose = json.loads((pandaset_root / "001/lidar/poses.json").read_text())[1]
    t = pose_matrix([pose["heading"][k] for k in "wxyz"], [pose["position"][k] for k in "xyz"])
    expected = (world - t[:3, 3]) @ t[:3, :3]
    expected[:, 2] += EGO_Z_SHIFT
    assert np.allclose(scan.points[:, :3], expected, atol=1e-3)
    road = scan.points[scan.labels == 0, 2]
    assert abs(np.median(road) + 1.7) < 0.1  # the road sits about 1.7 m below, as on real PandaSet


def _rewrite(path, edit):
    frame = pd.read_pickle(path)
    frame = edit(frame)
    with gzip.open(path, "wb") as f:
        pickle.dump(frame, f)


def test_bad_pandaset_input(pandaset_root, tmp_path):

    root = shutil.copytree(pandaset_root, tmp_path / "p")
    _rewrite(root / "001/annotations/semseg/00.pkl.gz", lambda f: f.iloc[:-3])
    with pytest.raises(DatasetError, match=r"00.pkl.gz: \d+ labels for \d+ points"):
        open_dataset("pandar64", root, "train")[0]
    (root / "001/lidar/01.pkl.gz").write_bytes(b"not a gzip pickle")
    with pytest.raises(DatasetError, match="01.pkl.gz: unreadable pickled table"):
        open_dataset("pandar64", root, "train")[1]
    (root / "002/camera/front_camera/intrinsics.json").write_text(json.dumps({"fx": 0, "fy": 0, "cx": 1, "cy": 1}))
    with pytest.raises(DatasetError, match="intrinsics.json: intrinsics is not invertible"):
        open_dataset("pandargt", root, "val")[0]
    poses = json.loads((root / "002/lidar/poses.json").read_text())
    (root / "002/lidar/poses.json").write_text(json.dumps(poses[:1]))
    with pytest.raises(DatasetError, match="poses.json: no pose for frame 01"):
        open_dataset("pandar64", root, "val")[1]
    (root / "002/meta/gps.json").write_text("[]")
    with pytest.raises(
        DatasetError, match="gps.json: no GPS fix: the sequence's split \\(by latitude\\) cannot be decided"
    ):
        open_dataset("pandar64", root, "val")


def test_four_lidars_pretrain_together(pandaset_root, nuscenes_root, kitti_root, tmp_path):

    sources = [
        ("nuscenes", nuscenes_root, "mini_train"),
        ("semantickitti", kitti_root, "train"),
        ("pandar64", pandaset_root, "train"),
        ("pandargt", pandaset_root, "train"),
    ]
    stores = [tiny_store(r, tmp_path / f"{n}.zarr", n, s).path for n, r, s in sources]
    grid = Grid(cell=4.0)
    data = DistillationData(stores, SampleConfig(max_points=3000, grid=grid))
    assert sorted(g.name for g in data.groups) == [
        "nuscenes/mini_train",
        "pandar64/train",
        "pandargt/train",
        "semantickitti/train",
    ]
    assert data.sizes == [2, 2, 2, 2]
    cfg = PretrainConfig(
        tuple(stores),
        tmp_path / "run",
        model=WaffleIronConfig(depth=2, width=16, grid_shape=grid.shape),
        sample=SampleConfig(max_points=3000, grid=grid),
        optim=OptimConfig(warmup_iters=1),
        train=TrainConfig(batch_size=4, epochs=1, num_workers=0),
    )
    assert pretrain(cfg)["steps"] == 2


def test_sequences_without_semseg_are_left_out(pandaset_root, tmp_path):
    """As the released code (it lists */annotations/semseg/): a sequence without semseg
    annotations is not part of any split, and the reader says which it left out."""

    root = tmp_path / "p"
    shutil.copytree(pandaset_root, root)
    shutil.copytree(root / "001", root / "003")
    shutil.rmtree(root / "003/annotations/semseg")
    ds = open_dataset("pandar64", root, "train")
    assert ds.scan_ids == ["001/00", "001/01"] and ds.unlabelled == ["003"]
