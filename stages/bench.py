"""bench: measured performance on the user's hardware (never timed tests).

`extract`: extraction throughput and overhead. It extracts a split into a temporary store and
times it, then times the bare teacher forward on the very same images (already decoded and
resized, in memory, same batches). Reports images/s, the ratio of the two times (the cost of
decoding, projection, sampling and writing on top of the teacher) and bytes on disk per
(points x dim x 2 bytes).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.datasets import open_dataset
from stages.extract import ExtractConfig, ScanImages, extract_parts, pick_device, run_teacher, store_attributes
from stages.inspect import disk_bytes
from stages.teachers import load_teacher
from storage.feature_store import FeatureStore


@dataclass(frozen=True)
class BenchExtractConfig:
    extract: ExtractConfig  # out is ignored: a temporary store is used
    repeats: int = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_extract(cfg: BenchExtractConfig) -> dict:
    ecfg = cfg.extract
    ds = open_dataset(ecfg.dataset, ecfg.root, ecfg.split)
    scans = ds.scan_ids if ecfg.max_scans is None else ds.scan_ids[: ecfg.max_scans]
    device = pick_device(ecfg.device)
    teacher = load_teacher(ecfg.teacher, ecfg.image_size, ecfg.weights, ecfg.weights_dir, ecfg.random_init, ecfg.seed).to(device)
    cams = max(1, len(ds.meta.camera_names))
    per_batch = max(1, ecfg.batch_size // cams)
    # Warm-up (allocator, kernels, thread pools) on one batch.
    items = [ScanImages(ds, list(range(len(scans))), ecfg.image_size)[i] for i in range(min(per_batch, len(scans)))]
    warm = torch.stack([c["image"] for it in items for c in it["cameras"] if "image" in c])
    run_teacher(teacher, warm, device, ecfg.precision)
    with tempfile.TemporaryDirectory() as tmp:
        best_wall = float("inf")
        for _ in range(cfg.repeats):
            out = Path(tmp) / f"bench-{time.monotonic_ns()}.zarr"
            run_cfg = replace(ecfg, out=out)
            store = FeatureStore.create_or_open(out, store_attributes(run_cfg, ds, scans))
            _sync(device)
            t0 = time.perf_counter()
            extract_parts(run_cfg, store, teacher, ds, list(range(store.plan.parts)), ecfg.num_workers, device)
            _sync(device)
            best_wall = min(best_wall, time.perf_counter() - t0)
        store = FeatureStore(out)
        manifest = store.manifest().to_pylist()
        points = sum(r["count"] for r in manifest)
        size = disk_bytes(out)
    # The same images, decoded and resized beforehand, in the same batches: teacher time alone.
    loader_ds = ScanImages(ds, list(range(len(scans))), ecfg.image_size)
    batches = []
    for start in range(0, len(scans), per_batch):
        imgs = [c["image"] for i in range(start, min(start + per_batch, len(scans))) for c in loader_ds[i]["cameras"] if "image" in c]
        batches.append(torch.stack(imgs))
    images = sum(len(b) for b in batches)
    best_forward = float("inf")
    for _ in range(cfg.repeats):
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            run_teacher(teacher, b, device, ecfg.precision)
        _sync(device)
        best_forward = min(best_forward, time.perf_counter() - t0)
    return {
        "teacher": ecfg.teacher, "image_size": list(ecfg.image_size), "device": str(device), "precision": ecfg.precision,
        "dataset": f"{ecfg.dataset} {ecfg.split}", "scans": len(scans), "images": images, "points": points,
        "extract_s": round(best_wall, 3), "teacher_forward_s": round(best_forward, 3),
        "images_per_s": round(images / best_wall, 2),
        "extract_over_forward": round(best_wall / best_forward, 3),
        "bytes_over_points_dim_2": round(size / max(points * teacher.spec.dim * 2, 1), 3),
        "threads": torch.get_num_threads(), "num_workers": ecfg.num_workers, "batch_size": ecfg.batch_size,
    }  # fmt: skip


def report_lines(result: dict) -> list[str]:
    return [
        f"extraction benchmark: {result['teacher']} at {result['image_size'][0]}x{result['image_size'][1]} on {result['device']} ({result['precision']}), {result['dataset']}",
        f"  {result['scans']} scans, {result['images']} images, {result['points']:,} points",
        f"  images/s                              {result['images_per_s']:.2f}",
        f"  extraction / teacher forward time     {result['extract_over_forward']:.3f}  ({result['extract_s']:.2f} s / {result['teacher_forward_s']:.2f} s)",
        f"  bytes on disk / (points x dim x 2)    {result['bytes_over_points_dim_2']:.3f}",
        "  " + json.dumps(result),
    ]
