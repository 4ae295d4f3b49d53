"""evaluate: mIoU of a segmentation model on a labelled split.

Each scan is voxelised like in training (no augmentation, no crop), the model predicts on the
kept points, and every original point takes the prediction of its nearest kept point. One
confusion matrix over the whole split gives per-class IoU = TP / (TP + FP + FN); mIoU is the
NaN-mean over classes (a class absent from both labels and predictions has no IoU and does not
count), plus overall accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn
from tqdm import tqdm

from pipeline.class_maps import find_class_map
from pipeline.corruptions import CORRUPTIONS, MINKUNET18_NUSCENES_C, robustness
from pipeline.datasets import LidarDataset, open_dataset
from pipeline.errors import ConfigError, DatasetError
from pipeline.scan import IGNORE_INDEX
from stages.downstream.segmenter import build_segmenter, segmenter_classes
from stages.recipes import downstream_precision
from stages.runtime import autocast, pick_device
from stages.student.checkpoints import read_checkpoint_for, recipe_of
from stages.student.infer import run_on_scan, trained_sample_config
from stages.student.samples import SampleConfig
from stages.student.train import tensorboard_writer
from storage.checkpoint import CheckpointError
from storage.runs import RunFolder

VEHICLES = {"car", "truck", "bus", "trailer", "construction_vehicle", "other-vehicle", "motorcycle", "bicycle"}


@dataclass(frozen=True)
class EvaluateConfig:
    dataset: str
    root: Path
    checkpoint: Path
    split: str = "val"
    out: Path | None = None  # JSON file (default: beside the checkpoint's run folder)
    device: str = "auto"
    max_scans: int | None = None
    sample: SampleConfig | None = None  # default: the voxel size, grid and neighbours the model was trained with
    corruptions: tuple[str, ...] = ()  # names from pipeline.corruptions.CORRUPTIONS, each at severities 1-3
    seed: int = 0  # corruptions are deterministic for a seed
    class_map: str | None = None  # across datasets: a map of pipeline.class_maps (found automatically)
    recipe: str | None = None  # the recipe that made the model (None: its record's, or what a released file shows)
    precision: str | None = None  # autocast (None: the model's recipe's, as its released evaluation: bf16 for ScaLR+)


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    valid = labels != IGNORE_INDEX
    return np.bincount(labels[valid].astype(np.int64) * num_classes + pred[valid], minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def iou_from_confusion(cm: np.ndarray, num_classes: int | None = None) -> dict:
    """Rows = labels, columns = predictions; IoU of the first `num_classes` classes (trailing
    columns, such as "other" across datasets, only count as errors)."""
    n = num_classes or len(cm)
    tp = np.diag(cm).astype(np.float64)[:n]
    denom = (cm.sum(0) + cm.sum(1))[:n] - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    total = cm.sum()
    return {
        "iou": iou,
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "accuracy": float(tp.sum() / total) if total else float("nan"),
    }


@dataclass(frozen=True)
class Scoring:
    """Where predictions and labels are scored: the dataset's own classes, or, across datasets, a
    map's shared classes plus an "other" column for predictions outside them (always wrong)."""

    class_names: tuple[str, ...]
    pred_lut: np.ndarray  # trained class -> scored class
    label_lut: np.ndarray  # the dataset's class -> scored class
    columns: int  # of the confusion matrix
    class_map: str | None

    @classmethod
    def of(cls, trained_on: str, trained_classes: tuple[str, ...], meta, class_map: str | None) -> Scoring:
        if trained_on == meta.name and trained_classes == meta.class_names:
            names = meta.class_names
            lut = np.append(np.arange(len(names)), np.full(IGNORE_INDEX + 1 - len(names), IGNORE_INDEX))
            return cls(names, lut, lut, len(names), None)
        cmap = find_class_map(trained_on, meta.name, class_map)
        pred_lut, label_lut = cmap.lookup(trained_on, trained_classes), cmap.lookup(meta.name, meta.class_names)
        pred_lut[pred_lut == IGNORE_INDEX] = len(cmap.classes)  # a prediction outside the shared classes: "other"
        return cls(cmap.classes, pred_lut, label_lut, len(cmap.classes) + 1, cmap.name)


