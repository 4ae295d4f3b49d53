"""Rigid transforms, point-to-pixel projection and pixel rescaling.

Pixel convention (every dataset, every stage):
- `u` is the column, `v` the row, both continuous, origin at the top-left corner of the image,
  as given by the intrinsic matrix: `(u, v, 1) ~ K @ (x, y, z)` in the camera frame
  (x right, y down, z forward).
- Pixel (row j, column i) covers `i <= u < i + 1`, `j <= v < j + 1`: its centre is (i + 0.5, j + 0.5).
  This is the convention of the released ScaLR code, which indexes pixels by `floor`.
- Resizing an image from (H, W) to (H', W') maps a point to the pixel
  `(floor(u * W' / W), floor(v * H' / H))` of the resized image (aspect ratio not kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DatasetError
from pipeline.scan import Camera, VisibilityRule


def quaternion_to_matrix(q_wxyz) -> np.ndarray:
    """Rotation matrix of a unit quaternion given as (w, x, y, z), the nuScenes order."""
    w, x, y, z = np.asarray(q_wxyz, dtype=np.float64) / np.linalg.norm(q_wxyz)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(r: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of a rotation matrix (w >= 0)."""
    m = np.asarray(r, dtype=np.float64)
    w = np.sqrt(max(0.0, 1 + m[0, 0] + m[1, 1] + m[2, 2])) / 2
    x = np.sqrt(max(0.0, 1 + m[0, 0] - m[1, 1] - m[2, 2])) / 2
    y = np.sqrt(max(0.0, 1 - m[0, 0] + m[1, 1] - m[2, 2])) / 2
    z = np.sqrt(max(0.0, 1 - m[0, 0] - m[1, 1] + m[2, 2])) / 2
    x = np.copysign(x, m[2, 1] - m[1, 2])
    y = np.copysign(y, m[0, 2] - m[2, 0])
    z = np.copysign(z, m[1, 0] - m[0, 1])
    return np.array([w, x, y, z])


def rigid(rotation: np.ndarray, translation) -> np.ndarray:
    """4x4 homogeneous transform from a 3x3 rotation and a translation."""
    t = np.eye(4)
    t[:3, :3] = rotation
    t[:3, 3] = np.asarray(translation, dtype=np.float64)
    return t


def pose_matrix(rotation_wxyz, translation) -> np.ndarray:
    """4x4 transform of a nuScenes-style record (quaternion w, x, y, z + translation)."""
    return rigid(quaternion_to_matrix(rotation_wxyz), translation)


def invert_rigid(t: np.ndarray) -> np.ndarray:
    inv = np.eye(4)
    inv[:3, :3] = t[:3, :3].T
    inv[:3, 3] = -t[:3, :3].T @ t[:3, 3]
    return inv


