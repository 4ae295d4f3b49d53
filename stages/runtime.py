"""How a stage runs on this machine: the launcher's ranks, the device, autocast precision, peak
memory, batches moved to the device, seeded initialisation, and data loaders whose workers' user
errors reach the main process as themselves.

One owner for each of these decisions; every stage imports this module and it imports nothing of
stages/. The rank and world size come only from the launcher's environment (torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, ScalrError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype of each choice


@dataclass(frozen=True)
class Launch:
    """This process's place among the launcher's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} is not in [0, {self.world})")

    @classmethod
    def from_env(cls, rank: int | None = None, world: int | None = None) -> Launch:
        """The launcher's RANK, WORLD_SIZE and LOCAL_RANK (1 process without a launcher); `rank` and
        `world` override the first two."""
        env = os.environ
        rank = int(env.get("RANK", 0)) if rank is None else rank
        world = int(env.get("WORLD_SIZE", 1)) if world is None else world
        return cls(rank, world, int(env.get("LOCAL_RANK", 0)))

    def join(self) -> Launch:
        """Join the process group of a multi-process launch (NCCL on GPUs, gloo on CPUs)."""
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return self

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value)
        return value


def pick_device(name: str, launch: Launch | None = None) -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK) when there is one, else the CPU; or the named device."""
    if name == "auto":
        local_rank = (launch or Launch.from_env()).local_rank
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast at `precision` (fp32, bf16, fp16) on the device's type; fp32 runs as it is."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def peak_memory_mib(device: torch.device) -> float:
    """The CUDA allocator's peak on a GPU, the process's peak resident memory on the CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (asynchronously from pinned memory); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings of GPU work need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's global generator seeded for the block and restored after it: module constructors
    draw their initial weights from it and take no generator of their own, so this is how a model
    is built reproducibly without changing the caller's random state."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # noqa: TID251 - scoped by fork_rng: the caller's state comes back
        yield


class Loader:
    """A torch DataLoader whose samples may raise scalr's user errors: in a worker process such an
    error is carried back as an object and raised here as itself (torch would re-raise it as
    text inside a RuntimeError). Iterating it iterates the DataLoader; `loader` is that DataLoader."""

    def __init__(self, dataset: torch.utils.data.Dataset, collate_fn: Callable, **kwargs):
        self.loader = torch.utils.data.DataLoader(
            _CarryErrors(dataset), collate_fn=_CollateCarried(collate_fn), **kwargs
        )

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            if isinstance(batch, _Carried):
                raise batch.error
            yield batch


@dataclass
class _Carried:
    error: ScalrError


class _CarryErrors(torch.utils.data.Dataset):
    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except ScalrError as err:
            return _Carried(err)


@dataclass
class _CollateCarried:
    collate: Callable

    def __call__(self, samples: list):
        return next((s for s in samples if isinstance(s, _Carried)), None) or self.collate(samples)
