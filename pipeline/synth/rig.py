"""What both synthetic rigs share: the generator's config and the ego vehicle's motion."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.geometry import rigid, yaw_matrix
from pipeline.synth.world import World, generate_world

EGO_LANE_Y = -1.75  # the ego drives in the right-hand inner lane, along +x


@dataclass(frozen=True)
class SynthConfig:
    """Size and sensors of a synthetic dataset; `None` takes the format's default."""

    seed: int = 0
    scenes: int | None = None  # nuScenes scenes / SemanticKITTI sequences
    frames: int | None = None  # keyframes per scene / frames per sequence
    azimuth_steps: int | None = None  # lidar rays per beam per revolution
    beams: int | None = None
    image_scale: float | None = None  # camera resolution relative to the real sensor
    speed: float = 10.0  # ego speed, m/s


@dataclass(frozen=True)
class EgoMotion:
    """Straight drive at constant speed; pose(t) maps the ego frame (x forward, y left, z up,
    origin on the ground) into the scene's world frame."""

    start_x: float
    heading: float
    speed: float

    def pose(self, t: float) -> np.ndarray:
        direction = np.array([np.cos(self.heading), np.sin(self.heading), 0.0])
        return rigid(yaw_matrix(self.heading), np.array([self.start_x, EGO_LANE_Y, 0.0]) + self.speed * t * direction)


def scene_setup(seed: int, scene: int, duration: float, speed: float) -> tuple[np.random.Generator, World, EgoMotion]:
    """Deterministic world and ego motion of scene number `scene` of a dataset made with `seed`."""
    rng = np.random.default_rng([seed, scene])
    ego = EgoMotion(start_x=float(rng.uniform(-15, 0)), heading=float(rng.normal(0, 0.01)), speed=speed)
    end_x = ego.start_x + speed * duration
    world = generate_world(rng, EGO_LANE_Y, (ego.start_x - 5, end_x + 5))
    return rng, world, ego


def token(*parts) -> str:
    """A stable 32-hex-digit token, like nuScenes'."""
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:32]
