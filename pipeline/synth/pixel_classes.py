"""The synthetic rigs' per-pixel class maps: what each camera pixel sees (a `world.Cls`, or NONE
for the sky), as the renderer computes it. They are kept apart from the datasets' real layouts
(`ROOT/.scalr-classes/<image path>.png`), so the readers and formats stay exactly real; the oracle
teacher (stages/extract/teachers.py) reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DatasetError
from pipeline.files import check_regular

FOLDER = ".scalr-classes"
NONE = 255  # no surface (sky)


def class_map_path(root: Path, image_path: Path) -> Path:
    return Path(root) / FOLDER / f"{Path(image_path).relative_to(root)}.png"


def save_class_map(root: Path, image_path: Path, classes: np.ndarray) -> None:
    """`classes`: (H, W) int class ids of the image's pixels, -1 where nothing is seen."""
    path = class_map_path(root, image_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(classes < 0, NONE, classes).astype(np.uint8)).save(path)


def load_class_map(root: Path, image_path: Path) -> np.ndarray:
    """(H, W) uint8 class map of a camera image; a DatasetError naming the file when absent."""
    path = class_map_path(root, image_path)
    if not path.is_file():
        raise DatasetError(path, "no class map: only the synthetic rigs (scalr synth) have them")
    check_regular(path, DatasetError)
    with Image.open(path) as img:
        return np.array(img)  # writable: torch takes it as it is
