"""Student features of every scan of a split, written as a feature store.

For each scan: the released evaluation code's inputs (no augmentation, no crop; 0.1 m voxels
keeping each voxel's first point in scan order, `--voxel-size 0` for every point; the field of
view of the dataset's released evaluation settings), the backbone in eval mode, and one store
entry (camera "lidar") holding the kept points, their `point_index` into the raw scan and their
features. The store is a points-layout feature store like a teacher's, so `inspect`, `verify`,
plain zarr / pyarrow / dask and the pictures read it as they read teacher stores; its
`teacher` attribute says `kind: student` and names the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.datasets import LidarDataset, open_dataset
from pipeline.errors import ConfigError, DatasetError
from pipeline.transforms import Grid
from stages.extract.extract import dataset_attributes, intensity_attributes
from stages.extract.weights import sha256_file
from stages.runtime import pick_device
from stages.student.checkpoints import build_backbone, read_checkpoint_for, recipe_of, recorded_student
from stages.student.infer import released_eval_sample, run_on_scan
from stages.student.samples import SampleConfig
from stages.student.waffleiron import WaffleIron
from storage.feature_store import FeatureStore, PartWriter, StorePlan
from storage.layout import FORMAT, FORMAT_VERSION

CAMERA = "lidar"  # the one entry of a scan: every kept point, seen or not by a camera
NO_PIXEL = -1.0  # student stores have no image: `pixel` is (-1, -1)


@dataclass(frozen=True)
class EmbedConfig:
    checkpoint: Path
    dataset: str
    root: Path
    out: Path
    split: str = "val"
    voxel_size: float | None = None  # None: the released evaluation's 0.1 m; 0: every point
    dtype: str = "float16"  # float16 (half the bytes) or float32 (the backbone's own values)
    grid: Grid | None = None  # None: the dataset's released evaluation field of view
    device: str = "auto"
    max_scans: int | None = None
    scans_per_part: int = 16
    recipe: str | None = None  # the recipe that made the student (None: its record's, or what a released file shows)

    def __post_init__(self):
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"--dtype {self.dtype!r}: float16 or float32")
        if self.voxel_size is not None and self.voxel_size < 0:
            raise ConfigError(f"--voxel-size {self.voxel_size}: 0 (every point) or a size in metres")


def embed(cfg: EmbedConfig) -> FeatureStore:
    """Fill the store at cfg.out (creating or continuing it) and return it."""
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split)
    scans = ds.scan_ids if cfg.max_scans is None else ds.scan_ids[: cfg.max_scans]
    if not scans:
        raise DatasetError(cfg.root, f"split {cfg.split} has no scans")
    state = read_checkpoint_for(cfg.checkpoint, cfg.recipe, "this evaluation")
    sample = released_eval_sample(ds.meta)
    neighbours = recorded_student(cfg.checkpoint, state["config"]).neighbours
    voxel = sample.voxel if cfg.voxel_size is None else cfg.voxel_size
    sample = replace(sample, voxel=voxel, grid=cfg.grid or sample.grid, neighbours=neighbours)
    backbone = build_backbone(cfg.checkpoint, state, sample.grid.shape).eval()
    device = pick_device(cfg.device)
    backbone.to(device)
    store = FeatureStore.create_or_open(
        cfg.out, student_store_attributes(cfg, ds, scans, backbone, state["config"], sample)
    )
    plan = StorePlan(len(scans), cfg.scans_per_part)
    todo = [p for p in range(plan.parts) if p not in set(store.committed_parts())]
    with tqdm(total=sum(len(plan.scans_of(p)) for p in todo), desc="embed", unit="scan", dynamic_ncols=True) as bar:
        for parts in store.claimed(todo, at_once=1):  # claimed first: two runs into one store share it
            writer = PartWriter(store, parts[0])
            for index in plan.scans_of(parts[0]):
                writer.add(*_entry(ds, index, backbone, sample, cfg.dtype, device))
                bar.update()
            writer.commit()
    return FeatureStore(cfg.out)


def student_store_attributes(
    cfg: EmbedConfig, ds: LidarDataset, scans: list[str], backbone: WaffleIron, record: dict, sample: SampleConfig
) -> dict:
    """A student store's attributes: a teacher store's, with the checkpoint as its `teacher`."""
    student = backbone.cfg
    grid = sample.grid
    kept = f"voxels of {sample.voxel} m, first point of each in scan order" if sample.voxel > 0 else "every point"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scalr_version": __version__,
        "teacher": {
            "name": f"student:{Path(cfg.checkpoint).name}",
            "kind": "student",
            "timm_name": "-",
            "dim": student.width,
            "patch": 0,
            "weights": sha256_file(cfg.checkpoint),
            "random_init": False,
            "checkpoint": str(Path(cfg.checkpoint).resolve()),
            "stage": record.get("stage"),
            "depth": student.depth,
            "norm": student.norm,
            "activation": student.activation,
        },
        "image_size": None,
        "dataset": dataset_attributes(ds, cfg.split, scans),
        "dataset_root": str(Path(cfg.root).resolve()),
        "index_problems": [],
        "cameras": [CAMERA],
        "intensity_max": ds.meta.intensity_max,
        "intensity": intensity_attributes(ds),
        "plan": {"scans": len(scans), "scans_per_part": cfg.scans_per_part},
        "projection": f"student features: {kept}, inside {grid.lo} - {grid.hi} m (1e-4 m margin), {grid.shape} cells; "
        "no pixel (-1)",
        "sample": {
            "voxel": sample.voxel,
            "grid": {"lo": list(grid.lo), "hi": list(grid.hi), "cell": grid.cell},
            "neighbours": sample.neighbours,
        },
        "dtype": cfg.dtype,
        "layout": "points",
        "quantize": "none",
        "grid_size": None,
        "points_dtype": ds.meta.points_dtype,
        "recipe": recipe_of(record),  # the student's: the store's data is its evaluation grid, the same in both
    }


def _entry(
    ds: LidarDataset, index: int, backbone: WaffleIron, sample: SampleConfig, dtype: str, device: torch.device
) -> tuple[dict, dict | None]:
    scan = ds[index]
    row = {
        "scan_index": index,
        "scan_id": scan.scan_id,
        "camera": CAMERA,
        "scan_points": scan.num_points,
        "image_height": 0,
        "image_width": 0,
        "status": "ok",
        "reason": "",
    }
    keep, features = run_on_scan(backbone, scan.points, ds.meta.intensity_norm, sample, device)
    if features is None:
        return row, None
    features = features.float().cpu().numpy()
    if dtype == "float16" and not np.isfinite(features.astype(np.float16)).all():
        raise FloatingPointError(
            f"student features of {scan.scan_id} overflow float16 (|x| > 65504); use --dtype float32"
        )
    return row, {
        "points": scan.points[keep],  # in the dataset's number type (the store's points_dtype)
        "point_index": keep.astype(np.int32),
        "pixel": np.full((len(keep), 2), NO_PIXEL, dtype=np.float32),
        "features": features.astype(dtype),
    }
