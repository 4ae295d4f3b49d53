"""Aggregated class maps for domain generalisation: a model trained on one dataset is scored on
another through classes both share. Every class of both datasets must be listed, mapped to a
shared class or to None (ignored): a class left out is an error, never a silent ignore."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError
from pipeline.scan import IGNORE_INDEX


@dataclass(frozen=True)
class ClassMap:
    name: str
    classes: tuple[str, ...]  # the shared classes
    maps: dict[str, dict[str, str | None]]  # dataset -> its class -> shared class (None: ignored)

    def lookup(self, dataset: str, class_names: tuple[str, ...]) -> np.ndarray:
        """Shared index of each class index of `dataset` (IGNORE_INDEX for ignored classes), with
        an entry for IGNORE_INDEX itself."""
        if dataset not in self.maps:
            raise ConfigError(f"class map {self.name} has no entry for dataset {dataset}")
        m = self.maps[dataset]
        missing = [c for c in class_names if c not in m]
        if missing:
            raise ConfigError(f"class map {self.name} leaves {dataset} classes unmapped: {missing}")
        bad = [v for v in m.values() if v is not None and v not in self.classes]
        if bad:
            raise ConfigError(f"class map {self.name} maps {dataset} classes to unknown shared classes {bad}")
        lut = np.full(IGNORE_INDEX + 1, IGNORE_INDEX, dtype=np.int64)
        for i, c in enumerate(class_names):
            if m[c] is not None:
                lut[i] = self.classes.index(m[c])
        return lut


# nuScenes <-> SemanticKITTI, the 10 classes of the domain-generalisation literature.
NUSCENES_SEMANTICKITTI = ClassMap(
    name="nuscenes-semantickitti-10",
    classes=(
        "car",
        "bicycle",
        "motorcycle",
        "truck",
        "other_vehicle",
        "pedestrian",
        "driveable_surface",
        "sidewalk",
        "terrain",
        "vegetation",
    ),
    maps={
        "nuscenes": {
            "car": "car",
            "bicycle": "bicycle",
            "motorcycle": "motorcycle",
            "truck": "truck",
            "bus": "other_vehicle",
            "trailer": "other_vehicle",
            "construction_vehicle": "other_vehicle",
            "pedestrian": "pedestrian",
            "driveable_surface": "driveable_surface",
            "sidewalk": "sidewalk",
            "terrain": "terrain",
            "vegetation": "vegetation",
            "barrier": None,
            "traffic_cone": None,
            "other_flat": None,
            "manmade": None,
        },
        "semantickitti": {
            "car": "car",
            "bicycle": "bicycle",
            "motorcycle": "motorcycle",
            "truck": "truck",
            "other-vehicle": "other_vehicle",
            "person": "pedestrian",
            "road": "driveable_surface",
            "parking": "driveable_surface",
            "sidewalk": "sidewalk",
            "terrain": "terrain",
            "vegetation": "vegetation",
            "trunk": "vegetation",
            "bicyclist": None,
            "motorcyclist": None,
            "other-ground": None,
            "building": None,
            "fence": None,
            "pole": None,
            "traffic-sign": None,
        },
    },
)

# nuScenes / SemanticKITTI -> SemanticPOSS: 6 shared classes, grouped as scalr defines them here
# (person, bicycle, car, ground, vegetation, manmade); check the grouping against the reference
# you compare with before putting numbers side by side.
_POSS = {
    "person": "person",
    "rider": "bicycle",
    "car": "car",
    "trunk": "vegetation",
    "plants": "vegetation",
    "traffic-sign": "manmade",
    "pole": "manmade",
    "trashcan": "manmade",
    "building": "manmade",
    "cone/stone": "manmade",
    "fence": "manmade",
    "bike": "bicycle",
    "ground": "ground",
}
TO_SEMANTICPOSS = ClassMap(
    name="to-semanticposs-6",
    classes=("person", "bicycle", "car", "ground", "vegetation", "manmade"),
    maps={
        "semanticposs": _POSS,
        "nuscenes": {
            "pedestrian": "person",
            "bicycle": "bicycle",
            "motorcycle": "bicycle",
            "car": "car",
            "driveable_surface": "ground",
            "sidewalk": "ground",
            "other_flat": "ground",
            "terrain": "ground",
            "vegetation": "vegetation",
            "manmade": "manmade",
            "barrier": "manmade",
            "traffic_cone": "manmade",
            "bus": None,
            "construction_vehicle": None,
            "trailer": None,
            "truck": None,
        },
        "semantickitti": {
            "person": "person",
            "bicyclist": "bicycle",
            "motorcyclist": "bicycle",
            "bicycle": "bicycle",
            "motorcycle": "bicycle",
            "car": "car",
            "road": "ground",
            "parking": "ground",
            "sidewalk": "ground",
            "other-ground": "ground",
            "terrain": "ground",
            "vegetation": "vegetation",
            "trunk": "vegetation",
            "building": "manmade",
            "fence": "manmade",
            "pole": "manmade",
            "traffic-sign": "manmade",
            "truck": None,
            "other-vehicle": None,
        },
    },
)

CLASS_MAPS = {m.name: m for m in (NUSCENES_SEMANTICKITTI, TO_SEMANTICPOSS)}


def find_class_map(source: str, target: str, name: str | None = None) -> ClassMap:
    if name is not None:
        if name not in CLASS_MAPS:
            raise ConfigError(f"unknown class map {name!r}; known: {', '.join(CLASS_MAPS)}")
        return CLASS_MAPS[name]
    for m in CLASS_MAPS.values():
        if source in m.maps and target in m.maps:
            return m
    raise ConfigError(f"no class map between {source} and {target}; known: {', '.join(CLASS_MAPS)}")
