"""Every kind of bad input gives a DatasetError that names the file and the problem."""

import json

import numpy as np
import pytest

from pipeline.datasets import open_dataset
from pipeline.datasets.base import load_image
from pipeline.errors import DatasetError


def first_lidar_file(root):
    return sorted((root / "samples/LIDAR_TOP").iterdir())[0]


def edit_table(root, name, edit):
    path = root / "v1.0-mini" / f"{name}.json"
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))
    return path


def kitti_scan(root, index=0):
    return open_dataset("semantickitti", root, "train")[index]


def nuscenes_scan(root, index=0):
    return open_dataset("nuscenes", root, "mini_train")[index]


def test_missing_point_file(nuscenes_copy):
    path = first_lidar_file(nuscenes_copy)
    path.unlink()
    with pytest.raises(DatasetError, match="file is missing") as err:
        nuscenes_scan(nuscenes_copy)
    assert err.value.path == str(path)


def test_bin_size_not_a_multiple_of_the_record(nuscenes_copy, kitti_copy):
    path = first_lidar_file(nuscenes_copy)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DatasetError, match="not a multiple of the 20-byte record") as err:
        nuscenes_scan(nuscenes_copy)
    assert path.name in str(err.value)
    kpath = kitti_copy / "sequences/00/velodyne/000000.bin"
    kpath.write_bytes(kpath.read_bytes() + b"\x00\x00")
    with pytest.raises(DatasetError, match="16-byte record"):
        kitti_scan(kitti_copy)


def test_label_count_differs_from_point_count(kitti_copy, nuscenes_copy):
    path = kitti_copy / "sequences/00/labels/000000.label"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DatasetError, match=r"labels for \d+ points") as err:
        kitti_scan(kitti_copy)
    assert err.value.path == str(path)
    seg = sorted((nuscenes_copy / "lidarseg/v1.0-mini").iterdir())
    for p in seg:
        p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(DatasetError, match=r"labels for \d+ points"):
        nuscenes_scan(nuscenes_copy)


def test_missing_label_file(kitti_copy):
    (kitti_copy / "sequences/00/labels/000001.label").unlink()
    with pytest.raises(DatasetError, match="000001.label: file is missing"):
        kitti_scan(kitti_copy, 1)


def test_unknown_label_id(kitti_copy):
    path = kitti_copy / "sequences/00/labels/000000.label"
    labels = np.fromfile(path, dtype=np.uint32)
    labels[5] = 123
    labels.tofile(path)
    with pytest.raises(DatasetError, match=r"\[123\] are not in the semantickitti learning map"):
        kitti_scan(kitti_copy)


def test_nan_points(kitti_copy):
    path = kitti_copy / "sequences/00/velodyne/000000.bin"
    pts = np.fromfile(path, dtype=np.float32)
    pts[[1, 9]] = [np.nan, np.inf]
    pts.tofile(path)
    with pytest.raises(DatasetError, match="2 of .* points have NaN or infinite values"):
        kitti_scan(kitti_copy)


@pytest.mark.parametrize(
    "line, problem",
    [
        (None, "no P2 entry"),
        ("P2: 1 2 3", "P2 has 3 values, expected 12"),
        ("P2: nan 0 0 0 0 1 0 0 0 0 1 0", "not a finite 3x3"),
        ("P2: 0 0 0 0 0 0 0 0 0 0 0 0", "not invertible"),
        ("P2: 1 0 0 0 0 1 0 0 0 0 1 x", "not a number"),
    ],
)
def test_bad_kitti_intrinsics(kitti_copy, line, problem):
    path = kitti_copy / "sequences/00/calib.txt"
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("P2")]
    path.write_text("\n".join(lines + ([line] if line else [])) + "\n")
    with pytest.raises(DatasetError, match=problem) as err:
        open_dataset("semantickitti", kitti_copy, "train")
    assert err.value.path == str(path)