def transform_points(t: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to (N, 3) points, in float64."""
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz @ t[:3, :3].T + t[:3, 3]


def devkit_rotation(q_wxyz) -> np.ndarray:
    """A (w, x, y, z) quaternion's rotation matrix as the nuScenes devkit gets it (pyquaternion's
    `rotation_matrix`): normalised only when its squared norm is 1e-14 or more away from 1, then the
    product of its left and right multiplication matrices, lower-right 3 x 3."""
    q = np.array([float(v) for v in q_wxyz])
    if abs(1.0 - np.dot(q, q)) >= 1e-14:
        q = q / math.sqrt(np.dot(q, q))
    w, x, y, z = q
    left = np.array([[w, -x, -y, -z], [x, w, -z, y], [y, z, w, -x], [z, -y, x, w]])
    right = np.array([[w, -x, -y, -z], [x, w, z, -y], [y, -z, w, x], [z, y, -x, w]])
    return np.dot(left, right.conj().transpose())[1:][:, 1:]


def float32_steps(xyz: np.ndarray, steps) -> np.ndarray:
    """(N, 3) points moved by a camera's `steps` as the nuScenes devkit's LidarPointCloud moves its
    float32 points: `rotate` multiplies in float64 and stores float32; `translate` adds the
    translation cast to float32, in float32 (numpy 1.x's rule for a float64 scalar and a float32
    array, which the released code ran on). Returns float32."""
    p = np.asarray(xyz, dtype=np.float32)[:, :3]
    for kind, value in steps:
        if kind == "rotate":
            p = (p.astype(np.float64) @ np.asarray(value, np.float64).T).astype(np.float32)
        elif kind == "translate":
            p = p + np.asarray(value, np.float64).astype(np.float32)
        else:
            raise ValueError(f"unknown transform step {kind!r}")
    return p


def yaw_matrix(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def check_rigid(t: np.ndarray, source: str | Path, what: str) -> np.ndarray:
    """A finite rigid 4x4 transform, or a DatasetError naming the file and what is wrong."""
    t = np.asarray(t, dtype=np.float64)
    if t.shape != (4, 4) or not np.isfinite(t).all():
        raise DatasetError(source, f"{what} is not a finite 4x4 transform: {t.tolist()}")
    r = t[:3, :3]
    if abs(np.linalg.det(r)) < 1e-6:
        raise DatasetError(source, f"{what} is not invertible (rotation determinant {np.linalg.det(r):.3g})")
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-3):
        raise DatasetError(source, f"{what} is not a rotation (R @ R.T differs from identity)")
    return t


def check_intrinsics(k: np.ndarray, source: str | Path, what: str) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all():
        raise DatasetError(source, f"{what} is not a finite 3x3 intrinsic matrix: {np.asarray(k).tolist()}")
    if abs(np.linalg.det(k)) < 1e-9 or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise DatasetError(source, f"{what} is not invertible or has non-positive focal lengths: {k.tolist()}")
    return k


@dataclass(frozen=True)
class Projection:
    """The points of a scan visible in one camera."""

    point_index: np.ndarray  # (M,) int64, index into the scan's points
    uv: np.ndarray  # (M, 2) float64, continuous (u, v) in the original image
    depth: np.ndarray  # (M,) float64, metres along the camera's optical axis

    def __len__(self) -> int:
        return int(self.point_index.shape[0])


def project(points_xyz: np.ndarray, camera: Camera, rule: VisibilityRule, float64: bool = False) -> Projection:
    """Project lidar-frame points into `camera` and keep those visible under `rule`: through the
    camera's released `steps` where it has them (rounded as the released code rounds), else (or
    with `float64`) in one float64 transform. Pixels are computed in float64 either way."""
    xyz = np.asarray(points_xyz, dtype=np.float64)[:, :3]
    if camera.steps and not float64:
        cam = float32_steps(points_xyz, camera.steps).astype(np.float64)
    else:
        cam = transform_points(camera.lidar_to_camera, xyz)
    depth = cam[:, 2]
    keep = depth > rule.min_depth if rule.min_depth is not None else np.ones(len(depth), dtype=bool)
    if rule.min_lidar_x is not None:
        keep &= xyz[:, 0] > rule.min_lidar_x
    index = np.flatnonzero(keep)
    pix = cam[index] @ camera.intrinsics.T
    uv = pix[:, :2] / pix[:, 2:3]
    h, w = camera.image_size
    u, v = uv[:, 0], uv[:, 1]
    inside = (u > 0) & (u < w - rule.far_margin) & (v > 0) & (v < h - rule.far_margin)
    return Projection(point_index=index[inside], uv=uv[inside], depth=depth[index[inside]])


def resize_pixels(uv: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Pixel indices (column, row) in the image resized from `from_hw` to `to_hw`, as float32.

    Floor twice, as the released ScaLR code: the integer pixel at full resolution, floor(u), then
    floor(floor(u) x W' / W); clipped for safety (the visibility rules keep u < W).
    """
    (h, w), (nh, nw) = from_hw, to_hw
    col = np.clip(np.floor(np.floor(uv[:, 0]) * (nw / w)), 0, nw - 1)
    row = np.clip(np.floor(np.floor(uv[:, 1]) * (nh / h)), 0, nh - 1)
    return np.stack([col, row], axis=1).astype(np.float32)
