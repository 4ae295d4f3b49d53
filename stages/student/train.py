"""The one training loop of scalr (pretraining now; probing and finetuning reuse it).

A run folder holds config.json (the resolved config), metrics.jsonl (one line per logged step),
checkpoints/last.pt (model, optimiser, scheduler, scaler, sampler position, RNG states, config)
and loss.png. Launched under `torchrun`, it uses DDP with SyncBatchNorm; the rank and world size
come only from the launcher's environment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from stages.student.waffleiron import inputs_problem
from storage.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 3500  # linear warm-up, then cosine decay to min_lr, stepped per iteration
    min_lr: float = 1e-5
    grad_clip: float | None = None  # none in ScaLR


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # global, over all ranks
    epochs: int = 25
    max_steps: int | None = None  # stop early (the schedule still spans all epochs)
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast (GPU)
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    checkpoint_every: int = 500  # steps
    log_every: int = 10  # steps


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        d = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
        if d.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return d

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value)
        return value


class CpuSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) whose training statistics are summed over all ranks (gloo/CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        stats = all_reduce(torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_tensor([x.shape[0]])]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1).clamp(min=1))
        y = (xf - mean) / torch.sqrt(var + self.eps)
        return (y * self.weight + self.bias).to(x.dtype) if self.affine else y.to(x.dtype)


def cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d for CpuSyncBatchNorm, keeping parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias  # the very parameters the optimiser holds
            setattr(module, name, sync)
        else:
            cpu_sync_batchnorm(child)
    return module


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine to min_lr at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))) / base_lr


StepLoss = Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]  # (sum of per-point losses, number of points)


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer into RUN/tensorboard, or None with a one-line note when the optional
    tensorboard package is absent (`pip install 'scalr[tb]'`)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: metrics go to metrics.jsonl only (pip install 'scalr[tb]' adds TensorBoard event files)")
        return None
    return SummaryWriter(str(Path(run_dir) / "tensorboard"))


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def fit(
    model: nn.Module,
    param_groups: list[dict],
    dataset: torch.utils.data.Dataset,
    make_sampler: Callable[[int, int], object],
    collate: Callable,
    step_loss: StepLoss,
    optim: OptimConfig,
    train: TrainConfig,
    run_dir: Path,
    record: dict,
    resume: bool = True,
) -> dict:
    """Train `model` and return a summary. `make_sampler(rank, world)` gives an EpochSampler."""
    ddp = Distributed.from_env()
    device = pick_device(train.device, ddp.local_rank)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    sampler = make_sampler(ddp.rank, ddp.world)
    steps_per_epoch = len(sampler)
    total_steps = steps_per_epoch * train.epochs
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas)
    bases = [g.get("lr", optim.lr) for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s, b=b: warmup_cosine(s, total_steps, optim.warmup_iters, b, optim.min_lr * b / optim.lr) for b in bases]
    )
    scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        missing = [k for k in ("optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch", "rng") if k not in state]
        if missing:
            raise CheckpointError(ckpt_path, f"cannot resume: no {missing} (not a training checkpoint; use --fresh or another --out)")
        if problem := inputs_problem(state["config"]):
            raise CheckpointError(ckpt_path, f"cannot resume: {problem} (use --fresh or another --out)")
        load_weights(ckpt_path, model, state["model"], "this run's model (use --fresh or another --out to start a different model)")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log.info("%s: resuming at step %d (epoch %d, batch %d)", ckpt_path, step, epoch, batch_in_epoch)
    else:
        torch.manual_seed(train.seed)
    metrics_file = run_dir / "metrics.jsonl"
    writer = tensorboard_writer(run_dir) if ddp.rank == 0 else None
    if ddp.rank == 0:
        write_json(run_dir / "config.json", record)
        if step == 0:
            metrics_file.unlink(missing_ok=True)  # a fresh run starts a fresh log
    net = model
    if ddp.world > 1:  # batch statistics over the global batch; PyTorch's SyncBatchNorm is GPU-only
        net = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else cpu_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[train.precision]
    last_step = total_steps if train.max_steps is None else min(total_steps, train.max_steps)

    saved_step = step if resume and ckpt_path.is_file() else None  # the step last written to ckpt_path

    def save(at_step, at_epoch, at_batch):
        nonlocal saved_step
        saved_step = at_step
        if ddp.rank != 0:
            return
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "step": at_step, "epoch": at_epoch, "batch_in_epoch": at_batch,
            "rng": rng, "config": record,
        })  # fmt: skip

    net.train()
    bar = tqdm(total=last_step, initial=step, desc="train", unit="step", disable=ddp.rank != 0, dynamic_ncols=True)
    window_loss, window_points, window_samples, t_window = 0.0, 0, 0, time.perf_counter()
    loader_gen = torch.Generator().manual_seed(train.seed)  # keeps loader seeding off the global RNG
    # One loader for the whole run: its workers persist across epochs, and the batch sampler,
    # iterated in this process, is moved to each epoch (and resume position) before iterating.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=train.num_workers, pin_memory=device.type == "cuda",
        generator=loader_gen, prefetch_factor=4 if train.num_workers else None, persistent_workers=train.num_workers > 0,
    )  # fmt: skip
    while step < last_step:
        sampler.start(epoch, batch_in_epoch)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss_sum, count = step_loss(net, batch)
            # Normalise by the GLOBAL number of points (DDP averages gradients over ranks), so
            # any number of ranks computes the same update as one process.
            global_count = ddp.all_sum(count.detach().float().clone())
            loss = loss_sum * ddp.world / global_count.clamp(min=1)
            finite = ddp.all_sum(torch.isfinite(loss.detach()).float())
            if finite.item() < ddp.world:
                bar.close()
                raise NonFiniteLoss(f"non-finite loss at step {step + 1} (epoch {epoch}); stopped. The last good checkpoint is {ckpt_path if ckpt_path.is_file() else 'none yet'}; lower the learning rate or use --set train.precision=fp32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            batch_in_epoch += 1
            global_loss = ddp.all_sum(loss_sum.detach().float().clone()).item()
            window_loss += global_loss
            window_points += int(global_count.item())
            window_samples += train.batch_size
            if step % train.log_every == 0 or step == last_step:
                dt = time.perf_counter() - t_window
                entry = {"step": step, "epoch": epoch, "loss": window_loss / max(window_points, 1), "lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples / dt, "time": time.time()}
                if ddp.rank == 0:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(entry) + "\n")
                if writer is not None:
                    for key in ("loss", "lr", "samples_per_s"):
                        writer.add_scalar(f"train/{key}", entry[key], step)
                    writer.add_scalar("train/peak_memory_mib", peak_memory_mib(device), step)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", samples_s=f"{entry['samples_per_s']:.1f}")
                window_loss, window_points, window_samples, t_window = 0.0, 0, 0, time.perf_counter()
            bar.update(1)
            if batch_in_epoch == steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            if step % train.checkpoint_every == 0 or step == last_step:
                save(step, epoch, batch_in_epoch)
            if step >= last_step:
                break
    bar.close()
    if writer is not None:
        writer.close()
    if saved_step != step:
        save(step, epoch, batch_in_epoch)  # e.g. max_steps=0: the untrained model, a baseline to probe
    if ddp.rank == 0:
        plot_loss(metrics_file, run_dir / "loss.png")
    return {"steps": step, "epochs": epoch, "checkpoint": str(ckpt_path), "metrics": str(metrics_file)}


def plot_loss(metrics_file: Path, out: Path) -> Path | None:
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    steps = np.array([r["step"] for r in rows])
    ax.plot(steps, [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per point)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="learning rate")
    ax2.set_ylabel("learning rate")
    ax.set_title(f"training loss ({metrics_file.parent.name})")
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
