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
from tqdm import tqdm

from pipeline.class_maps import find_class_map
from pipeline.corruptions import CORRUPTIONS, MINKUNET18_NUSCENES_C, robustness
from pipeline.datasets import open_dataset
from pipeline.errors import DatasetError
from pipeline.scan import IGNORE_INDEX, DatasetMeta
from pipeline.transforms import Grid
from stages.downstream.segment import load_segmenter
from stages.student.samples import SampleConfig, collate, student_inputs
from stages.student.train import pick_device, tensorboard_writer
from storage.checkpoint import CheckpointError


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


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    valid = labels != IGNORE_INDEX
    return np.bincount(labels[valid].astype(np.int64) * num_classes + pred[valid], minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray, num_classes: int | None = None) -> dict:
    """Rows = labels, columns = predictions; IoU of the first `num_classes` classes (trailing
    columns, such as "other" across datasets, only count as errors)."""
    n = num_classes or len(cm)
    tp = np.diag(cm).astype(np.float64)[:n]
    denom = (cm.sum(0) + cm.sum(1))[:n] - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    total = cm.sum()
    return {"iou": iou, "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"), "accuracy": float(tp.sum() / total) if total else float("nan")}


def released_eval_sample(meta: DatasetMeta) -> SampleConfig:
    """The released evaluation settings of a dataset: 0.1 m voxels, its field of view in 0.5 m
    cells, 16 neighbours, no crop."""
    return SampleConfig(voxel=0.1, max_points=10**9, grid=Grid(*meta.field_of_view), neighbours=16)


def trained_sample_config(record: dict, meta: DatasetMeta) -> SampleConfig:
    """Evaluation samples for a checkpoint: the voxel size, grid and neighbours it was trained
    with; for a released checkpoint (no record of them) the dataset's released settings."""
    s = record.get("config", {}).get("sample")
    if s is None:
        return released_eval_sample(meta)
    grid = Grid(tuple(s["grid"]["lo"]), tuple(s["grid"]["hi"]), s["grid"]["cell"])
    return SampleConfig(voxel=s["voxel"], max_points=10**9, grid=grid, neighbours=s["neighbours"])


VEHICLES = {"car", "truck", "bus", "trailer", "construction_vehicle", "other-vehicle", "motorcycle", "bicycle"}


def predict(model, points: np.ndarray, sample: SampleConfig, intensity_norm: tuple[float, float], device: torch.device, seed: int) -> np.ndarray:
    """Class of every point: predict on the voxelised cloud, then copy each kept point's
    prediction to the original points nearest to it."""
    keep, inputs = student_inputs(points, intensity_norm, sample, np.random.default_rng(seed), train=False)
    batch = collate([{**inputs, "scan_id": ""}])
    batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
    pred_kept = model(batch).argmax(dim=1).cpu().numpy()
    _, nearest = cKDTree(points[keep, :3]).query(points[:, :3])
    return pred_kept[nearest]


