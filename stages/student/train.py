"""The one training loop of scalr: pretraining, probing, finetuning and training from scratch.

A run folder (storage/runs.py) holds config.json (the run record), metrics.jsonl (one line per
logged step), checkpoints/last.pt (model, optimiser, scheduler, scaler, sampler position, RNG
states, record) and loss.png. Launched under `torchrun`, it uses DDP with SyncBatchNorm; the rank
and world size come only from the launcher's environment (stages/runtime.py). The run's random
state lives in a fork of torch's generator, seeded or restored from the checkpoint, and saved with
every checkpoint: the caller's random state is the same after training as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.distributed.nn.functional import all_reduce
from tqdm import tqdm

from pipeline.errors import ConfigError, ScalrError
from stages.runtime import Launch, Loader, autocast, peak_memory_mib, pick_device, to_device
from stages.student.checkpoints import inputs_problem
from stages.student.schedules import SCHEDULES, check_rsqrt_cooldown, rsqrt_cooldown, warmup_cosine
from storage.atomic import disk_errors, write_atomically
from storage.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint, write_json
from storage.runs import RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (weight decay on every parameter, as the released code) and its per-iteration schedule
    (stages/student/schedules.py)."""

    lr: float = 2e-3
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "warmup-cosine"  # warmup-cosine (CVPR, every downstream run) or rsqrt-cooldown (ScaLR+)
    warmup_iters: int = 3500  # linear warm-up ...
    warmup_epochs: float | None = None  # ... or its length in epochs (then warmup_iters is not used)
    min_lr: float = 1e-5  # warmup-cosine: the lr at the end
    cooldown_epochs: float = 2.0  # rsqrt-cooldown: the linear cool-down over the run's last epochs (65: from 63)
    timescale_epochs: float = 0.45  # rsqrt-cooldown: of the reciprocal square root
    grad_clip: float | None = None  # none in ScaLR

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule {self.schedule!r}: one of {', '.join(SCHEDULES)}")

    def lr_factor(self, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
        """The schedule's factor of the base lr at each iteration of a run of `epochs` epochs."""
        total = steps_per_epoch * epochs
        warmup = self.warmup_iters if self.warmup_epochs is None else self.warmup_epochs * steps_per_epoch
        if self.schedule == "warmup-cosine":
            factor_min = self.min_lr / self.lr
            return lambda it: warmup_cosine(it, warmup, total, factor_min)
        cooldown = (epochs - self.cooldown_epochs) * steps_per_epoch
        timescale = self.timescale_epochs * steps_per_epoch
        check_rsqrt_cooldown(warmup, cooldown, total)
        return lambda it: rsqrt_cooldown(it, warmup, cooldown, timescale, total)


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


class NonFiniteLoss(ScalrError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


StepLoss = Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]  # (sum of per-point losses, number of points)
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch", "rng")


class CpuSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) whose training statistics are summed over all ranks (gloo/CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
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
            sync = CpuSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            sync.load_state_dict(child.state_dict())
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias  # the very parameters the optimiser holds
            setattr(module, name, sync)
        else:
            cpu_sync_batchnorm(child)
    return module


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer into RUN/tensorboard, or None with a one-line note when the optional
    tensorboard package is absent (`pip install 'scalr[tb]'`)."""
    try:  # tensorboard is an optional extra: imported only where events are written
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except ImportError:
        log.info(
            "tensorboard is not installed: metrics go to metrics.jsonl only (pip install 'scalr[tb]' adds "
            "TensorBoard event files)"
        )
        return None
    return SummaryWriter(str(RunFolder(run_dir).tensorboard))


@dataclass
class Position:
    """Where training stands: steps done, and the epoch and batch the next step takes."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


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
    accept_changes: bool = False,
    files: dict[str, str] | None = None,
) -> dict:
    """Train `model` and return a summary. `make_sampler(rank, world)` gives an EpochSampler.
    Resuming compares what is trained with the run's record: a difference is refused unless
    `accept_changes` (then recorded in the run). `files`: more text files for the run folder."""
    run, launch = RunFolder(run_dir), Launch.from_env()
    with run.training() if launch.rank == 0 else contextlib.nullcontext():  # one process per run
        for name, text in (files or {}).items() if launch.rank == 0 else ():
            write_atomically(run.path / name, lambda tmp, text=text: tmp.write_text(text))
        trainer = Trainer(model, param_groups, make_sampler, optim, train, run, record, launch)
        with torch.random.fork_rng(devices=trainer.rng_devices):  # the run's own random state
            trainer.start(resume, accept_changes)
            trainer.train(dataset, collate, step_loss)
    return trainer.summary()


# What may differ when a run resumes: where things are, how fast, how often it logs, when it stops.
RESUMABLE_CHANGES = (
    "out",
    "root",
    "stores",
    "train.num_workers",
    "train.device",
    "train.checkpoint_every",
    "train.log_every",
    "train.max_steps",
)