def predict(
    model: nn.Module,
    points: np.ndarray,
    sample: SampleConfig,
    intensity_norm: tuple[float, float],
    device: torch.device,
) -> np.ndarray:
    """Class of every point: predict on the voxelised cloud, then copy each kept point's
    prediction to the original points nearest to it."""
    keep, logits = run_on_scan(model, points, intensity_norm, sample, device)
    _, nearest = cKDTree(points[keep, :3]).query(points[:, :3])
    return logits.argmax(dim=1).cpu().numpy()[nearest]


def evaluated_model(cfg: EvaluateConfig, state: dict, ds: LidarDataset) -> tuple[nn.Module, dict, SampleConfig]:
    """(the segmenter of a checkpoint's `state` in eval mode on its evaluation grid, its run record,
    the evaluation samples). A released segmenter has no record of its dataset: the one evaluated on."""
    record = state["config"]
    if record["stage"] == "released-segmenter":
        if record["num_classes"] != ds.meta.num_classes:
            released = f"released segmenter with {record['num_classes']} classes"
            raise CheckpointError(cfg.checkpoint, f"{released}; {ds.meta.name} has {ds.meta.num_classes}")
        record = {**record, "dataset": {"name": ds.meta.name, "classes": list(ds.meta.class_names)}}
    sample = cfg.sample or trained_sample_config(record, ds.meta)
    return build_segmenter(cfg.checkpoint, {**state, "config": record}, sample.grid.shape), record, sample


