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
from stages.extract.extract import RECIPES, ExtractConfig, ScanImages, extract_parts, pick_device, recipe_teacher, run_teacher, store_attributes
from stages.tools.inspect import disk_bytes
from stages.extract.teachers import load_teacher
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
    teacher = recipe_teacher(ecfg).to(device)
    cams = max(1, len(ds.meta.camera_names))
    per_batch = max(1, ecfg.batch_size // cams)
    # Warm-up (allocator, kernels, thread pools) on one batch.
    items = [ScanImages(ds, list(range(len(scans))), ecfg.image_size, RECIPES[ecfg.recipe].antialias)[i] for i in range(min(per_batch, len(scans)))]
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
        entries = len(manifest)
        size = disk_bytes(out)
    # The same images, decoded and resized beforehand, in the same batches: teacher time alone.
    loader_ds = ScanImages(ds, list(range(len(scans))), ecfg.image_size, RECIPES[ecfg.recipe].antialias)
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
        "layout": ecfg.layout, "quantize": ecfg.quantize, "entries": entries, "store_bytes": size,
        "kib_per_entry": round(size / max(entries, 1) / 1024, 1),
        "bytes_over_points_dim_2": round(size / max(points * teacher.spec.dim * 2, 1), 3),
        "threads": torch.get_num_threads(), "num_workers": ecfg.num_workers, "batch_size": ecfg.batch_size,
    }  # fmt: skip


def report_lines(result: dict) -> list[str]:
    return [
        f"extraction benchmark: {result['teacher']} at {result['image_size'][0]}x{result['image_size'][1]} on {result['device']} ({result['precision']}), {result['dataset']}",
        f"  {result['scans']} scans, {result['images']} images, {result['points']:,} points",
        f"  images/s                              {result['images_per_s']:.2f}",
        f"  extraction / teacher forward time     {result['extract_over_forward']:.3f}  ({result['extract_s']:.2f} s / {result['teacher_forward_s']:.2f} s)",
        f"  store ({result['layout']}, quantize {result['quantize']})   {result['store_bytes'] / 2**20:.1f} MiB, {result['kib_per_entry']:.1f} KiB per entry",
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
    from stages.tools.scan_features import StoreScans

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
        "store": str(store_path), "parts": len(parts), "chunk_files": files, "open_s_first": round(times[0], 4),
        "open_s_best": round(min(times), 4), "ms_per_part": round(1e3 * min(times) / max(len(parts), 1), 3),
        "view_manifests_s": round(min(manifests), 4), "view_manifest_ms_per_part": round(1e3 * min(manifests) / max(len(parts), 1), 3),
        "view_pca_s": round(min(pca), 4), "view_first_scan_s": round(min(first_scan), 4),
    }  # fmt: skip


def open_report_lines(r: dict) -> list[str]:
    return [
        f"open benchmark: {r['store']}",
        f"  integrity gate: {r['parts']} parts, {r['chunk_files']} chunk files: {r['open_s_best']:.3f} s (first {r['open_s_first']:.3f} s), {r['ms_per_part']:.2f} ms per part",
        f"  scalr view: manifests {r['view_manifests_s']:.3f} s ({r['view_manifest_ms_per_part']:.2f} ms per part), PCA colours {r['view_pca_s']:.3f} s, first scan {r['view_first_scan_s']:.3f} s",
        "  " + json.dumps(r),
    ]


# ---- pretrain ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchPretrainConfig:
    store: Path
    student: str = "WI-48-256"
    batch_size: int = 2
    max_points: int = 20000
    steps: int = 6  # timed steps (after 2 warm-up steps)
    num_workers: int = 2
    device: str = "auto"
    precision: str = "fp32"
    teachers: tuple[str, ...] = ("dinov2-vits14", "dinov2-vitb14")  # run online for comparison


