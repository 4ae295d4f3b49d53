"""A SemanticPOSS-format rig: a 40-beam lidar (+7 to -16 deg, intensity 0-255) in SemanticKITTI's
layout with SemanticPOSS label ids and no camera; sequence 02 is the validation sequence."""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.semanticposs import SemanticPOSS
from pipeline.synth import semantickitti_format
from pipeline.synth.rig import SynthConfig
from pipeline.synth.world import Cls

DEFAULTS = SynthConfig(scenes=2, frames=8, azimuth_steps=1024, beams=40, image_scale=0.5)
RAW_LABEL = {
    Cls.ROAD: 22,
    Cls.LANE_MARKING: 22,
    Cls.SIDEWALK: 22,
    Cls.TERRAIN: 22,
    Cls.BUILDING: 15,
    Cls.VEGETATION: 9,
    Cls.TRUNK: 8,
    Cls.CAR: 7,
    Cls.TRUCK: 0,
    Cls.PEDESTRIAN: 4,
    Cls.POLE: 13,
    Cls.TRAFFIC_SIGN: 10,
    Cls.BARRIER: 17,
    Cls.TRAFFIC_CONE: 16,
}
LAYOUT = semantickitti_format.Layout(
    "semanticposs", 7.0, -16.0, 255.0, RAW_LABEL, SemanticPOSS.sequences, with_camera=False
)


def write(out: Path, cfg: SynthConfig, progress=None) -> dict:
    return semantickitti_format.write(out, cfg, progress, LAYOUT)
