"""A training run's folder, the one place its layout is spelled, and who may write it:

RUN/config.json              the run record: stage, resolved config, data, what it started from
RUN/metrics.jsonl            one line per logged step
RUN/checkpoints/last.pt      the last checkpoint (model, optimiser, schedule, RNG, the record)
RUN/loss.png                 the loss curve
RUN/tensorboard/             TensorBoard events (with the optional tensorboard package)
RUN/eval-DATASET-SPLIT.json  each evaluation of the run's model
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PathError
from storage.atomic import disk_errors
from storage.locks import holder, try_lock

RUN_ENTRIES = ("config.json", "metrics.jsonl", "checkpoints", "loss.png", "tensorboard", "frames.txt", ".lock")


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunFolder:
        """The run a checkpoint file belongs to (RUN/checkpoints/last.pt -> RUN)."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def record(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def evaluation(self, dataset: str, split: str) -> Path:
        return self.path / f"eval-{dataset}-{split}.json"

    def is_run(self) -> bool:
        """Whether the folder holds a scalr run record (config.json naming its stage)."""
        try:
            record = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and "stage" in record

    def foreign_entries(self) -> list[str]:
        """What the folder holds that a run does not write (runs nested in it are the run's; a
        config.json is a run's when it is a scalr run record)."""
        if not self.path.is_dir():
            return []
        return sorted(
            e.name
            for e in self.path.iterdir()
            if not (e.name in RUN_ENTRIES and (e.name != "config.json" or self.is_run()))
            and not (e.name.startswith("eval-") and e.name.endswith(".json"))
            and not (e.is_dir() and RunFolder(e).is_run())
        )

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Hold the run for one training process: refuse a feature store, a folder holding other
        files, and a run another process is training."""
        if (self.path / "zarr.json").exists():
            raise PathError(self.path, "is a feature store: a run is never written into a store; use another --out")
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise PathError(self.path, f"holds files that are not a scalr run's ({shown}); use another --out")
        with disk_errors(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
            lock = try_lock(self.path / ".lock")
        if lock is None:
            who = holder(self.path / ".lock")
            raise PathError(self.path, f"is being trained by {who}; wait for it to finish or use another --out")
        with lock:
            yield
