"""bench pretrain: measured performance of stage 2 on the user's hardware (never timed tests).

The student's step time (forward, backward, AdamW) fed by the real store loader against the same
batches already in memory (the loader's overhead); against a step that first runs a teacher online
on the batch's images (what caching the targets saves); one sample's CPU cost and the bytes of
chunk files it reads; peak memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.datasets import open_dataset
from stages.extract.extract import run_teacher
from stages.extract.images import load_resized
from stages.extract.teachers import Teacher, load_teacher
from stages.recipes import IMAGES
from stages.runtime import Loader, autocast, peak_memory_mib, pick_device, seeded, sync, to_device
from stages.student.losses import cosine_distance_loss
from stages.student.pretrain import build_student
from stages.student.samples import DistillationData, EpochSampler, SampleConfig, collate
from stages.student.waffleiron import STUDENTS, Student
from storage.targets import sample_grid

WARM_UP_STEPS = 2  # not timed


@dataclass(frozen=True)
class BenchPretrainConfig:
    store: Path
    student: str = "WI-48-256"
    batch_size: int = 2
    max_points: int = 20000
    steps: int = 6  # timed steps (after the warm-up steps)
    num_workers: int = 2
    device: str = "auto"
    precision: str = "fp32"
    teachers: tuple[str, ...] = ("dinov2-vits14", "dinov2-vitb14")  # run online for comparison


class StudentSteps:
    """A student and its optimiser, stepped on batches."""

    def __init__(self, cfg: BenchPretrainConfig, target_dim: int, device: torch.device):
        self.device, self.precision = device, cfg.precision
        with seeded(0):
            self.model = build_student(STUDENTS[cfg.student], target_dim, "linear", 2048, 1).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def step(self, batch: dict, targets: torch.Tensor, model: torch.nn.Module | None = None) -> None:
        with autocast(self.device, self.precision):
            loss = cosine_distance_loss((model or self.model)(batch), targets).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def timed(self, fn: Callable, *args) -> tuple[float, object]:
        """(seconds `fn(*args)` took on the device, its result)."""
        sync(self.device)
        t0 = time.perf_counter()
        result = fn(*args)
        sync(self.device)
        return time.perf_counter() - t0, result

    def load_and_step(self, batches) -> dict:
        batch = to_device(next(batches), self.device)
        self.step(batch, batch["targets"])
        return batch


def bench_pretrain(cfg: BenchPretrainConfig) -> dict:
    """Student step time fed by the real store loader vs by the same batches already in memory;
    and vs a step that first runs a teacher online on the batch's images (decoded and resized
    beforehand, so only the teacher's own cost is added)."""
    device = pick_device(cfg.device)
    data = DistillationData([cfg.store], SampleConfig(max_points=cfg.max_points))  # opening runs the integrity gate
    store = data.groups[0].stores[0]
    sample_ms, read_mb = sample_cost(data, samples=16)
    steps = StudentSteps(cfg, data.target_dim, device)
    batches, loader_step, memory_step = loader_against_memory(cfg, data, steps)
    result = {
        "student": cfg.student,
        "device": str(device),
        "precision": cfg.precision,
        "batch_size": cfg.batch_size,
        "max_points": cfg.max_points,
        "store_teacher": store.attrs["teacher"]["name"],
        "num_workers": cfg.num_workers,
        "step_s_loader": round(loader_step, 4),
        "step_s_in_memory": round(memory_step, 4),
        "loader_over_in_memory": round(loader_step / memory_step, 3),
        "peak_mib_cached": round(peak_memory_mib(device), 1),
        "layout": store.attrs["layout"],
        "quantize": store.attrs["quantize"],
        "sample_ms_one_thread": sample_ms,
        "mb_read_per_step": round(read_mb * cfg.batch_size, 3),
    }
    cached_step, online = online_against_cached(cfg, store, batches, steps)
    result["online"] = {
        name: {"step_s": round(t, 4), "online_over_cached": round(t / cached_step, 3)} for name, t in online.items()
    }
    result["step_s_cached_interleaved"] = round(cached_step, 4)
    result["peak_mib_with_teachers"] = round(peak_memory_mib(device), 1)
    return result


def loader_against_memory(
    cfg: BenchPretrainConfig, data: DistillationData, steps: StudentSteps
) -> tuple[list[dict], float, float]:
    """(the batches seen, median step time with the real loader, with the same batch in memory).
    The two are interleaved step by step so that drift of the machine (allocator growth, caches,
    other load) hits both alike; a loader step is timed from the end of the previous step, so
    waiting for data counts."""
    loader = Loader(
        data,
        collate,
        batch_sampler=EpochSampler(data.sizes, cfg.batch_size, seed=0),
        num_workers=cfg.num_workers,
        pin_memory=steps.device.type == "cuda",
    )
    seen, loader_times, memory_times = [], [], []
    batches = iter(loader)
    for i in range(cfg.steps + WARM_UP_STEPS):
        loader_t, batch = steps.timed(steps.load_and_step, batches)
        memory_t, _ = steps.timed(steps.step, batch, batch["targets"])
        seen.append(batch)
        if i >= WARM_UP_STEPS:
            loader_times.append(loader_t)
            memory_times.append(memory_t)
    return seen, float(np.median(loader_times)), float(np.median(memory_times))