@torch.no_grad()
def evaluate(cfg: EvaluateConfig) -> dict:
    model, record = load_segmenter(cfg.checkpoint)
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split)
    if record["stage"] == "released-segmenter":  # no record of its dataset: the one evaluated on
        if record["num_classes"] != ds.meta.num_classes:
            raise CheckpointError(cfg.checkpoint, f"released segmenter with {record['num_classes']} classes; {ds.meta.name} has {ds.meta.num_classes}")
        record = {**record, "dataset": {"name": ds.meta.name, "classes": list(ds.meta.class_names)}}
    trained_on, trained_classes = record["dataset"]["name"], tuple(record["dataset"]["classes"])
    # Scoring space: the dataset's own classes, or, across datasets, a map's shared classes.
    if trained_on == ds.meta.name and trained_classes == ds.meta.class_names:
        class_names = ds.meta.class_names
        pred_lut = label_lut = np.append(np.arange(len(class_names)), np.full(IGNORE_INDEX + 1 - len(class_names), IGNORE_INDEX))
    else:
        cmap = find_class_map(trained_on, ds.meta.name, cfg.class_map)
        class_names = cmap.classes
        pred_lut, label_lut = cmap.lookup(trained_on, trained_classes), cmap.lookup(ds.meta.name, ds.meta.class_names)
        pred_lut[pred_lut == IGNORE_INDEX] = len(class_names)  # a prediction outside the shared classes: "other", always wrong
    unknown = [c for c in cfg.corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(CORRUPTIONS)}")
    sample = cfg.sample or trained_sample_config(record, ds.meta)
    model.backbone.regrid(sample.grid.shape)
    device = pick_device(cfg.device, 0)
    model.to(device)
    k = len(class_names) + (class_names is not ds.meta.class_names)  # + the "other" column across datasets
    vehicles = np.array([i for i, name in enumerate(ds.meta.class_names) if name in VEHICLES])
    variants = [("clean", 0)] + [(c, sev) for c in cfg.corruptions for sev in (1, 2, 3)]
    cms = {v: np.zeros((k, k), dtype=np.int64) for v in variants}
    count = len(ds) if cfg.max_scans is None else min(cfg.max_scans, len(ds))
    if count == 0:
        raise DatasetError(cfg.root, f"split {cfg.split} is empty")
    unit_norm = (ds.meta.intensity_mean / ds.meta.intensity_max, ds.meta.intensity_std / ds.meta.intensity_max)
    for i in tqdm(range(count), desc=f"evaluate {ds.meta.name} {cfg.split}", unit="scan"):
        scan = ds[i]
        if scan.labels is None:
            raise DatasetError(cfg.root, f"scan {scan.scan_id} has no labels: cannot evaluate {ds.meta.name} {cfg.split}")
        points = scan.points.copy()
        points[:, 3] /= ds.meta.intensity_max  # the corruptions take intensities in [0, 1]
        for name, severity in variants:
            pts, labels = points, scan.labels
            if name != "clean":
                rng = np.random.default_rng([cfg.seed, i, list(CORRUPTIONS).index(name), severity])
                pts, labels = CORRUPTIONS[name](points, scan.labels, severity, rng, vehicles)
            if len(pts):
                cms[(name, severity)] += confusion(pred_lut[predict(model, pts, sample, unit_norm, device, i)], label_lut[labels], k)
    scores = {v: iou_from_confusion(cm, len(class_names)) for v, cm in cms.items()}
    clean = scores[("clean", 0)]
    result = {
        "checkpoint": str(cfg.checkpoint), "dataset": ds.meta.name, "split": cfg.split, "scans": count,
        "miou": clean["miou"], "accuracy": clean["accuracy"],
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, clean["iou"])},
        "trained_on": trained_on, "class_map": None if class_names is ds.meta.class_names else cfg.class_map or find_class_map(trained_on, ds.meta.name).name,
        "confusion": cms[("clean", 0)].tolist(), "trained_as": record["stage"],
    }  # fmt: skip
    if cfg.corruptions:
        per = {c: [scores[(c, sev)]["miou"] for sev in (1, 2, 3)] for c in cfg.corruptions}
        baseline = MINKUNET18_NUSCENES_C if ds.meta.name == "nuscenes" else None
        result["corruptions"] = {"miou": per, **robustness(per, clean["miou"], baseline), "baseline": "MinkUNet-18 (Robo3D nuScenes-C)" if baseline else None}
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).parent.parent / f"eval-{ds.meta.name}-{cfg.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    result["json"] = str(out)
    run = Path(cfg.checkpoint).parent.parent  # RUN/checkpoints/last.pt: beside the run's training curves
    writer = tensorboard_writer(run) if (run / "config.json").is_file() else None
    if writer is not None:
        tag = f"eval/{ds.meta.name}-{cfg.split}"
        writer.add_scalar(f"{tag}/miou", result["miou"], 0)
        for name, iou in result["per_class_iou"].items():
            if iou is not None:
                writer.add_scalar(f"{tag}/iou/{name}", iou, 0)
        writer.close()
    return result


def table_lines(result: dict) -> list[str]:
    lines = [f"{result['dataset']} {result['split']} ({result['scans']} scans), {result['trained_as']} model {result['checkpoint']}"]
    for name, v in result["per_class_iou"].items():
        lines.append(f"  {name:<22}{'  n/a' if v is None else f'{100 * v:5.1f}'}")
    lines.append(f"  {'mIoU':<22}{100 * result['miou']:5.1f}")
    lines.append(f"  {'accuracy':<22}{100 * result['accuracy']:5.1f}")
    if "corruptions" in result:
        c = result["corruptions"]
        lines.append(f"  {'corruption':<18}{'sev 1':>7}{'sev 2':>7}{'sev 3':>7}{'CE':>8}{'RR':>8}")
        for name, per in c["miou"].items():
            ce = c["ce"].get(name)
            lines.append(f"  {name:<18}" + "".join(f"{100 * m:7.1f}" for m in per) + (f"{100 * ce:8.1f}" if ce is not None else f"{'n/a':>8}") + f"{100 * c['rr'][name]:8.1f}")
        mce = "n/a (no published baseline for this dataset)" if c["mce"] is None else f"{100 * c['mce']:.1f}% vs {c['baseline']}"
        lines.append(f"  mCE {mce}; mRR {100 * c['mrr']:.1f}%")
    lines.append(f"  written to {result['json']}")
    return lines
