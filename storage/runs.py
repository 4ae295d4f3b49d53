"""A training run's folder, the one place its layout is spelled:

RUN/config.json              the run record: stage, resolved config, data, what it started from
RUN/metrics.jsonl            one line per logged step
RUN/checkpoints/last.pt      the last checkpoint (model, optimiser, schedule, RNG, the record)
RUN/loss.png                 the loss curve
RUN/tensorboard/             TensorBoard events (with the optional tensorboard package)
RUN/eval-DATASET-SPLIT.json  each evaluation of the run's model
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
        return self.record.is_file()
