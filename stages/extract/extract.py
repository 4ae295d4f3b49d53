"""Stage 1, extract-features: run a frozen teacher over every camera image once and write the
per-point targets into a feature store (storage/feature_store.py).

Data flow: the plan splits the split's scans into parts -> parts already committed are skipped
(a rerun after a crash redoes only the missing ones) -> DataLoader workers read each scan,
project its points into every camera and decode + resize the images -> the teacher turns a
batch of images into token grids -> each visible point takes the grid's bilinear feature at its
pixel -> a PartWriter per part writes whole chunks and commits the part's manifest last.
Parts run in one process, on `torchrun` ranks (parts r::world), or as dask.distributed tasks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline import __version__
from pipeline.datasets import LidarDataset, open_dataset
from pipeline.errors import DatasetError
from pipeline.geometry import resize_pixels
from stages.extract.teachers import POS_EMBED, Teacher, get_spec, hub_provenance, load_teacher, pos_embed_rule, resolve_weights, sha256_file
from storage.targets import sample_grid
from storage.feature_store import FORMAT, FORMAT_VERSION, LAYOUTS, QUANTIZE, FeatureStore, PartWriter, StorePlan

log = logging.getLogger(__name__)

SAMPLING = "bilinear, align_corners=True, at pixel (floor(floor(u) W'/W), floor(floor(v) H'/H)) of the resized image"


@dataclass(frozen=True)
class Recipe:
    """Where the released CVPR code (main) and ScaLR+ (branch scalr_plus) differ in stage 1."""

    antialias: bool  # of the bilinear image resize
    pos_embed: str  # stages.extract.teachers.POS_EMBED


RECIPES = {
    # torchvision 0.12's resize of a float tensor (no antialias); DINOv2's own interpolation.
    "cvpr": Recipe(antialias=False, pos_embed="dinov2-cvpr"),
    # torchvision >= 0.17 (antialias on); timm's position embeddings resized at load.
    "scalr-plus": Recipe(antialias=True, pos_embed="timm"),
}


def resize_rule(recipe: str) -> str:
    return f"float image in [0, 1] (uint8 / 255), bilinear, align_corners=False, antialias {'on' if RECIPES[recipe].antialias else 'off'} (torchvision resize of a tensor); aspect ratio not kept"


@dataclass(frozen=True)
class ExtractConfig:
    dataset: str
    root: Path
    split: str
    teacher: str
    out: Path
    weights: Path | None = None  # one weights file
    weights_dir: Path | None = None  # a folder holding the registry's documented file names
    random_init: bool = False  # tests and demos only; recorded in the store
    seed: int = 0  # random-init seed
    image_size: tuple[int, int] = (224, 448)  # (H, W) the images are resized to
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: str = "fp32"  # fp32, bf16, fp16 (autocast)
    batch_size: int = 12  # images per teacher forward
    num_workers: int = 2  # DataLoader workers decoding/projecting per process
    scans_per_part: int = 16  # plan granularity: unit of work, crash recovery and parallelism
    on_error: str = "raise"  # raise, or skip (recorded in the store with its reason)
    rank: int | None = None  # this process's rank (default: $RANK, set by torchrun)
    world_size: int | None = None  # number of ranks (default: $WORLD_SIZE)
    dask_workers: int = 0  # > 1: a local dask cluster with this many worker processes
    scheduler: str | None = None  # address of a running dask scheduler
    max_scans: int | None = None  # only the first N scans of the split
    layout: str = "grid"  # grid: each image's token grid, sampled when read; points: per-point features
    quantize: str = "none"  # none, or int8 (grid layout only: a float32 scale per token)
    recipe: str = "cvpr"  # cvpr (the released CVPR code) or scalr-plus: image resize and DINOv2 position embeddings

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe {self.recipe!r}: one of {', '.join(RECIPES)}")
        if self.layout not in LAYOUTS or self.quantize not in QUANTIZE:
            raise ValueError(f"layout {self.layout!r} / quantize {self.quantize!r}: layout is one of {LAYOUTS}, quantize one of {QUANTIZE}")
        if self.quantize != "none" and self.layout != "grid":
            raise ValueError("--quantize int8 needs --layout grid (per-point features are stored as float16)")


def recipe_teacher(cfg: ExtractConfig) -> Teacher:
    """The configured teacher with the recipe's position-embedding rule."""
    return load_teacher(cfg.teacher, cfg.image_size, cfg.weights, cfg.weights_dir, cfg.random_init, cfg.seed, RECIPES[cfg.recipe].pos_embed)


