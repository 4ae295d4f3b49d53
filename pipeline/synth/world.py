"""Procedural street scenes and the ray caster shared by the synthetic lidar and cameras.

A world is a flat ground (z = 0, its material a function of x, y: road, lane markings, sidewalk,
terrain, all at the SAME height so only appearance tells them apart) plus boxes (buildings, car
bodies, poles, ...) and spheres (tree crowns, bushes, heads). Lidar and cameras cast rays into the
same world, so every lidar point lands on the pixels of the surface it hit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from pipeline.geometry import yaw_matrix


class Cls(IntEnum):
    """Synthetic surface classes; each rig maps them to its dataset's raw label ids."""

    ROAD = 0
    LANE_MARKING = 1
    SIDEWALK = 2
    TERRAIN = 3
    BUILDING = 4
    VEGETATION = 5
    TRUNK = 6
    CAR = 7
    TRUCK = 8
    PEDESTRIAN = 9
    POLE = 10
    TRAFFIC_SIGN = 11
    BARRIER = 12
    TRAFFIC_CONE = 13


# Base colours (RGB). Shading and texture only scale a colour, so a pixel keeps its class's
# chromaticity: the consistency test relies on it. Cars and trucks have similar shapes and
# different palettes; road, markings, sidewalk and terrain differ only in colour.
PALETTE: dict[Cls, tuple[tuple[int, int, int], ...]] = {
    Cls.ROAD: ((85, 85, 105),),
    Cls.LANE_MARKING: ((235, 235, 225),),
    Cls.SIDEWALK: ((190, 160, 135),),
    Cls.TERRAIN: ((135, 150, 60),),
    Cls.BUILDING: ((185, 105, 80), (200, 170, 90)),
    Cls.VEGETATION: ((45, 125, 50),),
    Cls.TRUNK: ((95, 60, 35),),
    Cls.CAR: ((170, 35, 45), (40, 70, 150), (120, 150, 165)),
    Cls.TRUCK: ((215, 175, 40), (40, 150, 130)),
    Cls.PEDESTRIAN: ((140, 50, 150),),
    Cls.POLE: ((100, 120, 90),),
    Cls.TRAFFIC_SIGN: ((30, 60, 210),),
    Cls.BARRIER: ((230, 130, 30),),
    Cls.TRAFFIC_CONE: ((250, 70, 30),),
}

# Lidar reflectivity in [0, 1] by material (retro-reflective signs and markings are bright).
REFLECTIVITY: dict[Cls, float] = {
    Cls.ROAD: 0.08,
    Cls.LANE_MARKING: 0.55,
    Cls.SIDEWALK: 0.18,
    Cls.TERRAIN: 0.14,
    Cls.BUILDING: 0.3,
    Cls.VEGETATION: 0.22,
    Cls.TRUNK: 0.2,
    Cls.CAR: 0.3,
    Cls.TRUCK: 0.35,
    Cls.PEDESTRIAN: 0.15,
    Cls.POLE: 0.35,
    Cls.TRAFFIC_SIGN: 0.95,
    Cls.BARRIER: 0.45,
    Cls.TRAFFIC_CONE: 0.7,
}

SKY_HORIZON = np.array([160.0, 195.0, 235.0])
SKY_ZENITH = np.array([70.0, 115.0, 200.0])
SUN = np.array([0.45, 0.3, 0.84]) / np.linalg.norm([0.45, 0.3, 0.84])

GROUND = -2  # primitive index of a ground hit
NO_HIT = -1


@dataclass(frozen=True)
class Box:
    centre: np.ndarray  # (3,)
    half: np.ndarray  # (3,) half sizes along the box's own axes
    yaw: float
    cls: Cls
    colour: tuple[int, int, int]
    shade: float = 1.0  # constant darkening (tinted glass of a cabin)

    def corners(self) -> np.ndarray:
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        return (signs * self.half) @ yaw_matrix(self.yaw).T + self.centre


@dataclass(frozen=True)
class Sphere:
    centre: np.ndarray
    radius: float
    cls: Cls
    colour: tuple[int, int, int]
    shade: float = 1.0

    def corners(self) -> np.ndarray:
        return Box(self.centre, np.full(3, self.radius), 0.0, self.cls, self.colour).corners()


