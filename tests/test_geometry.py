import numpy as np
import pytest

from pipeline.datasets import READERS
from pipeline.datasets.nuscenes import META as NUSCENES
from pipeline.datasets.semantickitti import META as KITTI
from pipeline.geometry import (
    invert_rigid,
    matrix_to_quaternion,
    pose_matrix,
    project,
    quaternion_to_matrix,
    resize_pixels,
    rigid,
    yaw_matrix,
)
from pipeline.scan import Camera

K = np.array([[100.0, 0.0, 50.0], [0.0, 100.0, 25.0], [0.0, 0.0, 1.0]])
# Lidar frame = camera frame, so camera-frame points can be written by hand.
CAMERA = Camera("cam", None, (50, 100), K, np.eye(4))
VELO_AXES = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # x forward -> z forward


def points_at_pixels(uv, depth):
    """Camera-frame points that project to pixel (u, v) at the given depth."""
    uv = np.asarray(uv, dtype=float)
    x = (uv[:, 0] - 50.0) / 100.0 * depth
    y = (uv[:, 1] - 25.0) / 100.0 * depth
    return np.stack([x, y, np.full(len(uv), depth)], axis=1)


def test_quaternion_round_trip_and_inverse():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q = q / np.linalg.norm(q) * np.sign(q[0])
        r = quaternion_to_matrix(q)
        assert np.allclose(r @ r.T, np.eye(3))
        assert np.allclose(matrix_to_quaternion(r), q)
        t = pose_matrix(q, rng.normal(size=3))
        assert np.allclose(invert_rigid(t) @ t, np.eye(4))
    # 90 degrees about z, nuScenes (w, x, y, z) order
    assert np.allclose(quaternion_to_matrix([np.sqrt(0.5), 0, 0, np.sqrt(0.5)]), yaw_matrix(np.pi / 2))


def test_hand_computed_projection():
    pts = np.array([[0.0, 0.0, 10.0], [1.0, 0.5, 10.0]])  # optical axis; 10 px right, 5 px down
    proj = project(pts, CAMERA, NUSCENES.visibility)
    assert proj.point_index.tolist() == [0, 1]
    assert np.allclose(proj.uv, [[50.0, 25.0], [60.0, 30.0]])
    assert np.allclose(proj.depth, [10.0, 10.0])


def test_points_behind_or_too_close_are_dropped():
    pts = np.array([[0.0, 0.0, -10.0], [0.0, 0.0, 0.5], [0.0, 0.0, 1.5]])
    assert project(pts, CAMERA, NUSCENES.visibility).point_index.tolist() == [2]  # depth > 1 m


@pytest.mark.parametrize(
    "u, nuscenes_keeps, kitti_keeps",
    [
        (0.0, False, False),
        (0.01, True, True),
        (1.0, True, True),
        (98.99, True, True),
        (99.0, False, False),
        (99.99, False, False),
        (100.0, False, False),
        (-0.01, False, False),
    ],
)
def test_border_rules(u, nuscenes_keeps, kitti_keeps):
    """The released ScaLR code keeps 0 < u < W-1 on nuScenes and SemanticKITTI."""
    pts = points_at_pixels([[u, 20.0]], depth=5.0)
    # KITTI's x > 1 m rule is on the lidar frame: use a lidar frame whose x is the optical axis.
    lidar_to_cam = rigid(VELO_AXES, (0, 0, 0))
    lidar_pts = pts @ VELO_AXES  # camera -> lidar: the inverse rotation
    kitti_cam = Camera("cam", None, (50, 100), K, lidar_to_cam)
    assert (len(project(pts, CAMERA, NUSCENES.visibility)) == 1) == nuscenes_keeps
    assert (len(project(lidar_pts, kitti_cam, KITTI.visibility)) == 1) == kitti_keeps


def test_kitti_rule_drops_points_with_small_lidar_x():
    lidar_to_cam = rigid(VELO_AXES, (0, 0, 0.8))
    cam = Camera("cam", None, (50, 100), K, lidar_to_cam)
    pts = np.array([[0.9, 0.0, 0.0], [1.5, 0.0, 0.0]])  # both in front of the camera (depth 1.7 and 2.3)
    assert project(pts, cam, KITTI.visibility).point_index.tolist() == [1]


def test_resize_pixels_floor_twice():
    """Released: the integer pixel at full resolution, then floor(c x W'/W)."""
    uv = np.array([[0.0, 0.0], [1599.99, 899.99], [800.0, 450.0], [3.58, 4.02], [7.9, 11.99]])
    out = resize_pixels(uv, (900, 1600), (224, 448))
    assert out.dtype == np.float32
    # u = 7.9: floor once gives floor(7.9 x 0.28) = 2; floor twice floor(7 x 0.28) = 1.
    # v = 11.99: floor(11.99 x 0.2489) = 2; floor(11 x 0.2489) = 2.
    assert out.tolist() == [[0, 0], [447, 223], [224, 112], [0, 0], [1, 2]]
    assert resize_pixels(np.array([[99.5, 49.5]]), (50, 100), (224, 448)).tolist() == [
        [443, 219]
    ]  # floor(99 x 4.48), floor(49 x 4.48)


def test_pandaset_border_rule():
    """PandaSet (its devkit, as the released code): z_cam > 0 and 0 < u < W, 0 < v < H."""

    rule = READERS["pandar64"].meta.visibility
    pts = points_at_pixels([[0.0, 20.0], [0.01, 20.0], [99.99, 20.0], [100.0, 20.0]], depth=5.0)
    assert project(pts, CAMERA, rule).point_index.tolist() == [1, 2]
