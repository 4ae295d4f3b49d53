"""A spinning lidar and pinhole cameras that cast rays into a synthetic world."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.geometry import invert_rigid, transform_points
from pipeline.synth.world import NO_HIT, REFLECTIVITY, Cls, RayGrid, World, cast, shade_colours, surface_class


@dataclass(frozen=True)
class LidarSpec:
    elevations_deg: tuple[float, ...]  # one per beam, top to bottom
    azimuth_steps: int  # rays per beam per revolution
    max_range: float = 70.0
    min_range: float = 1.0
    range_noise: float = 0.015  # metres, Gaussian
    dropout: float = 0.02  # fraction of returns lost at random
    intensity_max: float = 255.0
    integer_intensity: bool = True

    @classmethod
    def uniform(cls, beams: int, top_deg: float, bottom_deg: float, **kw) -> LidarSpec:
        return cls(tuple(np.linspace(top_deg, bottom_deg, beams).tolist()), **kw)


@dataclass(frozen=True)
class LidarSweep:
    points: np.ndarray  # (N, 4) float32 in the lidar frame: x, y, z, intensity
    cls: np.ndarray  # (N,) synthetic class
    ring: np.ndarray  # (N,) beam index
    instance: np.ndarray  # (N,) 1 + index of the primitive hit, 0 for the ground


def _azimuth_blocks(azimuths: np.ndarray, world_to_sensor: np.ndarray, max_range: float):
    """Culling for a spinning sensor: the azimuth columns a primitive can occupy (all beams)."""
    n = len(azimuths)

    def blocks(corners: np.ndarray):
        local = transform_points(world_to_sensor, corners)
        centre = local.mean(axis=0)
        if np.linalg.norm(centre) - np.linalg.norm(local - centre, axis=1).max() > max_range:
            return []
        a_c = np.arctan2(centre[1], centre[0])
        off = np.angle(np.exp(1j * (np.arctan2(local[:, 1], local[:, 0]) - a_c)))
        if off.max() - off.min() > np.pi or np.linalg.norm(local[:, :2], axis=1).min() < 0.5:
            return [(0, None, 0, n)]
        lo, hi = a_c + off.min(), a_c + off.max()
        pad = 2 * np.pi / n
        spans = []
        for a0, a1 in ((lo, hi), (lo + 2 * np.pi, hi + 2 * np.pi), (lo - 2 * np.pi, hi - 2 * np.pi)):
            c0 = int(np.searchsorted(azimuths, a0 - pad))
            c1 = int(np.searchsorted(azimuths, a1 + pad))
            if c1 > c0:
                spans.append((0, None, c0, c1))
        return spans

    return blocks


def sweep(world: World, spec: LidarSpec, lidar_to_world: np.ndarray, rng: np.random.Generator) -> LidarSweep:
    """One revolution from the pose `lidar_to_world` (points motion-compensated to that pose)."""
    el = np.deg2rad(np.asarray(spec.elevations_deg))[:, None]
    az = -np.pi + (np.arange(spec.azimuth_steps) + 0.5) * (2 * np.pi / spec.azimuth_steps)
    local = np.stack(np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)), axis=-1)
    dirs = local @ lidar_to_world[:3, :3].T
    grid = RayGrid(lidar_to_world[:3, 3], dirs, _azimuth_blocks(az, invert_rigid(lidar_to_world), spec.max_range))
    hits = cast(world, grid, spec.max_range)
    keep = (hits.prim != NO_HIT) & (hits.t < spec.max_range) & (hits.t > spec.min_range)
    keep &= rng.random(keep.shape) >= spec.dropout
    beam, col = np.nonzero(keep)  # beam-major order, as a spinning lidar's rings
    t = hits.t[beam, col]
    cls = surface_class(world, hits, _hit_points(grid, hits))[beam, col]
    rng_noise = t + rng.normal(0, spec.range_noise, t.shape)
    xyz = local[beam, col] * rng_noise[:, None]
    cos = np.abs(np.einsum("ij,ij->i", dirs[beam, col], hits.normal[beam, col]))
    refl = np.array([REFLECTIVITY[Cls(c)] for c in range(len(Cls))])[cls]
    intensity = np.clip(refl * (0.4 + 0.6 * cos) * (1 + rng.normal(0, 0.08, t.shape)), 0, 1) * spec.intensity_max
    if spec.integer_intensity:
        intensity = np.round(intensity)
    else:
        intensity = np.round(intensity, 2)
    points = np.concatenate([xyz, intensity[:, None]], axis=1).astype(np.float32)
    instance = np.maximum(hits.prim[beam, col] + 1, 0)
    return LidarSweep(points, cls, beam, instance)


def _hit_points(grid: RayGrid, hits) -> np.ndarray:
    """World position of every hit (the origin where nothing was hit)."""
    return grid.origin + grid.dirs * np.where(np.isfinite(hits.t), hits.t, 0.0)[..., None]


def _pixel_blocks(k: np.ndarray, size: tuple[int, int], world_to_camera: np.ndarray):
    """Culling for a pinhole camera: the projected bounding rectangle of a primitive's corners."""
    h, w = size

    def blocks(corners: np.ndarray):
        cam = transform_points(world_to_camera, corners)
        if (cam[:, 2] <= 0.05).all():
            return []
        if (cam[:, 2] <= 0.05).any():
            return [(0, h, 0, w)]
        uv = (cam @ k.T)[:, :2] / cam[:, 2:3]
        c0, c1 = int(np.clip(np.floor(uv[:, 0].min()) - 1, 0, w)), int(np.clip(np.ceil(uv[:, 0].max()) + 1, 0, w))
        r0, r1 = int(np.clip(np.floor(uv[:, 1].min()) - 1, 0, h)), int(np.clip(np.ceil(uv[:, 1].max()) + 1, 0, h))
        return [(r0, r1, c0, c1)] if r1 > r0 and c1 > c0 else []

    return blocks


def render(
    world: World, k: np.ndarray, size: tuple[int, int], camera_to_world: np.ndarray, max_range: float = 250.0
) -> tuple[np.ndarray, np.ndarray]:
    """((H, W, 3) uint8 image, (H, W) class of each pixel, -1 where nothing is hit); the ray of pixel
    (row j, column i) passes through (i + 0.5, j + 0.5)."""
    h, w = size
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    rays = np.stack([u, v, np.ones_like(u)], axis=-1) @ np.linalg.inv(k).T
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    dirs = rays @ camera_to_world[:3, :3].T
    grid = RayGrid(camera_to_world[:3, 3], dirs, _pixel_blocks(k, size, invert_rigid(camera_to_world)))
    hits = cast(world, grid, max_range)
    points = _hit_points(grid, hits)
    cls = surface_class(world, hits, points)
    return shade_colours(world, hits, points, cls, dirs), cls.reshape(h, w)