def what_is_trained(record: dict) -> dict:
    """A run record's settings that decide what is trained, as dotted keys (stores by content:
    teacher and data, not path)."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    keys = {k: v for k, v in flat(record.get("config", {})).items() if not k.startswith(RESUMABLE_CHANGES)}
    stores = sorted(store_identity(s) for s in record.get("stores", []))
    return {**keys, "stage": record.get("stage"), **({"stores": stores} if stores else {})}


def store_identity(store: dict) -> str:
    """A pretraining store as a run record names it: its teacher (and weights) and its data."""
    teacher, data = store.get("teacher", {}), store.get("dataset", {})
    weights = str(teacher.get("weights", ""))
    weights = weights if weights.startswith("random-init") else weights[:12]  # a seed, or a SHA-256
    scans = str(data.get("scan_ids_sha256"))[:12]
    return f"{teacher.get('name')} ({weights}) on {data.get('name')}/{data.get('split')} ({scans})"


def changed_settings(old: dict, new: dict) -> dict[str, list]:
    """key -> [old, new] for every setting that decides what is trained and differs."""
    a, b = what_is_trained(old), what_is_trained(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


class Trainer:
    """The state of one training run and the steps that move it."""

    def __init__(
        self,
        model,
        param_groups,
        make_sampler,
        optim: OptimConfig,
        train: TrainConfig,
        run: RunFolder,
        record: dict,
        launch: Launch,
    ):
        self.launch = launch.join()
        self.device = pick_device(train.device, self.launch)
        self.model, self.optim, self.train_cfg, self.run, self.record = model.to(self.device), optim, train, run, record
        self.sampler = make_sampler(self.launch.rank, self.launch.world)
        self.steps_per_epoch = len(self.sampler)
        total = self.steps_per_epoch * train.epochs
        self.last_step = total if train.max_steps is None else min(total, train.max_steps)
        self.optimizer = torch.optim.AdamW(
            param_groups, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas
        )
        # one factor for every parameter group (each keeps its own base lr), as the released code
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, optim.lr_factor(self.steps_per_epoch, train.epochs)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        self.position = Position()
        self.saved_step: int | None = None  # the step last written to the run's checkpoint
        self.rng_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []

    # ---- start: fresh or resumed ---------------------------------------------------------
    def start(self, resume: bool, accept_changes: bool) -> None:
        """Resume from the run's checkpoint when asked and present, else seed a fresh run."""
        if resume and self.run.checkpoint.is_file():
            self._resume(self.run.checkpoint, accept_changes)
        else:
            torch.manual_seed(self.train_cfg.seed)  # noqa: TID251 - inside fit's fork of the generator
        if self.launch.rank == 0:
            write_json(self.run.record, self.record)
            if self.position.step == 0:
                self.run.metrics.unlink(missing_ok=True)  # a fresh run starts a fresh log

    def _resume(self, path: Path, accept_changes: bool) -> None:
        state = load_checkpoint(path)
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise CheckpointError(
                path, f"cannot resume: no {missing} (not a training checkpoint; use --fresh or another --out)"
            )
        if problem := inputs_problem(state["config"]):
            raise CheckpointError(path, f"cannot resume: {problem} (use --fresh or another --out)")
        self._record_changes(path, state["config"], state["step"], accept_changes)
        what = "this run's model (use --fresh or another --out to start a different model)"
        load_weights(path, self.model, state["model"], what)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = Position(state["step"], state["epoch"], state["batch_in_epoch"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.saved_step = self.position.step
        log.info("%s: resuming at step %d (epoch %d, batch %d)", path, *vars(self.position).values())

    def _record_changes(self, path: Path, old: dict, step: int, accept: bool) -> None:
        """Refuse to resume with settings that change what is trained, unless accepted: then the
        changes join the run's record (config.json and every later checkpoint)."""
        changes = changed_settings(old, self.record)
        if changes and not accept:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:6])
            raise ConfigError(
                f"{self.run.path}: this run was trained with other settings ({shown}); resume it with its own "
                "settings, start a new run (another --out, or --fresh here), or pass --continue-with-changes"
            )
        history = old.get("changes", []) + ([{"step": step, "changes": changes}] if changes else [])
        if history:
            self.record["changes"] = history
            log.warning("%s: resuming at step %d with changed settings: %s", path, step, ", ".join(changes))

    def save(self) -> None:
        p = self.position
        self.saved_step = p.step
        if self.launch.rank != 0:
            return
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        save_checkpoint(
            self.run.checkpoint,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": p.step,
                "epoch": p.epoch,
                "batch_in_epoch": p.batch_in_epoch,
                "rng": rng,
                "config": self.record,
            },
        )

    # ---- the loop ------------------------------------------------------------------------
    def train(self, dataset, collate: Callable, step_loss: StepLoss) -> None:
        cfg, p = self.train_cfg, self.position
        net = self._parallel()
        net.train()
        writer = tensorboard_writer(self.run.path) if self.launch.rank == 0 else None
        log_window = MetricsWindow(self.run.metrics, writer, self.launch.rank == 0)
        bar = tqdm(
            total=self.last_step,
            initial=p.step,
            desc="train",
            unit="step",
            disable=self.launch.rank != 0,
            dynamic_ncols=True,
        )
        # One loader for the whole run: its workers persist across epochs, and the batch sampler,
        # iterated in this process, is moved to each epoch (and resume position) before iterating.
        loader = Loader(
            dataset,
            collate,
            batch_sampler=self.sampler,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # keeps loader seeding off the global generator
            prefetch_factor=4 if cfg.num_workers else None,
            persistent_workers=cfg.num_workers > 0,
        )
        try:
            while p.step < self.last_step:
                self.sampler.start(p.epoch, p.batch_in_epoch)
                if p.batch_in_epoch >= self.steps_per_epoch:  # e.g. resumed with larger batches: the epoch is done
                    p.epoch, p.batch_in_epoch = p.epoch + 1, 0
                    continue
                for batch in loader:
                    loss_sum, count = self.step(net, to_device(batch, self.device), step_loss)
                    log_window.add(loss_sum, count, cfg.batch_size)
                    if p.step % cfg.log_every == 0 or p.step == self.last_step:
                        entry = log_window.flush(p, self.scheduler.get_last_lr()[0], peak_memory_mib(self.device))
                        bar.set_postfix(loss=f"{entry['loss']:.4f}", samples_s=f"{entry['samples_per_s']:.1f}")
                    bar.update(1)
                    if p.batch_in_epoch == self.steps_per_epoch:
                        p.epoch, p.batch_in_epoch = p.epoch + 1, 0
                    if p.step % cfg.checkpoint_every == 0 or p.step == self.last_step:
                        self.save()
                    if p.step >= self.last_step:
                        break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if self.saved_step != p.step:
            self.save()  # e.g. max_steps=0: the untrained model, a baseline to probe
        if self.launch.rank == 0:
            plot_loss(self.run.metrics, self.run.loss_plot)

    def _parallel(self) -> nn.Module:
        """The model as trained: under several ranks, batch statistics over the global batch
        (PyTorch's SyncBatchNorm is GPU-only) and DDP."""
        if self.launch.world == 1:
            return self.model
        cuda = self.device.type == "cuda"
        net = nn.SyncBatchNorm.convert_sync_batchnorm(self.model) if cuda else cpu_sync_batchnorm(self.model)
        return nn.parallel.DistributedDataParallel(net, device_ids=[self.device.index] if cuda else None)

    def step(self, net: nn.Module, batch: dict, step_loss: StepLoss) -> tuple[float, int]:
        """One optimisation step; returns (sum of the per-point losses, points) over all ranks."""
        p, world = self.position, self.launch.world
        with autocast(self.device, self.train_cfg.precision):
            loss_sum, count = step_loss(net, batch)
        # Normalise by the GLOBAL number of points (DDP averages gradients over ranks), so
        # any number of ranks computes the same update as one process.
        global_count = self.launch.all_sum(count.detach().float().clone())
        loss = loss_sum * world / global_count.clamp(min=1)
        if self.launch.all_sum(torch.isfinite(loss.detach()).float()).item() < world:
            last = self.run.checkpoint if self.run.checkpoint.is_file() else "none yet"
            raise NonFiniteLoss(
                f"non-finite loss at step {p.step + 1} (epoch {p.epoch}); stopped. The last good checkpoint is {last}; "
                "lower the learning rate or use --set train.precision=fp32"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        p.step += 1
        p.batch_in_epoch += 1
        return self.launch.all_sum(loss_sum.detach().float().clone()).item(), int(global_count.item())

    def summary(self) -> dict:
        p = self.position
        return {
            "steps": p.step,
            "epochs": p.epoch,
            "checkpoint": str(self.run.checkpoint),
            "metrics": str(self.run.metrics),
        }


class MetricsWindow:
    """Losses and throughput since the last log line; each flush appends one line to
    metrics.jsonl (rank 0) and to TensorBoard when there is a writer."""

    def __init__(self, path: Path, writer, write: bool):
        self.path, self.writer, self.write = path, writer, write
        self._reset()

    def _reset(self) -> None:
        self.loss, self.points, self.samples, self.t0 = 0.0, 0, 0, time.perf_counter()

    def add(self, loss_sum: float, points: int, samples: int) -> None:
        self.loss += loss_sum
        self.points += points
        self.samples += samples

    def flush(self, position: Position, lr: float, peak_mib: float) -> dict:
        dt = time.perf_counter() - self.t0
        entry = {
            "step": position.step,
            "epoch": position.epoch,
            "loss": self.loss / max(self.points, 1),
            "lr": lr,
            "samples_per_s": self.samples / dt,
            "time": time.time(),
        }
        if self.write:
            with disk_errors(self.path), open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            for key in ("loss", "lr", "samples_per_s"):
                self.writer.add_scalar(f"train/{key}", entry[key], position.step)
            self.writer.add_scalar("train/peak_memory_mib", peak_mib, position.step)
        self._reset()
        return entry


def plot_loss(metrics_file: Path, out: Path) -> Path | None:
    """The run's loss and learning rate per step, as a PNG (matplotlib's Figure: no pyplot, no backend)."""
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
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
    write_atomically(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return out
