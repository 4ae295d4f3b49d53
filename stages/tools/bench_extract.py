"""bench extract / bench open: measured performance of stage 1 and of opening a store, on the
user's hardware (never timed tests).

`extract` extracts a split into a temporary store and times it, then times the bare teacher
forward on the very same images (already decoded and resized, in memory, in the same batches).
It reports images/s, the ratio of the two times (the cost of decoding, projection, sampling and
writing on top of the teacher) and bytes on disk per (points x dim x 2 bytes).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.datasets import LidarDataset, open_dataset
from stages.extract.extract import (
    ExtractConfig,
    extract_parts,
    part_batches,
    recipe_teacher,
    run_teacher,
    store_attributes,
)
from stages.extract.images import ScanImages
from stages.extract.registry import get_spec
from stages.extract.teachers import Teacher
from stages.extract.weights import resolve_weights
from stages.recipes import IMAGES
from stages.runtime import pick_device, sync
from stages.tools.inspect import disk_bytes
from stages.tools.scan_features import StoreScans
from storage.feature_store import FeatureStore, StorePlan


@dataclass(frozen=True)
class BenchExtractConfig:
    extract: ExtractConfig  # out is ignored: a temporary store is used
    repeats: int = 1


def bench_extract(cfg: BenchExtractConfig) -> dict:
    ecfg = cfg.extract
    ds = open_dataset(ecfg.dataset, ecfg.root, ecfg.split)
    scans = ds.scan_ids if ecfg.max_scans is None else ds.scan_ids[: ecfg.max_scans]
    device = pick_device(ecfg.device)
    weights = resolve_weights(get_spec(ecfg.teacher), ecfg.weights, ecfg.weights_dir, ecfg.random_init, ecfg.seed)
    teacher = recipe_teacher(ecfg, weights).to(device)
    plan = StorePlan(len(scans), ecfg.scans_per_part)
    batches = teacher_batches(ecfg, ds, plan)
    run_teacher(teacher, batches[0], device, ecfg.precision)  # warm-up: allocator, kernels, thread pools
    with tempfile.TemporaryDirectory() as tmp:
        best_wall = float("inf")
        for _ in range(cfg.repeats):
            run_cfg = replace(ecfg, out=Path(tmp) / f"bench-{time.monotonic_ns()}.zarr")
            store = FeatureStore.create_or_open(run_cfg.out, store_attributes(run_cfg, ds, scans, weights))
            sync(device)
            t0 = time.perf_counter()
            extract_parts(run_cfg, store, teacher, ds, list(range(plan.parts)), device, ecfg.num_workers)
            sync(device)
            best_wall = min(best_wall, time.perf_counter() - t0)
        manifest = FeatureStore(run_cfg.out).manifest().to_pylist()
        size = disk_bytes(run_cfg.out)
    best_forward = min(forward_time(teacher, batches, device, ecfg.precision) for _ in range(cfg.repeats))
    points, entries, images = sum(r["count"] for r in manifest), len(manifest), sum(len(b) for b in batches)
    return {
        "teacher": ecfg.teacher,
        "image_size": list(ecfg.image_size),
        "device": str(device),
        "precision": ecfg.precision,
        "dataset": f"{ecfg.dataset} {ecfg.split}",
        "scans": len(scans),
        "images": images,
        "points": points,
        "extract_s": round(best_wall, 3),
        "teacher_forward_s": round(best_forward, 3),
        "images_per_s": round(images / best_wall, 2),
        "extract_over_forward": round(best_wall / best_forward, 3),
        "layout": ecfg.layout,
        "quantize": ecfg.quantize,
        "entries": entries,
        "store_bytes": size,
        "kib_per_entry": round(size / max(entries, 1) / 1024, 1),
        "bytes_over_points_dim_2": round(size / max(points * teacher.spec.dim * 2, 1), 3),
        "threads": torch.get_num_threads(),
        "num_workers": ecfg.num_workers,
        "batch_size": ecfg.batch_size,
    }


def teacher_batches(cfg: ExtractConfig, ds: LidarDataset, plan: StorePlan) -> list[torch.Tensor]:
    """The images of every scan of the plan, decoded and resized, in extraction's own batches."""
    items = ScanImages(ds, list(range(plan.scans)), cfg.image_size, IMAGES[cfg.recipe].antialias)
    batches = part_batches(plan, list(range(plan.parts)), cfg.batch_size, len(ds.meta.camera_names))
    return [torch.stack([c["image"] for i in batch for c in items[i]["cameras"] if "image" in c]) for batch in batches]


