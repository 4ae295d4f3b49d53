"""Stage 1, extract-features: run a frozen teacher over every camera image once and write the
per-point targets into a feature store (storage/feature_store.py).

Data flow: the plan splits the split's scans into parts -> parts already committed are skipped
(a rerun after a crash redoes only the missing ones) -> DataLoader workers read each scan,
project its points into every camera and decode + resize the images (images.py) -> the teacher
turns a batch of images into token grids (teachers.py) -> each visible point takes the grid's
bilinear feature at its pixel -> a PartWriter per part writes whole chunks on a background thread
(writer.py) and commits the part's manifest last. Parts run in one process, on `torchrun` ranks
(parts r::world), or as dask.distributed tasks (cluster.py).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from distributed import Client, LocalCluster, as_completed, get_worker
from tqdm import tqdm

from pipeline import __version__
from pipeline.datasets import LidarDataset, open_dataset
from pipeline.datasets.base import file_stats
from pipeline.errors import ConfigError, DatasetError
from pipeline.synth.pixel_classes import FOLDER
from stages.extract.images import ScanImages
from stages.extract.registry import get_spec
from stages.extract.teachers import POS_EMBED, TeacherModel, build_teacher, pos_embed_rule
from stages.extract.weights import TeacherWeights, resolve_weights
from stages.extract.writer import BackgroundWriter, lower_priority
from stages.recipes import IMAGES, check_recipe
from stages.runtime import Launch, Loader, autocast, pick_device
from storage.feature_store import FeatureStore, PartWriter, StorePlan
from storage.layout import FORMAT, FORMAT_VERSION, LAYOUTS, QUANTIZE
from storage.targets import sample_grid

log = logging.getLogger(__name__)

SAMPLING = "bilinear, align_corners=True, at pixel (floor(floor(u) W'/W), floor(floor(v) H'/H)) of the resized image"


def resize_rule(recipe: str) -> str:
    antialias = "on" if IMAGES[recipe].antialias else "off"
    return (
        f"float image in [0, 1] (uint8 / 255), bilinear, align_corners=False, antialias {antialias} "
        "(torchvision resize of a tensor); aspect ratio not kept"
    )


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
    image_size: tuple[int, int] | None = None  # (H, W) the images are resized to; None: the recipe's
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
    recipe: str = "cvpr"  # stages/recipes.py: image size, resize antialias, position embeddings
    redo_changed: bool = False  # recompute committed parts whose input files changed (else refuse to resume)
    oracle_noise: float = 0.0  # the oracle teacher's noise (std, in units of its class embeddings)
    projection: str = "released"  # released: rounded as the released code (nuScenes: float32 steps); or float64

    def __post_init__(self):
        if self.image_size is None:  # frozen: set once, here
            object.__setattr__(self, "image_size", IMAGES[check_recipe(self.recipe)].image_size)
        check_recipe(self.recipe)
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection {self.projection!r}: one of {', '.join(PROJECTIONS)}")
        if self.layout not in LAYOUTS or self.quantize not in QUANTIZE:
            raise ConfigError(
                f"layout {self.layout!r} / quantize {self.quantize!r}: layout is one of {LAYOUTS}, quantize one "
                f"of {QUANTIZE}"
            )
        if self.quantize != "none" and self.layout != "grid":
            raise ConfigError("--quantize int8 needs --layout grid (per-point features are stored as float16)")


LAYERS = {  # what a teacher's targets are, where it is not the usual last block
    "maskclip-value": "maskclip-value: last block's value path (no residual, no MLP), ln_post, visual projection",
    "oracle": "oracle: per patch, the mean of seeded random embeddings of its pixels' classes",
}


PROJECTIONS = ("released", "float64")


def projection_rule(meta, projection: str) -> str:
    """A store's `projection` attribute: the dataset's visibility rule and how points were moved."""
    if projection == "float64" or meta.projection_steps is None:
        return f"{meta.visibility.name}; one float64 transform"
    return f"{meta.visibility.name}; {meta.projection_steps}"


def recipe_teacher(cfg: ExtractConfig, weights: TeacherWeights) -> TeacherModel:
    """The configured teacher, with resolved `weights` and the recipe's position-embedding rule."""
    return build_teacher(get_spec(cfg.teacher), cfg.image_size, weights, IMAGES[cfg.recipe].pos_embed, cfg.oracle_noise)