def store_attributes(cfg: ExtractConfig, ds: LidarDataset, scans: list[str]) -> dict:
    """Provenance of a store; the IDENTITY_KEYS among them must match for a rerun to continue it."""
    spec = get_spec(cfg.teacher)
    weights = resolve_weights(spec, cfg.weights, cfg.weights_dir, cfg.random_init)
    data_cfg = timm.get_pretrained_cfg(spec.timm_name)
    data_cfg = data_cfg.to_dict() if data_cfg is not None else {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scalr_version": __version__,
        "teacher": {
            "name": spec.name, "timm_name": spec.timm_name, "dim": spec.dim, "patch": spec.patch,
            "layer": "last block, before the final norm, prefix tokens removed" if spec.dense != "maskclip-value" else "maskclip-value: last block's value path (no residual, no MLP), ln_post, visual projection",
            "dense": spec.dense,
            "pos_embed": POS_EMBED[pos_embed_rule(spec, RECIPES[cfg.recipe].pos_embed)],
            "weights": "random-init seed %d" % cfg.seed if weights is None else sha256_file(weights),
            "random_init": weights is None,
            "hub": hub_provenance(weights),  # by name from the Hugging Face cache: repository, revision, file
            "mean": list(data_cfg.get("mean", ())), "std": list(data_cfg.get("std", ())),
        },  # fmt: skip
        "teacher_weights_path": None if weights is None else str(Path(weights).resolve()),
        "image_size": list(cfg.image_size),
        "recipe": cfg.recipe,
        "resize": resize_rule(cfg.recipe),
        "sampling": SAMPLING,
        "dataset": {"name": ds.meta.name, "split": cfg.split, "scans": len(scans), "scan_ids_sha256": hashlib.sha256("\n".join(scans).encode()).hexdigest()},
        "dataset_root": str(Path(cfg.root).resolve()),
        "index_problems": sorted({str(p) for p in ds.problems}),  # with --on-error skip: what was passed over
        "cameras": list(ds.meta.camera_names),
        "intensity_max": ds.meta.intensity_max,
        "plan": {"scans": len(scans), "scans_per_part": cfg.scans_per_part},
        "projection": ds.meta.visibility.name,
        "dtype": "float16",
        "layout": cfg.layout,
        "quantize": cfg.quantize,
        "grid_size": [cfg.image_size[0] // spec.patch, cfg.image_size[1] // spec.patch] if cfg.layout == "grid" else None,
    }


class ScanImages(torch.utils.data.Dataset):
    """One item per scan: its points, and per camera the resized image and visible points. Runs
    in DataLoader workers; bad input comes back as an error record, never as a lost entry."""

    def __init__(self, ds: LidarDataset, indices: list[int], image_size: tuple[int, int], antialias: bool = False):
        self.ds, self.indices, self.image_size, self.antialias = ds, indices, image_size, antialias

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        item = {"scan_index": index, "scan_id": self.ds.scan_ids[index], "cameras": []}
        try:
            scan = self.ds[index]
        except DatasetError as err:
            return {**item, "error": (err.path, err.problem)}
        item.update(points=scan.points, scan_points=scan.num_points)
        for camera in scan.cameras:
            entry = {"camera": camera.name, "image_size": camera.image_size}
            try:
                image = load_resized(camera.image_path, camera.image_size, self.image_size, self.antialias)
            except DatasetError as err:
                item["cameras"].append({**entry, "error": (err.path, err.problem)})
                continue
            proj = self.ds.project(scan, camera.name)
            item["cameras"].append({
                **entry, "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                "point_index": proj.point_index.astype(np.int32),
                "pixel": resize_pixels(proj.uv, camera.image_size, self.image_size),
            })  # fmt: skip
        return item


UNIT_FLOAT = (np.arange(256) / 255.0).astype(np.float32)  # uint8 -> float32(x / 255 in float64), as the released code, by lookup


def load_resized(path: Path, calibrated_hw: tuple[int, int], size_hw: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """Decode an image, check it has the calibrated size, and resize it as the released code:
    float in [0, 1] (uint8 / 255 in float64, then float32), bilinear with align_corners=False,
    `antialias` as the torchvision of the recipe. Returns (H, W, 3) float32."""
    try:
        with Image.open(path) as img:
            if img.size != (calibrated_hw[1], calibrated_hw[0]):
                raise DatasetError(path, f"image is {img.size[0]}x{img.size[1]} but its calibration is for {calibrated_hw[1]}x{calibrated_hw[0]}")
            pixels = np.asarray(img.convert("RGB"))
        image = torch.from_numpy(UNIT_FLOAT[pixels]).permute(2, 0, 1)[None]
        resized = F.interpolate(image, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=antialias)
        return resized[0].permute(1, 2, 0).numpy()
    except FileNotFoundError:
        raise DatasetError(path, "image file is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(path, f"corrupt or unreadable image ({err})") from None


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_teacher(teacher: Teacher, images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    images = images.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return teacher(images)


def extract_parts(cfg: ExtractConfig, store: FeatureStore, teacher: Teacher, ds: LidarDataset, parts: list[int], num_workers: int, device: torch.device, progress=None) -> None:
    """Compute and commit `parts` of the plan, in order."""
    plan = store.plan
    indices = [i for p in parts for i in plan.scans_of(p)]
    # Batches never straddle two parts, so a part's bytes depend on that part alone (a rerun
    # that computes only the missing parts batches them exactly as an uninterrupted run).
    scans_per_batch = max(1, cfg.batch_size // max(1, len(ds.meta.camera_names)))
    batches, start = [], 0
    for p in parts:
        n = len(plan.scans_of(p))
        batches += [list(range(start + b, start + min(b + scans_per_batch, n))) for b in range(0, n, scans_per_batch)]
        start += n
    loader = torch.utils.data.DataLoader(
        ScanImages(ds, indices, cfg.image_size, RECIPES[cfg.recipe].antialias), batch_sampler=batches, num_workers=num_workers, collate_fn=list,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None, worker_init_fn=lower_priority,
    )  # fmt: skip
    writer: PartWriter | None = None
    # Compression and writes run on one background thread, in order, overlapping the teacher.
    with BackgroundWriter() as background:
        for batch in loader:
            images = [cam["image"] for item in batch for cam in item["cameras"] if "image" in cam]
            grids = run_teacher(teacher, torch.stack(images), device, cfg.precision) if images else None
            if grids is not None and not torch.isfinite(grids).all():
                raise FloatingPointError(f"teacher {teacher.spec.name} produced non-finite features for scans {[it['scan_id'] for it in batch]}")
            k = 0
            for item in batch:
                part = item["scan_index"] // plan.scans_per_part
                if writer is None or writer.part != part:
                    if writer is not None:
                        background.submit(writer.commit)
                    writer = PartWriter(store, part)
                k = _write_scan(cfg, writer, item, grids, k, ds.meta.camera_names, background)
            if progress is not None:
                progress(len(images))
        if writer is not None:
            background.submit(writer.commit)


def lower_priority(*_) -> None:
    """Let helpers (loader workers, the writer thread) yield to the teacher's compute threads:
    on a machine with few cores an OpenMP team slowed by one preempted thread costs more than
    the helper's own work. Linux applies this per thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class BackgroundWriter:
    """One thread running writes in submission order; at most `depth` pending, errors re-raised."""

    def __init__(self, depth: int = 8):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalr-writer", initializer=lower_priority)
        self.pending: deque = deque()
        self.depth = depth

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self.pending:
                    self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)


def _write_scan(cfg: ExtractConfig, writer: PartWriter, item: dict, grids: torch.Tensor | None, k: int, camera_names, background: "BackgroundWriter") -> int:
    base = {"scan_index": item["scan_index"], "scan_id": item["scan_id"], "scan_points": item.get("scan_points", 0)}
    if "error" in item:
        _skip_or_raise(cfg, item["error"])
        for name in camera_names:  # the scan is unreadable: every camera of it is a recorded skip
            background.submit(writer.add, {**base, "camera": name, "image_height": 0, "image_width": 0, "status": "skipped", "reason": "%s: %s" % item["error"]})
        return k
    for cam in item["cameras"]:
        row = {**base, "camera": cam["camera"], "image_height": cam["image_size"][0], "image_width": cam["image_size"][1]}
        if "error" in cam:
            _skip_or_raise(cfg, cam["error"])
            background.submit(writer.add, {**row, "status": "skipped", "reason": "%s: %s" % cam["error"]})
            continue
        grid, k = grids[k], k + 1
        data = {"points": item["points"][cam["point_index"]], "point_index": cam["point_index"], "pixel": cam["pixel"]}
        if cfg.layout == "grid":  # the whole token grid; targets are sampled when read
            stored = grid.to(torch.float16)
            data["grid"] = (grid if cfg.quantize == "int8" else stored).float().cpu().numpy()
        else:
            stored = sample_grid(grid, torch.from_numpy(cam["pixel"]), cfg.image_size).to(torch.float16)
            data["features"] = stored.cpu().numpy()
        if not torch.isfinite(stored).all():  # finite in float32, beyond float16's 65504
            raise FloatingPointError(f"teacher features of {item['scan_id']}/{cam['camera']} overflow float16 (|x| > 65504); the store cannot hold them")
        background.submit(writer.add, {**row, "status": "ok", "reason": ""}, data)
    return k


def _skip_or_raise(cfg: ExtractConfig, error: tuple[str, str]) -> None:
    if cfg.on_error != "skip":
        raise DatasetError(*error)
    log.warning("skipped %s: %s", *error)


def rank_and_world(cfg: ExtractConfig) -> tuple[int, int]:
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", 0))
    world = cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return rank, world


def extract(cfg: ExtractConfig) -> FeatureStore:
    """Fill the store at cfg.out (creating or continuing it) and return it."""
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split, keep_going=cfg.on_error == "skip")
    if ds.problems:  # only with --on-error skip: the scans they break become recorded skips
        log.warning("%s: %d bad index file(s); the scans they describe are recorded as skipped (see `scalr inspect`), sequences whose split is unknown are left out:\n  %s",
                    cfg.root, len(ds.problems), "\n  ".join(sorted({str(p) for p in ds.problems})))  # fmt: skip
    scans = ds.scan_ids if cfg.max_scans is None else ds.scan_ids[: cfg.max_scans]
    if not scans:
        raise DatasetError(cfg.root, f"split {cfg.split} has no scans")
    store = FeatureStore.create_or_open(cfg.out, store_attributes(cfg, ds, scans))
    plan = StorePlan(len(scans), cfg.scans_per_part)
    done = set(store.committed_parts())
    rank, world = rank_and_world(cfg)
    todo = [p for p in range(plan.parts) if p not in done and p % world == rank]
    if done:
        log.info("%s: resuming: %d of %d parts already committed, computing %d", cfg.out, len(done), plan.parts, len(todo))
    if not todo:
        return store
    images = sum(len(plan.scans_of(p)) for p in todo) * len(ds.meta.camera_names)
    if cfg.scheduler or cfg.dask_workers > 1:
        _extract_with_dask(cfg, store, todo)
    else:
        device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
        teacher = recipe_teacher(cfg).to(device)
        with tqdm(total=images, desc=f"extract {cfg.teacher}", unit="img", dynamic_ncols=True) as bar:
            extract_parts(cfg, store, teacher, ds, todo, cfg.num_workers, device, bar.update)
    return FeatureStore(cfg.out, check=False)  # other ranks may still be writing their parts


# ---- dask.distributed: parts as tasks, the teacher loaded once per worker ---------------------
def _dask_part(cfg: ExtractConfig, part: int) -> int:
    from distributed import get_worker

    worker = get_worker()
    cache = worker.__dict__.setdefault("_scalr_extract", {})
    if "teacher" not in cache:  # once per worker process
        torch.set_num_threads(max(1, int(worker.state.nthreads)))
        device = pick_device(cfg.device)
        cache["device"] = device
        cache["teacher"] = recipe_teacher(cfg).to(device)
        cache["dataset"] = open_dataset(cfg.dataset, cfg.root, cfg.split, keep_going=cfg.on_error == "skip")
    store = FeatureStore(cfg.out, check=False)
    extract_parts(cfg, store, cache["teacher"], cache["dataset"], [part], 0, cache["device"])
    return part


def _extract_with_dask(cfg: ExtractConfig, store: FeatureStore, parts: list[int]) -> None:
    from distributed import Client, LocalCluster, as_completed

    if cfg.scheduler:
        client, cluster = Client(cfg.scheduler), None
    else:
        cluster = LocalCluster(n_workers=cfg.dask_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        futures = [client.submit(_dask_part, cfg, p, key=f"scalr-extract-{store.path.name}-{p}", pure=False) for p in parts]
        with tqdm(total=len(parts), desc=f"extract {cfg.teacher} (dask)", unit="part") as bar:
            for future in as_completed(futures):
                future.result()  # re-raises a worker's error here
                bar.update(1)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
