"""SemanticPOSS (Pandora 40-beam lidar, Peking University campus), in SemanticKITTI's layout:
sequences/SS/velodyne/FFFFFF.bin (float32 x 4) and labels/FFFFFF.label (uint32, semantic in the
low 16 bits). No calibrated camera: used to evaluate domain generalisation (a model trained
elsewhere, scored through the shared classes of pipeline/class_maps.py). Scan id "SS/FFFFFF".
Splits: train 00, 01, 03, 04, 05; val 02 (the common convention)."""

from __future__ import annotations

from pipeline.datasets.semantickitti import SemanticKITTI
from pipeline.scan import IGNORE_INDEX, DatasetMeta, VisibilityRule

CLASSES = (
    "person",
    "rider",
    "car",
    "trunk",
    "plants",
    "traffic-sign",
    "pole",
    "trashcan",
    "building",
    "cone/stone",
    "fence",
    "bike",
    "ground",
)

# semantic-poss.yaml: raw id -> (name, class)
RAW_LABELS: dict[int, tuple[str, str | None]] = {
    0: ("unlabeled", None),
    4: ("1 person", "person"),
    5: ("2+ person", "person"),
    6: ("rider", "rider"),
    7: ("car", "car"),
    8: ("trunk", "trunk"),
    9: ("plants", "plants"),
    10: ("traffic sign 1", "traffic-sign"),
    11: ("traffic sign 2", "traffic-sign"),
    12: ("traffic sign 3", "traffic-sign"),
    13: ("pole", "pole"),
    14: ("trashcan", "trashcan"),
    15: ("building", "building"),
    16: ("cone/stone", "cone/stone"),
    17: ("fence", "fence"),
    21: ("bike", "bike"),
    22: ("ground", "ground"),
}


class SemanticPOSS(SemanticKITTI):
    meta = DatasetMeta(
        name="semanticposs",
        class_names=CLASSES,
        raw_names={k: n for k, (n, _) in RAW_LABELS.items()},
        learning_map={k: (CLASSES.index(c) if c else IGNORE_INDEX) for k, (_, c) in RAW_LABELS.items()},
        splits=("train", "val"),
        camera_names=(),
        visibility=VisibilityRule(name="no camera", min_depth=0.0),
        intensity_max=255.0,
        # Not in the released code (no SemanticPOSS there): i / 255, scalr's former rule.
        intensity_mean=0.0,
        intensity_std=255.0,
    )
    sequences = {"train": ("00", "01", "03", "04", "05"), "val": ("02",)}
    camera = None