def store_attributes(cfg: ExtractConfig, ds: LidarDataset, scans: list[str], weights: TeacherWeights) -> dict:
    """Provenance of a store; the IDENTITY_KEYS among them must match for a rerun to continue it."""
    spec = get_spec(cfg.teacher)
    data_cfg = timm.get_pretrained_cfg(spec.timm_name) if spec.dense != "oracle" else None
    data_cfg = data_cfg.to_dict() if data_cfg is not None else {}
    meta = ds.meta
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scalr_version": __version__,
        "teacher": {
            "name": spec.name,
            "timm_name": spec.timm_name,
            "dim": spec.dim,
            "patch": spec.patch,
            "layer": LAYERS.get(spec.dense, "last block, before the final norm, prefix tokens removed"),
            "dense": spec.dense,
            "pos_embed": None
            if spec.dense == "oracle"
            else POS_EMBED[pos_embed_rule(spec, IMAGES[cfg.recipe].pos_embed)],
            "weights": weights.label,
            "random_init": weights.random_init,
            "hub": weights.hub,  # by name from the Hugging Face cache: repository, revision, file
            "mean": list(data_cfg.get("mean", ())),
            "std": list(data_cfg.get("std", ())),
            **(
                {"inputs": "class maps of the synthetic rigs", "noise": cfg.oracle_noise}
                if spec.dense == "oracle"
                else {}
            ),
        },
        "teacher_weights_path": None if weights.random_init else str(Path(weights.path).resolve()),
        "image_size": list(cfg.image_size),
        "recipe": cfg.recipe,
        "resize": resize_rule(cfg.recipe),
        "sampling": SAMPLING,
        "dataset": dataset_attributes(ds, cfg.split, scans),
        "dataset_root": str(Path(cfg.root).resolve()),
        "index_problems": sorted({str(p) for p in ds.problems}),  # with --on-error skip: what was passed over
        "cameras": list(meta.camera_names),
        "intensity_max": meta.intensity_max,
        "intensity": intensity_attributes(ds),
        "plan": {"scans": len(scans), "scans_per_part": cfg.scans_per_part},
        "projection": projection_rule(meta, cfg.projection),
        "points_dtype": meta.points_dtype,
        "dtype": "float16",
        "layout": cfg.layout,
        "quantize": cfg.quantize,
        "grid_size": [cfg.image_size[0] // spec.patch, cfg.image_size[1] // spec.patch]
        if cfg.layout == "grid"
        else None,
    }


def dataset_attributes(ds: LidarDataset, split: str, scans: list[str]) -> dict:
    """The dataset part of a store's identity: name, split and the exact list of scans."""
    digest = hashlib.sha256("\n".join(scans).encode()).hexdigest()
    return {"name": ds.meta.name, "split": split, "scans": len(scans), "scan_ids_sha256": digest}


def intensity_attributes(ds: LidarDataset) -> dict:
    """What the student's intensity input needs, recorded so that stage 2 reads it from the store:
    the raw range and the released code's statistics of the dataset ((i - mean) / std)."""
    meta = ds.meta
    return {"max": meta.intensity_max, "mean": meta.intensity_mean, "std": meta.intensity_std}


