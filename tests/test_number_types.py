"""Each dataset's number types as the released code's: nuScenes points moved to a camera through
the devkit's float32 steps, PandaSet points kept float64 from its tables to the voxels; a point
on a pixel edge and a point on a voxel edge pin both."""

import math

import numpy as np
import pytest
import zarr
from helpers import tiny_config, tiny_store

from pipeline.datasets import open_dataset
from pipeline.geometry import devkit_rotation, float32_steps, project, resize_pixels, rigid
from pipeline.scan import Camera, VisibilityRule
from pipeline.transforms import voxel_downsample
from stages.extract.extract import extract
from storage.feature_store import FeatureStore

RULE = VisibilityRule("test", min_depth=1.0, far_margin=1.0)


def test_a_point_on_a_pixel_edge_lands_where_the_released_float32_steps_put_it():
    """x = 1 + 0.1: float64 1.1000000000000001, float32 1.10000002384; with fx 1000 at 10 m and
    cx -1e-6, u is 109.999999 in float64 and 110.0000014 through the float32 steps: pixel 109
    against the released code's 110."""
    k = np.array([[1000.0, 0.0, -1e-6], [0.0, 1000.0, 50.0], [0.0, 0.0, 1.0]])
    camera = Camera(
        "cam", None, (100, 200), k, rigid(np.eye(3), (0.1, 0.0, 0.0)), (("translate", np.array([0.1, 0, 0])),)
    )
    point = np.array([[1.0, 0.0, 10.0, 0.0]], dtype=np.float32)
    released = project(point, camera, RULE)
    exact = project(point, camera, RULE, float64=True)
    assert np.floor(exact.uv[0, 0]) == 109 and np.floor(released.uv[0, 0]) == 110
    assert released.uv[0, 0] == pytest.approx(100.0 * float(np.float32(1.1)) - 1e-6, abs=1e-9)
    assert resize_pixels(released.uv, (100, 200), (100, 200))[0, 0] == 110


def test_float32_steps_round_after_every_step():
    """rotate: float64 product stored as float32; translate: the translation cast to float32 and
    added in float32 (numpy 1.x's rule for a float64 scalar and a float32 array)."""
    p = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    turn = devkit_rotation([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)])  # 90 degrees about z
    out = float32_steps(p, (("rotate", turn), ("translate", np.array([0.1, 0.2, 0.3]))))
    assert out.dtype == np.float32
    rotated = (turn @ np.array([1.0, 2.0, 3.0])).astype(np.float32)
    assert out.tolist() == [(rotated + np.float32([0.1, 0.2, 0.3])).tolist()]
    np.testing.assert_allclose(rotated, [-2.0, 1.0, 3.0], atol=1e-6)


def test_devkit_rotation_normalises_only_as_pyquaternion_does():
    """pyquaternion normalises a quaternion only when |q|^2 is 1e-14 or more away from 1."""
    assert devkit_rotation([1 + 2.5e-15, 0, 0, 0])[0, 0] == (1 + 2.5e-15) ** 2  # kept as given
    assert devkit_rotation([1 + 1e-12, 0, 0, 0])[0, 0] == 1.0  # normalised first
    np.testing.assert_array_equal(devkit_rotation([2.0, 0, 0, 0]), np.eye(3))


def test_nuscenes_cameras_carry_the_devkit_steps(nuscenes_root):
    """lidar -> ego -> global (rotate, translate twice) then global -> ego -> camera (translate by
    -t, rotate by R^T, twice); both ways agree to well under a pixel on the synthetic rig."""
    ds = open_dataset("nuscenes", nuscenes_root, "mini_train")
    scan = ds[0]
    camera = scan.cameras[0]
    assert [kind for kind, _ in camera.steps] == ["rotate", "translate"] * 2 + ["translate", "rotate"] * 2
    released, exact = ds.project(scan, camera.name), ds.project(scan, camera.name, float64=True)
    common, a, b = np.intersect1d(released.point_index, exact.point_index, return_indices=True)
    assert len(common) > 0.99 * max(len(released), len(exact))
    assert np.abs(released.uv[a] - exact.uv[b]).max() < 0.05


def test_pandaset_points_stay_float64_to_the_voxels(pandaset_root):
    """The released code voxelises PandaSet's float64 points: 0.3 / 0.1 = 2.9999999999999996 shares
    voxel 2 with 0.25, where float32 would give 3.0000001 (its own voxel)."""
    scan = open_dataset("pandar64", pandaset_root, "train")[0]
    assert scan.points.dtype == np.float64
    xyz = np.array([[0.0, 0.0, 0.0], [0.25, 0.0, 0.0], [0.3, 0.0, 0.0]])
    assert voxel_downsample(xyz, 0.1, None).tolist() == [0, 1]
    assert voxel_downsample(xyz.astype(np.float32), 0.1, None).tolist() == [0, 1, 2]


def test_stores_keep_the_dataset_number_types(pandaset_root, nuscenes_root, tmp_path):
    store = tiny_store(pandaset_root, tmp_path / "p.zarr", "pandar64", max_scans=1)
    assert store.attrs["points_dtype"] == "float64"
    row = store.manifest().to_pylist()[0]
    points = store.read_points(row["part"], row["offset"], row["count"], names=("points", "point_index"))
    scan = open_dataset("pandar64", pandaset_root, "train")[0]
    assert points["points"].dtype == np.float64 and np.array_equal(points["points"], scan.points[points["point_index"]])
    assert zarr.open_array(str(tmp_path / "p.zarr/parts/part-000000/points")).dtype == np.float64
    nus = tiny_store(nuscenes_root, tmp_path / "n.zarr", "nuscenes", split="mini_train", max_scans=1)
    assert nus.attrs["points_dtype"] == "float32" and "float32" in nus.attrs["projection"]
    exact = extract(
        tiny_config(nuscenes_root, tmp_path / "n64.zarr", "nuscenes", "mini_train", max_scans=1, projection="float64")
    )
    assert exact.attrs["projection"].endswith("one float64 transform")
    with pytest.raises(Exception, match="projection"):  # a store of other rules is not continued
        extract(
            tiny_config(nuscenes_root, tmp_path / "n.zarr", "nuscenes", "mini_train", max_scans=1, projection="float64")
        )
    assert FeatureStore(tmp_path / "n.zarr").attrs["format_version"] == 4