def forward_time(teacher: Teacher, batches: list[torch.Tensor], device: torch.device, precision: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        run_teacher(teacher, b, device, precision)
    sync(device)
    return time.perf_counter() - t0


def report_lines(result: dict) -> list[str]:
    return [
        f"extraction benchmark: {result['teacher']} at {result['image_size'][0]}x{result['image_size'][1]} on "
        f"{result['device']} ({result['precision']}), {result['dataset']}",
        f"  {result['scans']} scans, {result['images']} images, {result['points']:,} points",
        f"  images/s                              {result['images_per_s']:.2f}",
        f"  extraction / teacher forward time     {result['extract_over_forward']:.3f}  "
        f"({result['extract_s']:.2f} s / {result['teacher_forward_s']:.2f} s)",
        f"  store ({result['layout']}, quantize {result['quantize']})   {result['store_bytes'] / 2**20:.1f} MiB, "
        f"{result['kib_per_entry']:.1f} KiB per entry",
        f"  bytes on disk / (points x dim x 2)    {result['bytes_over_points_dim_2']:.3f}",
        "  " + json.dumps(result),
    ]


# ---- open: the integrity gate, and the viewer's lazy open ---------------------------------------
def bench_open(store_path: Path, repeats: int = 3) -> dict:
    """Time to open a store, which runs the integrity gate every reader runs (stat of every chunk
    file, a manifest and four small JSON files per part; nothing decoded); and what `scalr view`
    does before its page shows (no gate: every manifest read, the PCA colours fitted on 16
    entries, the first scan read with its images and labels when the raw dataset is there). The
    first repeat may include a cold file-system cache."""

    times, manifests, pca, first_scan = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        store = FeatureStore(store_path)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scans = StoreScans(FeatureStore(store_path, check=False))
        manifests.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scans.pca()
        pca.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scans.load(scans.scan_ids[0])
        first_scan.append(time.perf_counter() - t0)
    parts = store.committed_parts()
    files = sum(len(rec["chunk_bytes"]) for p in parts for rec in store.part_record(p)["arrays"].values())
    return {
        "store": str(store_path),
        "parts": len(parts),
        "chunk_files": files,
        "open_s_first": round(times[0], 4),
        "open_s_best": round(min(times), 4),
        "ms_per_part": round(1e3 * min(times) / max(len(parts), 1), 3),
        "view_manifests_s": round(min(manifests), 4),
        "view_manifest_ms_per_part": round(1e3 * min(manifests) / max(len(parts), 1), 3),
        "view_pca_s": round(min(pca), 4),
        "view_first_scan_s": round(min(first_scan), 4),
    }


def open_report_lines(r: dict) -> list[str]:
    return [
        f"open benchmark: {r['store']}",
        f"  integrity gate: {r['parts']} parts, {r['chunk_files']} chunk files: {r['open_s_best']:.3f} s (first "
        f"{r['open_s_first']:.3f} s), {r['ms_per_part']:.2f} ms per part",
        f"  scalr view: manifests {r['view_manifests_s']:.3f} s ({r['view_manifest_ms_per_part']:.2f} ms per "
        f"part), PCA colours {r['view_pca_s']:.3f} s, first scan {r['view_first_scan_s']:.3f} s",
        "  " + json.dumps(r),
    ]