def run_teacher(teacher: TeacherModel, images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    with autocast(device, precision):
        return teacher(images.to(device, non_blocking=True))


def extract_parts(
    cfg: ExtractConfig,
    store: FeatureStore,
    teacher: TeacherModel,
    ds: LidarDataset,
    parts: list[int],
    device: torch.device,
    num_workers: int,
    progress=None,
) -> None:
    """Compute and commit `parts` of the plan, in order."""
    plan = store.plan
    indices = [i for p in parts for i in plan.scans_of(p)]
    images = ScanImages(
        ds, indices, cfg.image_size, IMAGES[cfg.recipe].antialias, get_spec(cfg.teacher).inputs, cfg.projection
    )
    loader = Loader(
        images,
        list,
        batch_sampler=part_batches(plan, parts, cfg.batch_size, len(ds.meta.camera_names)),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
        worker_init_fn=lower_priority,
    )
    writer: PartWriter | None = None
    with BackgroundWriter() as background:  # compression and writes overlap the teacher
        for batch in loader:
            images = [cam["image"] for item in batch for cam in item["cameras"] if "image" in cam]
            grids = run_teacher(teacher, torch.stack(images), device, cfg.precision) if images else None
            if grids is not None and not torch.isfinite(grids).all():
                scans = [it["scan_id"] for it in batch]
                raise FloatingPointError(f"teacher {teacher.spec.name} produced non-finite features for scans {scans}")
            k = 0
            for item in batch:
                part = item["scan_index"] // plan.scans_per_part
                if writer is None or writer.part != part:
                    if writer is not None:
                        background.submit(writer.commit)
                    writer = PartWriter(store, part)
                k = write_scan(cfg, item, grids, k, writer, background, ds.meta.camera_names)
            if progress is not None:
                progress(len(images))
        if writer is not None:
            background.submit(writer.commit)


def part_batches(plan: StorePlan, parts: list[int], images_per_batch: int, cameras: int) -> list[list[int]]:
    """Positions (in the order of `parts`' scans) of the scans of each teacher batch. Batches never
    straddle two parts, so a part's bytes depend on that part alone: a rerun that computes only the
    missing parts batches them exactly as an uninterrupted run."""
    scans_per_batch = max(1, images_per_batch // max(1, cameras))
    batches, start = [], 0
    for p in parts:
        n = len(plan.scans_of(p))
        batches += [list(range(start + b, start + min(b + scans_per_batch, n))) for b in range(0, n, scans_per_batch)]
        start += n
    return batches


def write_scan(
    cfg: ExtractConfig,
    item: dict,
    grids: torch.Tensor | None,
    k: int,
    writer: PartWriter,
    background: BackgroundWriter,
    camera_names,
) -> int:
    """Queue the entries of one scan (an item of `ScanImages`) for `writer`; its cameras' token grids
    are `grids[k:]`. Returns the index of the next scan's first grid."""
    base = {"scan_index": item["scan_index"], "scan_id": item["scan_id"], "scan_points": item.get("scan_points", 0)}
    background.submit(writer.note_inputs, item.get("inputs", {}))
    if "error" in item:
        skip_or_raise(cfg, item["error"])
        for name in camera_names:  # the scan is unreadable: every camera of it is a recorded skip
            row = {**base, "camera": name, "image_height": 0, "image_width": 0}
            background.submit(writer.add, {**row, "status": "skipped", "reason": "{}: {}".format(*item["error"])})
        return k
    for cam in item["cameras"]:
        row = {
            **base,
            "camera": cam["camera"],
            "image_height": cam["image_size"][0],
            "image_width": cam["image_size"][1],
        }
        if "error" in cam:
            skip_or_raise(cfg, cam["error"])
            background.submit(writer.add, {**row, "status": "skipped", "reason": "{}: {}".format(*cam["error"])})
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
            where = f"{item['scan_id']}/{cam['camera']}"
            raise FloatingPointError(
                f"teacher features of {where} overflow float16 (|x| > 65504); the store cannot hold them"
            )
        background.submit(writer.add, {**row, "status": "ok", "reason": ""}, data)
    return k


def skip_or_raise(cfg: ExtractConfig, error: tuple[str, str]) -> None:
    if cfg.on_error != "skip":
        raise DatasetError(*error)
    log.warning("skipped %s: %s", *error)


def extract(cfg: ExtractConfig) -> FeatureStore:
    """Fill the store at cfg.out (creating or continuing it) and return it."""
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split, keep_going=cfg.on_error == "skip")
    if ds.problems:  # only with --on-error skip: the scans they break become recorded skips
        problems = "\n  ".join(sorted({str(p) for p in ds.problems}))
        log.warning(
            "%s: %d bad index file(s); the scans they describe are recorded as skipped (see `scalr inspect`), "
            "sequences whose split is unknown are left out:\n  %s",
            cfg.root,
            len(ds.problems),
            problems,
        )
    scans = ds.scan_ids if cfg.max_scans is None else ds.scan_ids[: cfg.max_scans]
    if not scans:
        raise DatasetError(cfg.root, f"split {cfg.split} has no scans")
    spec = get_spec(cfg.teacher)
    if spec.inputs == "class-map" and not (Path(ds.root) / FOLDER).is_dir():
        raise DatasetError(
            ds.root, f"teacher {spec.name} sees the class maps only the synthetic rigs have (scalr synth)"
        )
    weights = resolve_weights(spec, cfg.weights, cfg.weights_dir, cfg.random_init, cfg.seed)
    store = FeatureStore.create_or_open(cfg.out, store_attributes(cfg, ds, scans, weights))
    plan = store.plan
    done = set(store.committed_parts()) - set(changed_parts(cfg, store, ds))
    launch = Launch.from_env(cfg.rank, cfg.world_size)
    todo = [p for p in range(plan.parts) if p not in done and p % launch.world == launch.rank]
    if done:
        log.info(
            "%s: resuming: %d of %d parts already committed, computing %d", cfg.out, len(done), plan.parts, len(todo)
        )
    if not todo:
        return store
    if cfg.scheduler or cfg.dask_workers > 1:
        extract_on_dask(cfg, weights, store, todo)
    else:
        device = pick_device(cfg.device, launch)
        teacher = recipe_teacher(cfg, weights).to(device)
        images = sum(len(plan.scans_of(p)) for p in todo) * len(ds.meta.camera_names)
        with tqdm(total=images, desc=f"extract {cfg.teacher}", unit="img", dynamic_ncols=True) as bar:
            for parts in store.claimed(todo):  # a few at a time, each claimed: two runs into one store share it
                extract_parts(cfg, store, teacher, ds, parts, device, cfg.num_workers, bar.update)
    return FeatureStore(cfg.out, check=False)  # other ranks may still be writing their parts


def changed_parts(cfg: ExtractConfig, store: FeatureStore, ds: LidarDataset) -> list[int]:
    """Committed parts whose input files (size, modification time) changed since they were written:
    refused, or with `redo_changed` uncommitted to be computed again. Parts written by scalr 0.2.0
    and before recorded no inputs and are not checked."""
    changed = {}
    for part in store.committed_parts():
        recorded = store.part_record(part).get("inputs") or {}
        now = file_stats([Path(ds.root) / name for name in recorded], ds.root)
        differ = [name for name, stat in recorded.items() if now.get(name) != stat]
        if differ:
            changed[part] = differ
    if changed and not cfg.redo_changed:
        part, files = next(iter(changed.items()))
        raise DatasetError(
            Path(ds.root) / files[0],
            f"changed (size or modification time) since part {part} of {store.path} was extracted; "
            f"{len(changed)} committed part(s) read changed files: rerun with --redo-changed to compute them again, "
            "or extract into another --out",
        )
    for part in changed:
        store.uncommit(part)
        log.warning(
            "%s: part %d read files that changed (%s ...): computing it again", store.path, part, changed[part][0]
        )
    return list(changed)


# ---- dask.distributed: parts as tasks, the teacher loaded once per worker ---------------------
def extract_on_dask(cfg: ExtractConfig, weights: TeacherWeights, store: FeatureStore, parts: list[int]) -> None:
    """Run `parts` as tasks on a running scheduler (`cfg.scheduler`) or a local cluster of
    `cfg.dask_workers` processes; a worker's error is raised here."""
    if cfg.scheduler:
        client, cluster = Client(cfg.scheduler), None
    else:
        cluster = LocalCluster(n_workers=cfg.dask_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        futures = [
            client.submit(_dask_part, cfg, weights, p, key=f"scalr-extract-{store.path.name}-{p}", pure=False)
            for p in parts
        ]
        with tqdm(total=len(parts), desc=f"extract {cfg.teacher} (dask)", unit="part") as bar:
            for future in as_completed(futures):
                future.result()  # re-raises a worker's error here
                bar.update(1)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _dask_part(cfg: ExtractConfig, weights: TeacherWeights, part: int) -> int:
    """One part on a dask worker; the worker keeps its teacher and dataset for the next part."""
    worker = get_worker()
    cache = worker.__dict__.setdefault("_scalr_extract", {})
    if "teacher" not in cache:  # once per worker process
        torch.set_num_threads(max(1, int(worker.state.nthreads)))
        cache["device"] = pick_device(cfg.device)
        cache["teacher"] = recipe_teacher(cfg, weights).to(cache["device"])
        cache["dataset"] = open_dataset(cfg.dataset, cfg.root, cfg.split, keep_going=cfg.on_error == "skip")
    store = FeatureStore(cfg.out, check=False)
    with store.claim(part, wait=True):  # another process may hold it: then it is committed, or its writer died
        if not store.is_committed(part):
            extract_parts(cfg, store, cache["teacher"], cache["dataset"], [part], cache["device"], 0)
    return part
