"""probe-store: what a teacher can teach, from its store alone, before any student is distilled.

A linear classifier is fitted on the cached targets of the labelled visible points of a training
store (labels read through the dataset's reader at each entry's `point_index`) and scored on the
visible points of a validation store: mIoU and per-class IoU, and how many visible points each
class has (what the teacher can see at all). Stores of several teachers of one split join as
pretraining joins them (their targets concatenated). This is the 2D upper bound distillation aims
at; ranking teachers, layers or resolutions takes minutes instead of a pretraining each.

The result is a run folder (config.json with stage "probe-store", metrics.jsonl, the evaluation
JSON) that `scalr runs` lists beside students.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import __version__
from pipeline.config import to_dict
from pipeline.datasets import LidarDataset, open_dataset
from pipeline.errors import ConfigError, DatasetError
from pipeline.scan import IGNORE_INDEX
from stages.downstream.evaluate import confusion, iou_from_confusion
from stages.runtime import pick_device, seeded
from stages.student.samples import StoreGroup, group_stores
from storage.atomic import disk_errors, write_atomically
from storage.checkpoint import write_json
from storage.runs import RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeStoreConfig:
    train_stores: tuple[Path, ...]  # of the training split (one per teacher)
    val_stores: tuple[Path, ...]  # of the validation split, the same teachers
    dataset: str  # the labels' reader
    root: Path
    out: Path
    fraction: float = 1.0  # of the scans of each store, sampled evenly (terabyte stores)
    epochs: int = 30
    batch_points: int = 65536  # at most; at least 20 batches an epoch on small stores
    lr: float = 1e-2
    weight_decay: float = 1e-4
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction {self.fraction}: in (0, 1]")


@dataclass
class Points:
    """Visible labelled points of a split: their joined targets and labels."""

    features: np.ndarray  # (N, D) float16
    labels: np.ndarray  # (N,) int64 class indices

    def per_class(self, classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=classes)[:classes].tolist()


def one_group(paths: tuple[Path, ...], what: str) -> StoreGroup:
    groups = group_stores(list(paths))
    if len(groups) != 1:
        raise ConfigError(
            f"--{what} stores hold {len(groups)} datasets ({', '.join(g.name for g in groups)}); give one split"
        )
    return groups[0]


def visible_points(group: StoreGroup, ds: LidarDataset, fraction: float) -> Points:
    """Every labelled point of the sampled scans' entries (a point seen by two cameras twice, with
    each camera's target), read through the group's stores and labelled by the dataset's reader."""
    scans = sorted(group.by_scan)
    if fraction < 1:
        scans = [
            scans[i]
            for i in np.unique(np.linspace(0, len(scans) - 1, max(1, round(fraction * len(scans)))).astype(int))
        ]
    features, labels = [], []
    for scan_id in tqdm(scans, desc=f"probe-store {group.name}", unit="scan"):
        scan = ds[ds.index_of(scan_id)]
        if scan.labels is None:
            raise DatasetError(
                ds.root, f"scan {scan_id} has no labels; {ds.meta.name} {ds.split} cannot score a teacher"
            )
        for camera, locations in group.by_scan[scan_id]:
            points = group.read_points(f"{scan_id}/{camera}", locations)
            label = scan.labels[points["point_index"]]
            rows = np.flatnonzero(label != IGNORE_INDEX)
            features.append(group.read_targets(locations, rows, points["pixel"]))
            labels.append(label[rows].astype(np.int64))
    if not labels or not sum(len(x) for x in labels):
        raise DatasetError(ds.root, f"no labelled visible point in the {group.name} stores")
    return Points(np.concatenate(features), np.concatenate(labels))


