import json
import pickle

import numpy as np
import pytest

from pipeline.datasets import nuscenes as nus
from pipeline.datasets import open_dataset
from pipeline.datasets.semantickitti import read_calib
from pipeline.errors import DatasetError
from pipeline.geometry import invert_rigid, pose_matrix
from pipeline.scan import IGNORE_INDEX


def test_nuscenes_scans_ids_points_labels_cameras(nuscenes_root):
    ds = open_dataset("nuscenes", nuscenes_root, "mini_train")
    rows = {r["token"]: r for r in json.loads((nuscenes_root / "v1.0-mini" / "sample_data.json").read_text())}
    assert len(ds) == 2
    for scan_id in ds.scan_ids:  # ids are the LIDAR_TOP keyframe sample_data tokens
        assert "LIDAR_TOP" in rows[scan_id]["filename"]
    scan = ds[0]
    assert scan.points.dtype == np.float32 and scan.points.shape[1] == 4
    assert scan.labels.shape == (scan.num_points,) and scan.labels.dtype == np.uint8
    assert set(np.unique(scan.labels)) <= set(range(16)) | {IGNORE_INDEX}
    assert [c.name for c in scan.cameras] == list(nus.CAMERAS)
    assert 0 <= scan.points[:, 3].min() and scan.points[:, 3].max() <= 255
    assert scan.extras["ring"].max() < 32


def test_nuscenes_splits(nuscenes_root):
    train = open_dataset("nuscenes", nuscenes_root, "mini_train")
    val = open_dataset("nuscenes", nuscenes_root, "mini_val")
    assert len(val) == 2 and not set(train.scan_ids) & set(val.scan_ids)
    with pytest.raises(DatasetError, match="v1.0-trainval"):
        open_dataset("nuscenes", nuscenes_root, "train")
    assert len(nus.val_scene_names()) == 150
    names = [f"scene-{i:04d}" for i in range(1, 1200) if f"scene-{i:04d}" not in nus.val_scene_names()][:700]
    mini_train, mini_val = nus.paper_mini_split(names)
    assert len(mini_train) == 600 and len(mini_val) == 100 and not set(mini_train) & set(mini_val)
    assert nus.paper_mini_split(list(reversed(names))) == (mini_train, mini_val)  # independent of order


def test_nuscenes_lidar_to_camera_includes_ego_motion(nuscenes_root):
    """The transform goes through the ego pose at the CAMERA's timestamp, not the lidar's."""
    ds = open_dataset("nuscenes", nuscenes_root, "mini_train")
    scan = ds[0]
    tables = nuscenes_root / "v1.0-mini"
    sd = {r["token"]: r for r in json.loads((tables / "sample_data.json").read_text())}
    poses = {r["token"]: r for r in json.loads((tables / "ego_pose.json").read_text())}
    cs = {r["token"]: r for r in json.loads((tables / "calibrated_sensor.json").read_text())}
    lidar = sd[scan.scan_id]
    cam = next(r for r in sd.values() if r["sample_token"] == lidar["sample_token"] and "CAM_BACK/" in r["filename"])
    assert cam["timestamp"] != lidar["timestamp"]

    def matrix(rec):
        return pose_matrix(rec["rotation"], rec["translation"])

    lidar_to_global = matrix(poses[lidar["ego_pose_token"]]) @ matrix(cs[lidar["calibrated_sensor_token"]])
    expected = (
        invert_rigid(matrix(poses[cam["ego_pose_token"]]) @ matrix(cs[cam["calibrated_sensor_token"]]))
        @ lidar_to_global
    )
    got = scan.camera("CAM_BACK").lidar_to_camera
    assert np.allclose(got, expected, atol=1e-9)
    static = (
        invert_rigid(matrix(poses[lidar["ego_pose_token"]]) @ matrix(cs[cam["calibrated_sensor_token"]]))
        @ lidar_to_global
    )
    assert np.linalg.norm(got[:3, 3] - static[:3, 3]) > 0.1  # the car moved between the two timestamps


def test_semantickitti_scans_calib_labels(kitti_root):
    ds = open_dataset("semantickitti", kitti_root, "train")
    assert ds.scan_ids == ["00/000000", "00/000001"]
    assert open_dataset("semantickitti", kitti_root, "val").scan_ids == ["08/000000", "08/000001"]
    scan = ds[1]
    assert scan.points.shape[1] == 4 and 0 <= scan.points[:, 3].min() and scan.points[:, 3].max() <= 1
    raw_file = np.fromfile(kitti_root / "sequences/00/labels/000001.label", dtype=np.uint32)
    assert (raw_file >> 16).max() > 0  # the file carries instance ids in the high bits...
    assert np.array_equal(scan.raw_labels, raw_file & 0xFFFF)  # ...which the reader masks off
    cam = scan.camera("image_2")
    # K @ lidar_to_camera equals P2 @ Tr, parsed independently here
    entries = {
        line.split(":")[0]: np.array(line.split(":")[1].split(), dtype=float)
        for line in (kitti_root / "sequences/00/calib.txt").read_text().splitlines()
    }
    tr = np.vstack([entries["Tr"].reshape(3, 4), [0, 0, 0, 1]])
    assert np.allclose(cam.intrinsics @ cam.lidar_to_camera[:3], entries["P2"].reshape(3, 4) @ tr)
    k, _ = read_calib(kitti_root / "sequences/00/calib.txt")
    assert cam.image_size == (150, 496)
    assert np.allclose(k, cam.intrinsics)


def test_readers_are_lazy_and_picklable(kitti_copy, nuscenes_root):
    (kitti_copy / "sequences/00/velodyne/000001.bin").write_bytes(b"\x00" * 7)
    ds = open_dataset("semantickitti", kitti_copy, "train")  # listing reads no point file
    assert len(ds) == 2
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives
    assert np.array_equal(clone[0].points, ds[0].points)
    with pytest.raises(DatasetError, match="000001.bin"):
        ds[1]
    nds = open_dataset("nuscenes", nuscenes_root, "mini_train")
    assert np.array_equal(pickle.loads(pickle.dumps(nds))[1].points, nds[1].points)