def online_against_cached(
    cfg: BenchPretrainConfig, store, batches: list[dict], steps: StudentSteps
) -> tuple[float, dict[str, float]]:
    """(median cached step time, median online step time per teacher), interleaved on the same
    batches: each sample's camera image goes through the teacher (seeing images as the store's
    recipe did), targets are sampled at as many points as the sample has, then the same student
    step (one backbone, a head per target width)."""
    attrs = store.attrs
    size = tuple(attrs["image_size"])
    recipe = IMAGES[attrs.get("recipe") or "cvpr"]
    images = batch_images(attrs, batches, recipe.antialias)
    teachers = {
        name: load_teacher(name, size, random_init=True, pos_embed=recipe.pos_embed).to(steps.device)
        for name in cfg.teachers
    }
    heads = {
        name: torch.nn.Linear(steps.model.backbone.cfg.width, t.spec.dim).to(steps.device)
        for name, t in teachers.items()
    }
    for head in heads.values():
        steps.optimizer.add_param_group({"params": head.parameters()})
    rng = torch.Generator().manual_seed(0)

    def online_targets(teacher: Teacher, batch: dict) -> torch.Tensor:
        grids = run_teacher(
            teacher, torch.stack([images[sid] for sid in batch["scan_ids"]]), steps.device, cfg.precision
        )
        counts = torch.bincount(batch["batch"], minlength=len(grids)).tolist()
        cols = [torch.randint(0, size[1], (n,), generator=rng) for n in counts]
        rows = [torch.randint(0, size[0], (n,), generator=rng) for n in counts]
        return torch.cat([sample_grid(g, torch.stack([c, r], 1).float(), size) for g, c, r in zip(grids, cols, rows)])

    def online_step(batch: dict, teacher: Teacher, model: Student) -> None:
        steps.step(batch, online_targets(teacher, batch), model)

    cached_times, online_times = [], {name: [] for name in teachers}
    for i, batch in enumerate(batches):
        cached, _ = steps.timed(steps.step, batch, batch["targets"])
        for name, teacher in teachers.items():
            model = Student(steps.model.backbone, heads[name])
            t, _ = steps.timed(online_step, batch, teacher, model)
            if i >= WARM_UP_STEPS:
                online_times[name].append(t)
        if i >= WARM_UP_STEPS:
            cached_times.append(cached)
    return float(np.median(cached_times)), {name: float(np.median(t)) for name, t in online_times.items()}


def batch_images(attrs: dict, batches: list[dict], antialias: bool) -> dict[str, torch.Tensor]:
    """The first camera's image of every scan of `batches`, resized as the store's recipe did."""
    ds = open_dataset(attrs["dataset"]["name"], attrs["dataset_root"], attrs["dataset"]["split"])
    index = {sid: i for i, sid in enumerate(ds.scan_ids)}
    size = tuple(attrs["image_size"])
    images = {}
    for sid in {sid for b in batches for sid in b["scan_ids"]}:
        camera = ds[index[sid]].cameras[0]
        images[sid] = torch.from_numpy(load_resized(camera.image_path, camera.image_size, size, antialias)).permute(
            2, 0, 1
        )
    return images


def sample_cost(data, samples: int) -> tuple[float, float]:
    """(median ms to build one training sample on one thread, mean MB of chunk files it reads)."""

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
            read.append(
                sum(store.chunk_bytes_read(*loc) for store, loc in zip(data.groups[scan.group].stores, locations))
            )
    finally:
        torch.set_num_threads(threads)
    return round(1e3 * float(np.median(times)), 2), float(np.mean(read)) / 1e6


def pretrain_report_lines(r: dict) -> list[str]:
    lines = [
        f"pretraining benchmark: {r['student']}, batch {r['batch_size']} x <= {r['max_points']} points, "
        f"{r['device']} ({r['precision']}); store teacher {r['store_teacher']}",
        f"  store layout {r['layout']} (quantize {r['quantize']}): one sample {r['sample_ms_one_thread']:.1f} ms "
        f"on one thread, {r['mb_read_per_step']:.2f} MB of chunk files read per step",
        f"  step time, real store loader / batches in memory   {r['loader_over_in_memory']:.3f}  "
        f"({r['step_s_loader']:.3f} s / {r['step_s_in_memory']:.3f} s)",
        f"  peak memory with cached targets                     {r['peak_mib_cached']:.0f} MiB",
    ]
    for name, o in r["online"].items():
        lines.append(
            f"  step time, teacher {name} online / cached      {o['online_over_cached']:.3f}  ({o['step_s']:.3f} "
            f"s / {r['step_s_cached_interleaved']:.3f} s)"
        )
    lines.append(f"  peak memory with the online teachers too           {r['peak_mib_with_teachers']:.0f} MiB")
    lines.append("  " + json.dumps(r))
    return lines