def fit_linear(
    cfg: ProbeStoreConfig, train: Points, classes: int, device: torch.device, metrics: Path
) -> torch.nn.Module:
    """A linear classifier on standardised targets (AdamW, cross-entropy, shuffled batches of
    points); one metrics line per epoch."""
    x = torch.from_numpy(train.features).float()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    with seeded(cfg.seed):
        model = torch.nn.Sequential(Standardise(mean, std), torch.nn.Linear(x.shape[1], classes)).to(device)
    y = torch.from_numpy(train.labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order_rng = torch.Generator().manual_seed(cfg.seed)
    batch = max(256, min(cfg.batch_points, -(-len(y) // 20)))  # enough steps to converge on a small store
    for epoch in range(cfg.epochs):
        order, total, t0 = torch.randperm(len(y), generator=order_rng), 0.0, time.time()
        for start in range(0, len(y), batch):
            rows = order[start : start + batch]
            loss = F.cross_entropy(model(x[rows].to(device)), y[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        line = {
            "step": epoch + 1,
            "epoch": epoch,
            "loss": total / len(y),
            "lr": cfg.lr,
            "time": time.time(),
            "seconds": time.time() - t0,
        }
        with disk_errors(metrics), open(metrics, "a") as f:
            f.write(json.dumps(line) + "\n")
    return model.eval()


class Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def score(model: torch.nn.Module, val: Points, classes: int, device: torch.device, batch: int) -> dict:
    predictions = np.concatenate(
        [
            model(torch.from_numpy(val.features[s : s + batch]).float().to(device)).argmax(1).cpu().numpy()
            for s in range(0, len(val.labels), batch)
        ]
    )
    return iou_from_confusion(confusion(predictions, val.labels, classes))


def check_same_teaching(train: StoreGroup, val: StoreGroup) -> None:
    """The validation stores hold the targets of the same teachers (weights, layer, position
    embeddings), at the same image size and recipe, as the training stores: a probe fitted on one
    teacher's features and scored on another's would be a number about neither."""
    if train.teachers != val.teachers or train.dims != val.dims:
        raise ConfigError(f"--train teachers {train.teachers} and --val teachers {val.teachers} differ")
    for a, b in zip(train.stores, val.stores):
        teacher_a, teacher_b = ({k: v for k, v in s.attrs["teacher"].items() if k != "hub"} for s in (a, b))
        for key, x, y in (
            ("teacher", teacher_a, teacher_b),
            ("image_size", a.attrs.get("image_size"), b.attrs.get("image_size")),
            ("recipe", a.attrs.get("recipe"), b.attrs.get("recipe")),
        ):
            if x != y:
                raise ConfigError(f"{b.path}: its {key} differs from {a.path}'s ({y} vs {x}); probe like with like")


def probe_store(cfg: ProbeStoreConfig) -> dict:
    """Fit on the training stores, score on the validation stores; write and return the result."""
    train_group, val_group = one_group(cfg.train_stores, "train"), one_group(cfg.val_stores, "val")
    check_same_teaching(train_group, val_group)
    train_ds = open_dataset(cfg.dataset, cfg.root, train_group.dataset["split"])
    val_ds = open_dataset(cfg.dataset, cfg.root, val_group.dataset["split"])
    run, classes, device = RunFolder(cfg.out), train_ds.meta.num_classes, pick_device(cfg.device)
    with run.training():
        stores = [
            {"path": str(s.path), "teacher": s.attrs["teacher"], "dataset": s.attrs["dataset"]}
            for s in train_group.stores
        ]
        record = {
            "stage": "probe-store",
            "scalr_version": __version__,
            "config": to_dict(cfg),
            "stores": stores,
            "dataset": {"name": train_ds.meta.name, "split": train_ds.split},
        }
        write_json(run.record, record)
        run.metrics.unlink(missing_ok=True)
        train, val = (
            visible_points(train_group, train_ds, cfg.fraction),
            visible_points(val_group, val_ds, cfg.fraction),
        )
        log.info(
            "probe-store: %d training and %d validation points, %d dims",
            len(train.labels),
            len(val.labels),
            train.features.shape[1],
        )
        model = fit_linear(cfg, train, classes, device, run.metrics)
        scores = score(model, val, classes, device, cfg.batch_points)
        names = train_ds.meta.class_names
        result = {
            "stage": "probe-store",
            "teachers": train_group.teachers,
            "dataset": val_ds.meta.name,
            "split": val_ds.split,
            "miou": scores["miou"],
            "accuracy": scores["accuracy"],
            "per_class_iou": {n: None if np.isnan(v) else float(v) for n, v in zip(names, scores["iou"])},
            "visible_points": {
                "train": dict(zip(names, train.per_class(classes))),
                "val": dict(zip(names, val.per_class(classes))),
            },
            "points": {"train": len(train.labels), "val": len(val.labels)},
            "fraction": cfg.fraction,
        }
        out = run.evaluation(val_ds.meta.name, val_ds.split)
        write_atomically(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    return {**result, "json": str(out)}


def result_lines(result: dict) -> list[str]:
    lines = [
        f"probe-store: linear probe of {', '.join(result['teachers'])} on {result['dataset']} {result['split']} "
        f"({result['points']['train']:,} training, {result['points']['val']:,} validation points)"
    ]
    lines.append(f"  {'class':<22}{'IoU':>6}{'visible train':>16}{'visible val':>14}")
    seen = result["visible_points"]
    for name, iou in result["per_class_iou"].items():
        shown = "  n/a" if iou is None else f"{100 * iou:5.1f}"
        lines.append(f"  {name:<22}{shown:>6}{seen['train'][name]:>16,}{seen['val'][name]:>14,}")
    lines.append(f"  {'mIoU':<22}{100 * result['miou']:>6.1f}")
    lines.append(f"  written to {result['json']}")
    return lines