@dataclass
class World:
    road_half_width: float
    sidewalk_width: float
    cross_road_x: float
    cross_half_width: float
    primitives: list[Box | Sphere] = field(default_factory=list)

    def ground_class(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Material of the ground at (x, y): road, lane marking, sidewalk or terrain."""
        ay, dx = np.abs(y), np.abs(x - self.cross_road_x)
        main, cross = ay < self.road_half_width, dx < self.cross_half_width
        cls = np.full(x.shape, Cls.TERRAIN, dtype=np.int64)
        walk = (ay < self.road_half_width + self.sidewalk_width) | (dx < self.cross_half_width + self.sidewalk_width)
        cls[walk] = Cls.SIDEWALK
        cls[main | cross] = Cls.ROAD
        along = main & ~cross
        centre_dash = along & (ay < 0.15) & (np.mod(x, 6.0) < 3.0)
        edge_line = along & (np.abs(ay - (self.road_half_width - 0.3)) < 0.12)
        zebra = main & (np.abs(dx - (self.cross_half_width + 2.5)) < 1.5) & (np.mod(y, 1.2) < 0.6)
        cls[centre_dash | edge_line | zebra] = Cls.LANE_MARKING
        return cls


def _hash_noise(p: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Deterministic value in [0, 1) per cell of size 1/scale (a texture tied to geometry)."""
    cell = np.floor(p * scale)
    h = np.sin(cell[..., 0] * 12.9898 + cell[..., 1] * 78.233 + cell[..., 2] * 37.719 + seed * 4.1414) * 43758.5453
    return h - np.floor(h)


def texture(cls: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Scalar brightness pattern per class at world points `p` (same chromaticity)."""
    out = 0.92 + 0.12 * _hash_noise(p, 2.0, 1)
    veg = (cls == Cls.VEGETATION) | (cls == Cls.TERRAIN)
    out[veg] = 0.75 + 0.35 * _hash_noise(p[veg], 3.0, 2)
    bld = cls == Cls.BUILDING
    if bld.any():
        q = p[bld]
        along = np.mod(q[:, 0] + q[:, 1], 3.0)
        floor = np.mod(q[:, 2], 3.2)
        window = (q[:, 2] > 2.5) & (along > 0.6) & (along < 2.1) & (floor > 0.9) & (floor < 2.4)
        out[bld] = np.where(window, 0.5, 0.95 + 0.08 * _hash_noise(q, 1.0, 3))
    return out


@dataclass
class Hits:
    """Result of casting a grid of rays: distance, what was hit, surface normal."""

    t: np.ndarray  # (H, W) distance along the unit ray, inf if nothing was hit
    prim: np.ndarray  # (H, W) primitive index, GROUND or NO_HIT
    normal: np.ndarray  # (H, W, 3)


@dataclass
class RayGrid:
    """Rays from one origin on an (H, W) grid, with a culling rule: `blocks(corners)` returns the
    (row0, row1, col0, col1) sub-grids that can see a primitive with these world corners."""

    origin: np.ndarray  # (3,) world
    dirs: np.ndarray  # (H, W, 3) unit, world
    blocks: callable


def cast(world: World, grid: RayGrid, max_range: float) -> Hits:
    h, w, _ = grid.dirs.shape
    o, d = grid.origin, grid.dirs
    t = np.full((h, w), np.inf)
    prim = np.full((h, w), NO_HIT, dtype=np.int64)
    normal = np.zeros((h, w, 3))
    # Ground plane z = 0, seen from above.
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(d[..., 2] < -1e-9, -o[2] / d[..., 2], np.inf)
    hit = tg < max_range
    t[hit], prim[hit] = tg[hit], GROUND
    normal[hit] = (0.0, 0.0, 1.0)
    for index, p in enumerate(world.primitives):
        for r0, r1, c0, c1 in grid.blocks(p.corners()):
            sub = d[r0:r1, c0:c1]
            if sub.size == 0:
                continue
            tp, n = _intersect(p, o, sub)
            cur = t[r0:r1, c0:c1]
            closer = tp < cur
            if closer.any():
                cur[closer] = tp[closer]
                prim[r0:r1, c0:c1][closer] = index
                normal[r0:r1, c0:c1][closer] = n[closer]
    return Hits(t, prim, normal)


def _intersect(p: Box | Sphere, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the first intersection of each ray with primitive `p` (inf if none) and the normal."""
    if isinstance(p, Sphere):
        oc = origin - p.centre
        b = dirs @ oc
        disc = b * b - (oc @ oc - p.radius**2)
        with np.errstate(invalid="ignore"):
            tp = -b - np.sqrt(disc)
        tp = np.where((disc > 0) & (tp > 1e-6), tp, np.inf)
        n = origin + dirs * np.where(np.isfinite(tp), tp, 0.0)[..., None] - p.centre
        return tp, n / p.radius
    rot = yaw_matrix(p.yaw)
    lo = rot.T @ (origin - p.centre)  # origin in the box frame
    ld = dirs @ rot  # directions in the box frame (rot.T applied to each row)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-p.half - lo) / ld
        t2 = (p.half - lo) / ld
    tnear = np.minimum(t1, t2)
    tfar = np.maximum(t1, t2)
    tmin = np.nan_to_num(tnear, nan=-np.inf).max(axis=-1)
    tmax = np.nan_to_num(tfar, nan=np.inf).min(axis=-1)
    hit = (tmax >= tmin) & (tmin > 1e-6)
    tp = np.where(hit, tmin, np.inf)
    axis = np.nan_to_num(tnear, nan=-np.inf).argmax(axis=-1)
    local_n = np.zeros(dirs.shape)
    np.put_along_axis(local_n, axis[..., None], -np.sign(np.take_along_axis(ld, axis[..., None], axis=-1)), axis=-1)
    return tp, local_n @ rot.T


def surface_class(world: World, hits: Hits, points: np.ndarray) -> np.ndarray:
    """Synthetic class of every hit (ground material or primitive class); -1 where nothing was hit."""
    prim_cls = np.array([p.cls for p in world.primitives] + [-1], dtype=np.int64)
    cls = prim_cls[np.where(hits.prim >= 0, hits.prim, len(world.primitives))]
    ground = hits.prim == GROUND
    cls[ground] = world.ground_class(points[ground][:, 0], points[ground][:, 1])
    return cls


def shade_colours(world: World, hits: Hits, points: np.ndarray, cls: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """RGB per ray: base colour x Lambert shading x texture; sky where nothing was hit."""
    base = np.zeros(hits.t.shape + (3,))
    scale = np.ones(hits.t.shape)
    for index, p in enumerate(world.primitives):
        sel = hits.prim == index
        if sel.any():
            base[sel] = p.colour
            scale[sel] = p.shade
    ground = hits.prim == GROUND
    for c in (Cls.ROAD, Cls.LANE_MARKING, Cls.SIDEWALK, Cls.TERRAIN):
        base[ground & (cls == c)] = PALETTE[c][0]
    hit = hits.prim != NO_HIT
    lambert = 0.45 + 0.55 * np.clip(hits.normal @ SUN, 0.0, 1.0)
    scale = scale * lambert
    scale[hit] *= texture(cls[hit], points[hit])
    rgb = base * scale[..., None]
    up = np.clip(dirs[..., 2], 0.0, 1.0)[..., None]
    sky = SKY_HORIZON * (1 - up) + SKY_ZENITH * up
    rgb[~hit] = sky[~hit]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def generate_world(rng: np.random.Generator, ego_lane_y: float, ego_x_range: tuple[float, float]) -> World:
    """A random street: a main road along x, a cross road, buildings, trees, street furniture,
    parked and driving vehicles, pedestrians. The ego lane is kept clear along the ego's path."""
    world = World(
        road_half_width=7.0, sidewalk_width=3.0, cross_road_x=float(rng.uniform(25, 55)), cross_half_width=6.0
    )
    prims = world.primitives
    half_w, walk = world.road_half_width, world.sidewalk_width
    x_lo, x_hi = -90.0, 130.0

    def near_cross(x: float, margin: float) -> bool:
        return abs(x - world.cross_road_x) < world.cross_half_width + walk + margin

    def pick(c: Cls) -> tuple[int, int, int]:
        options = PALETTE[c]
        return options[int(rng.integers(len(options)))]

    def box(cx, cy, z0, length, width, height, yaw, c, colour=None, shade=1.0):
        prims.append(
            Box(
                np.array([cx, cy, z0 + height / 2]),
                np.array([length / 2, width / 2, height / 2]),
                yaw,
                c,
                colour or pick(c),
                shade,
            )
        )

    # Buildings on both sides of the main road, and along the cross road.
    for side in (-1, 1):
        x = x_lo
        while x < x_hi:
            length = rng.uniform(8, 22)
            if not near_cross(x + length / 2, length / 2 + 1):
                depth = rng.uniform(8, 16)
                setback = half_w + walk + rng.uniform(4.5, 8)
                box(
                    x + length / 2,
                    side * (setback + depth / 2),
                    0,
                    length,
                    depth,
                    rng.uniform(6, 24),
                    0.0,
                    Cls.BUILDING,
                )
            x += length + rng.uniform(1, 6)
        for k in range(3):
            y0 = side * (half_w + walk + 16 + k * 14)
            for cx in (world.cross_road_x - 16, world.cross_road_x + 16):
                box(cx, y0, 0, 12, 10, rng.uniform(6, 18), 0.0, Cls.BUILDING)

    # Trees (trunk + crown) and bushes in the terrain strip; poles with signs at the kerb.
    for side in (-1, 1):
        x = x_lo + rng.uniform(0, 8)
        while x < x_hi:
            if not near_cross(x, 2):
                y = side * (half_w + walk + rng.uniform(1.2, 3.5))
                if rng.random() < 0.6:
                    h = rng.uniform(2, 3.5)
                    box(x, y, 0, 0.35, 0.35, h, 0.0, Cls.TRUNK)
                    r = rng.uniform(1.3, 2.4)
                    prims.append(Sphere(np.array([x, y, h + 0.6 * r]), r, Cls.VEGETATION, pick(Cls.VEGETATION)))
                else:
                    r = rng.uniform(0.6, 1.1)
                    prims.append(Sphere(np.array([x, y, 0.5 * r]), r, Cls.VEGETATION, pick(Cls.VEGETATION)))
            x += rng.uniform(6, 14)
        x = x_lo + rng.uniform(0, 10)
        while x < x_hi:
            if not near_cross(x, 0):
                y = side * (half_w + 0.5)
                box(x, y, 0, 0.2, 0.2, rng.uniform(4, 7), 0.0, Cls.POLE)
                if rng.random() < 0.6:
                    box(x, y, rng.uniform(2.2, 3.0), 0.06, 0.8, 0.8, 0.0, Cls.TRAFFIC_SIGN)
            x += rng.uniform(14, 26)

    def clear_of_ego(x: float, y: float, margin: float) -> bool:
        return abs(y - ego_lane_y) > 2.2 or not (ego_x_range[0] - margin < x < ego_x_range[1] + margin)

    def vehicle(x: float, y: float, yaw: float, c: Cls) -> None:
        colour = pick(c)
        if c == Cls.CAR:
            length, width, body_h, cab_h = (
                rng.uniform(3.9, 4.8),
                rng.uniform(1.7, 1.9),
                rng.uniform(0.9, 1.1),
                rng.uniform(0.5, 0.65),
            )
        else:  # vans and box trucks: the same box-on-box shape, bigger, and their own colours
            length, width, body_h, cab_h = (
                rng.uniform(5.0, 7.5),
                rng.uniform(2.0, 2.4),
                rng.uniform(1.5, 2.4),
                rng.uniform(0.5, 0.7),
            )
        box(x, y, 0.25, length, width, body_h, yaw, c, colour)
        offset = np.array([-0.15 * length, 0.0]) @ yaw_matrix(yaw)[:2, :2].T
        box(x + offset[0], y + offset[1], 0.25 + body_h, 0.5 * length, 0.92 * width, cab_h, yaw, c, colour, shade=0.55)

    # Parked vehicles in the outer lanes, driving ones in the inner lanes, never on the ego's path.
    for lane_y, parked in ((-5.25, True), (5.25, True), (1.75, False), (-1.75, False)):
        x = x_lo + rng.uniform(0, 10)
        while x < x_hi:
            if not near_cross(x, 1) and clear_of_ego(x, lane_y, 12) and rng.random() < (0.6 if parked else 0.35):
                c = Cls.TRUCK if rng.random() < 0.25 else Cls.CAR
                yaw = (0.0 if lane_y < 0 else np.pi) + rng.normal(0, 0.03 if parked else 0.01)
                vehicle(x, lane_y, yaw, c)
            x += rng.uniform(6, 12)

    # Pedestrians on the sidewalks (body + head), barriers and cones around the intersection.
    for _ in range(int(rng.integers(8, 16))):
        x = rng.uniform(x_lo, x_hi)
        y = rng.choice([-1, 1]) * (half_w + rng.uniform(0.8, walk - 0.3))
        colour = pick(Cls.PEDESTRIAN)
        box(x, y, 0, 0.45, 0.35, 1.45, rng.uniform(0, np.pi), Cls.PEDESTRIAN, colour)
        prims.append(Sphere(np.array([x, y, 1.6]), 0.13, Cls.PEDESTRIAN, colour))
    for _ in range(int(rng.integers(2, 5))):
        x = world.cross_road_x + rng.choice([-1, 1]) * (world.cross_half_width + rng.uniform(0.5, 2))
        y = rng.choice([-1, 1]) * rng.uniform(half_w + 0.3, half_w + 2)
        box(x, y, 0, 2.0, 0.4, 0.9, rng.uniform(-0.3, 0.3), Cls.BARRIER)
    for _ in range(int(rng.integers(3, 8))):
        x = rng.uniform(x_lo, x_hi)
        y = rng.choice([-1, 1]) * (half_w - rng.uniform(0.3, 1.0))
        if clear_of_ego(x, y, 3):
            box(x, y, 0, 0.35, 0.35, 0.7, 0.0, Cls.TRAFFIC_CONE)
    return world