def _peak_memory(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_pretrain(cfg: BenchPretrainConfig) -> dict:
    """Student step time (forward, backward, AdamW) fed by the real store loader vs by the same
    batches already in memory; and vs a step that first runs a teacher online on the batch's
    images (decoded and resized beforehand, so only the teacher's own cost is added)."""
    import numpy as np

    from pipeline.datasets import open_dataset
    from stages.extract.extract import load_resized
    from stages.student.pretrain import build_student
    from stages.student.samples import DistillationData, EpochSampler, SampleConfig, collate
    from storage.targets import sample_grid
    from stages.student.waffleiron import STUDENTS, cosine_distance_loss

    device = pick_device(cfg.device)
    data = DistillationData([cfg.store], SampleConfig(max_points=cfg.max_points))  # opening runs the integrity gate
    store = data.groups[0].stores[0]
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    total = cfg.steps + 2  # two warm-up steps are not timed

    def student(dim):
        torch.manual_seed(0)
        model = build_student(STUDENTS[cfg.student], dim, "linear", 2048, 1).to(device).train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(model, optimizer, batch, targets):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = cosine_distance_loss(model(batch), targets).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def on_device(batch):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # 0. One sample's CPU cost in this process, one thread (what a loader worker spends), and the
    #    bytes of the chunk files one sample reads.
    sample_ms, read_mb = sample_cost(data, samples=16)
    # 1. The real loader (workers read the store and transform while the student trains) against
    #    the same batch already in memory, interleaved step by step so that drift of the machine
    #    (allocator growth, caches, other load) hits both alike. A loader step is timed from the
    #    end of the previous step, so waiting for data counts.
    model, optimizer = student(data.target_dim)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=EpochSampler(data.sizes, cfg.batch_size, seed=0), collate_fn=collate,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    seen, loader_times, memory_times = [], [], []
    batches = iter(loader)
    for i in range(total):
        _sync(device)
        t0 = time.perf_counter()
        batch = on_device(next(batches))
        step(model, optimizer, batch, batch["targets"])
        _sync(device)
        t1 = time.perf_counter()
        step(model, optimizer, batch, batch["targets"])
        _sync(device)
        t2 = time.perf_counter()
        seen.append(batch)
        if i >= 2:
            loader_times.append(t1 - t0)
            memory_times.append(t2 - t1)
    loader_step, memory_step = float(np.median(loader_times)), float(np.median(memory_times))
    memory_cached = _peak_memory(device)
    resident = seen
    result = {
        "student": cfg.student, "device": str(device), "precision": cfg.precision, "batch_size": cfg.batch_size,
        "max_points": cfg.max_points, "store_teacher": store.attrs["teacher"]["name"], "num_workers": cfg.num_workers,
        "step_s_loader": round(loader_step, 4), "step_s_in_memory": round(memory_step, 4),
        "loader_over_in_memory": round(loader_step / memory_step, 3), "peak_mib_cached": round(memory_cached, 1), "online": {},
        "layout": store.attrs["layout"], "quantize": store.attrs["quantize"], "sample_ms_one_thread": sample_ms,
        "mb_read_per_step": round(read_mb * cfg.batch_size, 3),
    }  # fmt: skip
    # 3. Online teachers, interleaved with cached steps on the same batches so that drift of the
    #    machine (allocator, caches, other load) hits both alike: each sample's camera image goes
    #    through the teacher, targets are sampled at as many points as the sample has, then the
    #    same student step (one backbone, a head per target width).
    attrs = store.attrs
    ds = open_dataset(attrs["dataset"]["name"], attrs["dataset_root"], attrs["dataset"]["split"])
    size = tuple(attrs["image_size"])
    recipe = RECIPES[attrs.get("recipe") or "cvpr"]  # the online teachers see images as the store's did
    index = {sid: i for i, sid in enumerate(ds.scan_ids)}
    images = {}
    for sid in {sid for b in seen for sid in b["scan_ids"]}:
        camera = ds[index[sid]].cameras[0]
        images[sid] = torch.from_numpy(load_resized(camera.image_path, camera.image_size, size, recipe.antialias)).permute(2, 0, 1)
    teachers = {name: load_teacher(name, size, random_init=True, pos_embed=recipe.pos_embed).to(device) for name in cfg.teachers}
    heads = {name: torch.nn.Linear(model.backbone.cfg.width, t.spec.dim).to(device) for name, t in teachers.items()}
    for head in heads.values():
        optimizer.add_param_group({"params": head.parameters()})
    rng = torch.Generator().manual_seed(0)

    def online_targets(teacher, batch):
        grids = run_teacher(teacher, torch.stack([images[sid] for sid in batch["scan_ids"]]), device, cfg.precision)
        counts = torch.bincount(batch["batch"], minlength=len(grids)).tolist()
        pixels = [torch.stack([torch.randint(0, size[1], (n,), generator=rng), torch.randint(0, size[0], (n,), generator=rng)], 1).float() for n in counts]
        return torch.cat([sample_grid(g, p, size) for g, p in zip(grids, pixels)])

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    cached_times, online_times = [], {name: [] for name in teachers}
    for i, batch in enumerate(resident[:total]):
        cached = timed(lambda: step(model, optimizer, batch, batch["targets"]))
        for name, teacher in teachers.items():
            student_t = type(model)(model.backbone, heads[name])
            t = timed(lambda: step(student_t, optimizer, batch, online_targets(teacher, batch)))
            if i >= 2:
                online_times[name].append(t)
        if i >= 2:
            cached_times.append(cached)
    cached_step = float(np.median(cached_times))
    result["step_s_cached_interleaved"] = round(cached_step, 4)
    for name in teachers:
        online = float(np.median(online_times[name]))
        result["online"][name] = {"step_s": round(online, 4), "online_over_cached": round(online / cached_step, 3)}
    result["peak_mib_with_teachers"] = round(_peak_memory(device), 1)
    return result


def sample_cost(data, samples: int) -> tuple[float, float]:
    """(median ms to build one training sample on one thread, mean MB of chunk files it reads)."""
    import numpy as np

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times, read = [], []
    try:
        for i in range(min(samples, len(data))):
            t0 = time.perf_counter()
            data[(i, i)]
            times.append(time.perf_counter() - t0)
            scan = data.scans[i]
            rng = np.random.default_rng(i)  # the camera the sample drew, as __getitem__ draws it
            _, locations = scan.entries[rng.integers(len(scan.entries))]
            read.append(sum(store.chunk_bytes_read(*loc) for store, loc in zip(data.groups[scan.group].stores, locations)))
    finally:
        torch.set_num_threads(threads)
    return round(1e3 * float(np.median(times)), 2), float(np.mean(read)) / 1e6


def pretrain_report_lines(r: dict) -> list[str]:
    lines = [
        f"pretraining benchmark: {r['student']}, batch {r['batch_size']} x <= {r['max_points']} points, {r['device']} ({r['precision']}); store teacher {r['store_teacher']}",
        f"  store layout {r['layout']} (quantize {r['quantize']}): one sample {r['sample_ms_one_thread']:.1f} ms on one thread, {r['mb_read_per_step']:.2f} MB of chunk files read per step",
        f"  step time, real store loader / batches in memory   {r['loader_over_in_memory']:.3f}  ({r['step_s_loader']:.3f} s / {r['step_s_in_memory']:.3f} s)",
        f"  peak memory with cached targets                     {r['peak_mib_cached']:.0f} MiB",
    ]
    for name, o in r["online"].items():
        lines.append(f"  step time, teacher {name} online / cached      {o['online_over_cached']:.3f}  ({o['step_s']:.3f} s / {r['step_s_cached_interleaved']:.3f} s)")
    lines.append(f"  peak memory with the online teachers too           {r['peak_mib_with_teachers']:.0f} MiB")
    lines.append("  " + json.dumps(r))
    return lines