@torch.no_grad()
def evaluate(cfg: EvaluateConfig) -> dict:
    state = read_checkpoint_for(cfg.checkpoint, cfg.recipe, "this evaluation")
    segmenter_classes(cfg.checkpoint, state["config"])  # a segmentation model, before reading any data
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split)
    model, record, sample = evaluated_model(cfg, state, ds)
    trained_on = record["dataset"]["name"]
    scoring = Scoring.of(trained_on, tuple(record["dataset"]["classes"]), ds.meta, cfg.class_map)
    unknown = [c for c in cfg.corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruptions {unknown}; known: {', '.join(CORRUPTIONS)}")
    count = len(ds) if cfg.max_scans is None else min(cfg.max_scans, len(ds))
    if count == 0:
        raise DatasetError(cfg.root, f"split {cfg.split} is empty")
    device = pick_device(cfg.device)
    precision = cfg.precision or downstream_precision(recipe_of(record))
    with autocast(device, precision):
        cms = confusions(cfg, ds, count, model.to(device), sample, scoring, device)
    scores = {v: iou_from_confusion(cm, len(scoring.class_names)) for v, cm in cms.items()}
    clean = scores[("clean", 0)]
    result = {
        "checkpoint": str(cfg.checkpoint),
        "recipe": recipe_of(record),  # of the evaluated model (its record, or what a released file shows)
        "precision": precision,
        "dataset": ds.meta.name,
        "split": cfg.split,
        "scans": count,
        "miou": clean["miou"],
        "accuracy": clean["accuracy"],
        "per_class_iou": {
            name: (None if np.isnan(v) else float(v)) for name, v in zip(scoring.class_names, clean["iou"])
        },
        "trained_on": trained_on,
        "class_map": scoring.class_map,
        "confusion": cms[("clean", 0)].tolist(),
        "trained_as": record["stage"],
    }
    if cfg.corruptions:
        per = {c: [scores[(c, sev)]["miou"] for sev in (1, 2, 3)] for c in cfg.corruptions}
        baseline = MINKUNET18_NUSCENES_C if ds.meta.name == "nuscenes" else None
        name = "MinkUNet-18 (Robo3D nuScenes-C)" if baseline else None
        result["corruptions"] = {"miou": per, **robustness(per, clean["miou"], baseline), "baseline": name}
    return write_result(cfg, ds, result)


def confusions(
    cfg: EvaluateConfig,
    ds: LidarDataset,
    count: int,
    model: nn.Module,
    sample: SampleConfig,
    scoring: Scoring,
    device: torch.device,
) -> dict:
    """One confusion matrix per variant (clean, and each corruption at severities 1-3) over the
    first `count` scans."""
    meta = ds.meta
    vehicles = np.array([i for i, name in enumerate(meta.class_names) if name in VEHICLES])
    variants = [("clean", 0)] + [(c, sev) for c in cfg.corruptions for sev in (1, 2, 3)]
    cms = {v: np.zeros((scoring.columns, scoring.columns), dtype=np.int64) for v in variants}
    unit_norm = (meta.intensity_mean / meta.intensity_max, meta.intensity_std / meta.intensity_max)
    for i in tqdm(range(count), desc=f"evaluate {meta.name} {cfg.split}", unit="scan"):
        scan = ds[i]
        if scan.labels is None:
            raise DatasetError(cfg.root, f"scan {scan.scan_id} has no labels: cannot evaluate {meta.name} {cfg.split}")
        points = scan.points.copy()
        points[:, 3] /= meta.intensity_max  # the corruptions take intensities in [0, 1]
        for name, severity in variants:
            pts, labels = points, scan.labels
            if name != "clean":
                rng = np.random.default_rng([cfg.seed, i, list(CORRUPTIONS).index(name), severity])
                pts, labels = CORRUPTIONS[name](points, scan.labels, severity, rng, vehicles)
            if len(pts):
                pred = scoring.pred_lut[predict(model, pts, sample, unit_norm, device)]
                cms[(name, severity)] += confusion(pred, scoring.label_lut[labels], scoring.columns)
    return cms


def write_result(cfg: EvaluateConfig, ds: LidarDataset, result: dict) -> dict:
    """The result as JSON (beside the checkpoint's run unless `out`), and its mIoU in the run's
    TensorBoard events when the checkpoint lies in a run folder."""
    run = RunFolder.of_checkpoint(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else run.evaluation(ds.meta.name, cfg.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    result["json"] = str(out)
    writer = tensorboard_writer(run.path) if run.is_run() else None
    if writer is not None:
        tag = f"eval/{ds.meta.name}-{cfg.split}"
        writer.add_scalar(f"{tag}/miou", result["miou"], 0)
        for name, iou in result["per_class_iou"].items():
            if iou is not None:
                writer.add_scalar(f"{tag}/iou/{name}", iou, 0)
        writer.close()
    return result


def table_lines(result: dict) -> list[str]:
    lines = [
        f"{result['dataset']} {result['split']} ({result['scans']} scans), {result['trained_as']} model "
        f"{result['checkpoint']} ({result['recipe']} recipe, {result['precision']})"
    ]
    for name, v in result["per_class_iou"].items():
        lines.append(f"  {name:<22}{'  n/a' if v is None else f'{100 * v:5.1f}'}")
    lines.append(f"  {'mIoU':<22}{100 * result['miou']:5.1f}")
    lines.append(f"  {'accuracy':<22}{100 * result['accuracy']:5.1f}")
    if "corruptions" in result:
        c = result["corruptions"]
        lines.append(f"  {'corruption':<18}{'sev 1':>7}{'sev 2':>7}{'sev 3':>7}{'CE':>8}{'RR':>8}")
        for name, per in c["miou"].items():
            ce = c["ce"].get(name)
            lines.append(
                f"  {name:<18}"
                + "".join(f"{100 * m:7.1f}" for m in per)
                + (f"{100 * ce:8.1f}" if ce is not None else f"{'n/a':>8}")
                + f"{100 * c['rr'][name]:8.1f}"
            )
        mce = (
            "n/a (no published baseline for this dataset)"
            if c["mce"] is None
            else f"{100 * c['mce']:.1f}% vs {c['baseline']}"
        )
        lines.append(f"  mCE {mce}; mRR {100 * c['mrr']:.1f}%")
    lines.append(f"  written to {result['json']}")
    return lines
