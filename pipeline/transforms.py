"""Point-cloud transforms of a training sample, as in ScaLR/WaffleIron. Every function takes an
explicit numpy Generator, so a sample is a pure function of its seed. Transforms that drop points
return the indices they keep, so targets, labels and points stay paired. They compute in the
points' own number type (float32, or PandaSet's float64), as the released code does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pykdtree.kdtree import KDTree  # ~1.6x scipy's cKDTree here for 16 neighbours, same results


def voxel_downsample(xyz: np.ndarray, voxel: float, rng: np.random.Generator | None) -> np.ndarray:
    """Indices (sorted) of one point per occupied voxel: a random one, or with `rng` None the
    first in scan order (the released evaluation code's choice). Voxels as the released code
    cuts them: int((p - min p) / voxel) in the points' number type, the cloud's own minimum as
    origin."""
    if len(xyz) == 0 or voxel <= 0:
        return np.arange(len(xyz))
    xyz = _floats(xyz)
    cells = ((xyz - xyz.min(axis=0)) / xyz.dtype.type(voxel)).astype(np.int64)
    span = cells.max(axis=0) + 1
    order = rng.permutation(len(xyz)) if rng is not None else np.arange(len(xyz))
    if float(np.prod(span, dtype=np.float64)) < 2.0**62:  # one int64 per voxel: a 1-D unique, ~5x faster
        keys = (cells[:, 0] * span[1] + cells[:, 1]) * span[2] + cells[:, 2]
        _, first = np.unique(keys[order], return_index=True)
    else:
        _, first = np.unique(cells[order], axis=0, return_index=True)
    return np.sort(order[first])


def _floats(a: np.ndarray) -> np.ndarray:
    """`a` in its own float type (float32 or float64); anything else as float32."""
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def crop_nearest(xyz: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the `max_points` points nearest to a random point (a contiguous crop), sorted."""
    if len(xyz) <= max_points:
        return np.arange(len(xyz))
    centre = xyz[rng.integers(len(xyz))]
    d2 = ((xyz - centre) ** 2).sum(axis=1)
    return np.sort(np.argpartition(d2, max_points - 1)[:max_points])


def _rotation(rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0, 2 * np.pi)  # uniform angle about z
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, s], [-s, c]], dtype=np.float32)


@dataclass(frozen=True)
class Augment:
    """Pretraining (as the released distillation code): one rotation about z, a flip of x or y
    (none, x, y each with probability 1/3) and an isotropic scale of the coordinates; the inputs
    are computed from the augmented points. With `separate_features` (as the released finetune
    code): the inputs are computed from the original points; the coordinates (cells, neighbours,
    field of view) are rotated and flipped, not scaled; the input x, y are rotated by their own
    angle and the input x, y, z and radius scaled, never flipped."""

    rotate: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.9, 1.1)  # (1, 1) for none
    separate_features: bool = False

    def __call__(self, xyz: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        xyz = _floats(xyz).copy()
        if self.rotate:
            xyz[:, :2] = xyz[:, :2] @ _rotation(rng)
        self._flip(xyz, rng)
        if self.scale != (1.0, 1.0):
            xyz *= rng.uniform(*self.scale)
        return xyz

    def apart(self, xyz: np.ndarray, feats: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(coordinates, inputs) augmented separately (`separate_features`); `feats` are the five
        inputs (intensity, x, y, z, radius) of the original points."""
        xyz, feats = _floats(xyz).copy(), _floats(feats).copy()
        if self.rotate:
            xyz[:, :2] = xyz[:, :2] @ _rotation(rng)
            feats[:, 1:3] = feats[:, 1:3] @ _rotation(rng)
        self._flip(xyz, rng)
        if self.scale != (1.0, 1.0):
            feats[:, 1:5] *= rng.uniform(*self.scale)
        return xyz, feats

    def _flip(self, xyz: np.ndarray, rng: np.random.Generator) -> None:
        if self.flip:
            axis = rng.integers(3)  # 0: none, 1: x, 2: y
            if axis:
                xyz[:, axis - 1] *= -1


FOV_EPS = 1e-4  # metres: the released crop keeps lo + eps < p < hi - eps


@dataclass(frozen=True)
class Grid:
    """The student's 3D field of view and its cells: WaffleIron's three 2D planes are its
    (x, y), (x, z) and (y, z) projections."""

    lo: tuple[float, float, float] = (-64.0, -64.0, -8.0)
    hi: tuple[float, float, float] = (64.0, 64.0, 8.0)
    cell: float = 0.5

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(round((high - low) / self.cell)) for low, high in zip(self.lo, self.hi))

    def inside(self, xyz: np.ndarray) -> np.ndarray:
        """Points strictly inside the field of view shrunk by 1e-4 m, as the released code's crop
        (its bounds compared in the points' number type)."""
        xyz = _floats(xyz)
        lo = (np.asarray(self.lo, np.float64) + FOV_EPS).astype(xyz.dtype)
        hi = (np.asarray(self.hi, np.float64) - FOV_EPS).astype(xyz.dtype)
        return ((xyz > lo) & (xyz < hi)).all(axis=1)

    def cells(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) integer cell coordinates of points inside the field of view: int((p - lo) / res)
        in float64, res = extent / cells, as the released code."""
        lo = np.asarray(self.lo, np.float64)
        res = (np.asarray(self.hi, np.float64) - lo) / np.asarray(self.shape)
        c = ((np.asarray(xyz, np.float64) - lo) / res).astype(np.int32)
        return np.clip(c, 0, np.asarray(self.shape) - 1)


def student_features(xyz: np.ndarray, intensity: np.ndarray, norm: tuple[float, float]) -> np.ndarray:
    """WaffleIron's 5 input channels, as the released ScaLR code computes them (in the points'
    number type; the network gets them as float32): intensity standardised with the dataset's
    (mean, std), x, y, z, and the 3-D range sqrt(x^2+y^2+z^2)."""
    mean, std = norm
    xyz = _floats(xyz)
    radius = np.linalg.norm(xyz[:, :3], axis=1, keepdims=True)
    intensity = np.asarray(intensity).astype(xyz.dtype, copy=False)
    return np.concatenate([((intensity - mean) / std)[:, None], xyz, radius], axis=1)


def knn(xyz: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each point's k nearest neighbours, the point itself excluded: the
    released code queries k + 1 and its embedding drops the first (the point). A cloud of k points
    or fewer repeats its farthest neighbour (a lone point is its own neighbour)."""
    n = len(xyz)
    if n == 0:
        return np.zeros((0, k), dtype=np.int64)
    points = np.asarray(xyz, dtype=np.float64)  # float64: the same neighbours, in the same order, as scipy's cKDTree
    _, idx = KDTree(points, leafsize=32).query(points, k=min(k + 1, n))  # 32: ~17% faster than 16 here, same results
    idx = idx.reshape(n, -1)[:, 1:] if n > 1 else np.zeros((1, 1), dtype=np.int64)
    if idx.shape[1] < k:
        idx = np.concatenate([idx, np.repeat(idx[:, -1:], k - idx.shape[1], axis=1)], axis=1)
    return idx.astype(np.int64)
