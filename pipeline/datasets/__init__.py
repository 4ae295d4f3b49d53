"""Dataset readers, by name. Each parses the dataset's own on-disk format into `pipeline.scan.Scan`."""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import LidarDataset
from pipeline.datasets.nuscenes import NuScenes
from pipeline.datasets.pandaset import Pandar64, PandarGT
from pipeline.datasets.semantickitti import SemanticKITTI
from pipeline.datasets.semanticposs import SemanticPOSS
from pipeline.errors import ConfigError

READERS: dict[str, type[LidarDataset]] = {
    "nuscenes": NuScenes,
    "semantickitti": SemanticKITTI,
    "pandar64": Pandar64,
    "pandargt": PandarGT,
    "semanticposs": SemanticPOSS,
}


def open_dataset(name: str, root: str | Path, split: str, keep_going: bool = False) -> LidarDataset:
    """The reader registered under `name` over `root`, for one split. A bad index file raises,
    unless `keep_going`: then it is listed in `.problems` and the scans it describes raise it
    when loaded."""
    try:
        reader = READERS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(READERS)}") from None
    return reader(root, split, keep_going)


__all__ = ["READERS", "LidarDataset", "open_dataset"]