def test_bad_kitti_extrinsics(kitti_copy):
    path = kitti_copy / "sequences/00/calib.txt"
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("Tr")]
    path.write_text("\n".join(lines + ["Tr: 0 0 0 0 0 0 0 0 0 0 0 0"]) + "\n")
    with pytest.raises(DatasetError, match="Tr is not invertible"):
        open_dataset("semantickitti", kitti_copy, "train")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="no Tr entry"):
        open_dataset("semantickitti", kitti_copy, "train")


def test_missing_nuscenes_calibration_record(nuscenes_copy):
    removed = []
    path = edit_table(nuscenes_copy, "calibrated_sensor", lambda rows: removed.append(rows.pop(3)))
    with pytest.raises(DatasetError, match=f"token {removed[0]['token']} .* is missing") as err:
        open_dataset("nuscenes", nuscenes_copy, "mini_train")
    assert err.value.path == str(path)


def test_non_finite_or_degenerate_nuscenes_pose(nuscenes_copy):
    def nan_translation(rows):
        rows[0]["translation"][1] = float("nan")

    edit_table(nuscenes_copy, "ego_pose", nan_translation)
    with pytest.raises(
        DatasetError,
        match=r"ego_pose.json: ego_pose record 0: field 'translation' is \[.*nan.*\], not finite numbers of shape "
        r"\(3,\)",
    ):
        open_dataset("nuscenes", nuscenes_copy, "mini_train")

    def zero_rotation(rows):
        rows[0]["translation"][1] = 0.0
        rows[0]["rotation"] = [0, 0, 0, 0]

    edit_table(nuscenes_copy, "ego_pose", zero_rotation)
    with pytest.raises(DatasetError, match="is not a finite 4x4 transform"):
        open_dataset("nuscenes", nuscenes_copy, "mini_train")


def test_bad_nuscenes_intrinsics(nuscenes_copy):
    def singular(rows):
        for r in rows:
            if r["camera_intrinsic"]:
                r["camera_intrinsic"] = [[0, 0, 0], [0, 0, 0], [0, 0, 1]]

    path = edit_table(nuscenes_copy, "calibrated_sensor", singular)
    with pytest.raises(DatasetError, match="camera_intrinsic .* not invertible") as err:
        open_dataset("nuscenes", nuscenes_copy, "mini_train")
    assert err.value.path == str(path)


def test_missing_or_corrupt_table(nuscenes_copy):
    (nuscenes_copy / "v1.0-mini/ego_pose.json").unlink()
    with pytest.raises(DatasetError, match="ego_pose.json: nuScenes table is missing"):
        open_dataset("nuscenes", nuscenes_copy, "mini_train")
    (nuscenes_copy / "v1.0-mini/ego_pose.json").write_text('[{"token": ')
    with pytest.raises(DatasetError, match="ego_pose.json: not valid JSON"):
        open_dataset("nuscenes", nuscenes_copy, "mini_train")


def test_wrong_category_table(nuscenes_copy):
    edit_table(nuscenes_copy, "category", lambda rows: rows[17].update(name="vehicle.truck"))
    with pytest.raises(DatasetError, match="category index 17 is 'vehicle.truck', expected 'vehicle.car'"):
        open_dataset("nuscenes", nuscenes_copy, "mini_train")


def test_corrupt_or_missing_image(nuscenes_copy):
    scan = nuscenes_scan(nuscenes_copy)
    path = scan.cameras[0].image_path
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="corrupt or unreadable image") as err:
        load_image(path)
    assert err.value.path == str(path)
    path.unlink()
    with pytest.raises(DatasetError, match="image file is missing"):
        load_image(path)


def test_missing_root_and_unknown_split(tmp_path, kitti_root):
    with pytest.raises(DatasetError, match="root is not a directory"):
        open_dataset("semantickitti", tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match="unknown split 'mini'"):
        open_dataset("semantickitti", kitti_root, "mini")
    with pytest.raises(DatasetError, match="none of the test sequences"):
        open_dataset("semantickitti", kitti_root, "test")
