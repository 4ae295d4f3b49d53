"""Downstream training: linear probing, finetuning, and training from scratch on labelled scans.

Data flow: a dataset reader (labels) -> labelled samples (voxelise, crop, augment, student inputs)
-> the pretrained backbone (frozen in eval mode for probing; layer-wise learning-rate decay for
finetuning) + a new BatchNorm1d + linear head -> cross-entropy + Lovasz-softmax -> the same
training loop as pretraining (stages/train.py): checkpoints, exact resume, torchrun, autocast.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import __version__
from pipeline.config import to_dict
from pipeline.datasets import READERS, LidarDataset, open_dataset
from pipeline.errors import DatasetError
from pipeline.transforms import Augment, Grid
from stages.student.checkpoints import read_student_checkpoint
from stages.student.losses import segmentation_loss
from stages.student.samples import EpochSampler, SampleConfig, collate, student_inputs
from stages.student.train import OptimConfig, TrainConfig, fit
from stages.student.waffleiron import STUDENTS, WaffleIron, WaffleIronConfig, inputs_problem
from storage.checkpoint import CheckpointError, load_weights

log = logging.getLogger(__name__)

# The paper's recipes (RECIPE.md); `SegmentConfig.for_mode` starts from these and the released
# schedule of the dataset and label fraction (`released_schedule`).
MODES = {
    "probe": dict(lr=1e-3, weight_decay=3e-3, drop_path=0.0),
    "finetune": dict(lr=2e-3, weight_decay=0.0, drop_path=0.2),
    "scratch": dict(lr=2e-3, weight_decay=0.0, drop_path=0.2),
}


def released_schedule(mode: str, dataset: str | None, fraction: float) -> dict:
    """Epochs, warm-up epochs and final lr of the released downstream configs
    (configs/downstream/*/WI_768_*.yaml): probing 20 epochs (PandaSet 50), 2 warm-up, cosine to
    1e-5; finetuning (and training from scratch) to lr 0: 100% labels 25 epochs, 2 warm-up
    (SemanticKITTI 10, 1), 1% and 10% labels 45 epochs, 4 warm-up."""
    if mode == "probe":
        return {"epochs": 50 if dataset in ("pandar64", "pandargt") else 20, "warmup_epochs": 2.0, "min_lr": 1e-5}
    if fraction < 1.0:
        return {"epochs": 45, "warmup_epochs": 4.0, "min_lr": 0.0}
    if dataset == "semantickitti":
        return {"epochs": 10, "warmup_epochs": 1.0, "min_lr": 0.0}
    return {"epochs": 25, "warmup_epochs": 2.0, "min_lr": 0.0}


@dataclass(frozen=True)
class SegmentConfig:
    dataset: str
    root: Path
    out: Path
    mode: str = "probe"  # probe (frozen backbone), finetune, scratch (supervised baseline)
    checkpoint: Path | None = None  # a pretraining (or segmentation) checkpoint; not for scratch
    split: str = "train"
    student: str = "WI-48-256"  # scratch only: the preset to train
    labels_fraction: float = 1.0  # 1.0, 0.1 or 0.01: every (1/fraction)-th scan of the sorted list
    frames_file: Path | None = None  # the labelled scans instead: a text list of scan ids or a released .npy list
    layer_decay: float | None = None  # finetune: None = 0.99 at 100% labels, 0.95 below
    drop_path: float | None = None  # None = the mode's (0.2 for finetune/scratch)
    warmup_epochs: float = 2.0
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(max_points=20000))  # `for_mode`: the dataset's (downstream_sample)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def for_mode(cls, mode: str, **kw) -> "SegmentConfig":
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: {', '.join(MODES)}")
        m = MODES[mode]
        sample = downstream_sample(kw["dataset"], mode) if "dataset" in kw and "sample" not in kw else kw.pop("sample", SampleConfig(max_points=20000))
        s = released_schedule(mode, kw.get("dataset"), kw.get("labels_fraction", 1.0))
        return cls(mode=mode, optim=OptimConfig(lr=m["lr"], weight_decay=m["weight_decay"], min_lr=s["min_lr"]), train=TrainConfig(epochs=s["epochs"]),
                   warmup_epochs=kw.pop("warmup_epochs", s["warmup_epochs"]), sample=sample, **kw)  # fmt: skip


# The released finetuning configs' exceptions to a dataset's field of view (configs/downstream).
FINETUNE_FIELD_OF_VIEW = {"pandargt": ((-96.0, -96.0, -8.0), (96.0, 96.0, 8.0))}  # 384 x 384 cells


def downstream_sample(dataset: str, mode: str = "probe") -> SampleConfig:
    """Training samples of the released downstream code: 20,000 points nearest a random point,
    the dataset's field of view in 0.5 m cells (PandaSet 512 x 512 over +-128 m; PandarGT
    finetuning 384 x 384 over +-96 m)."""
    fov = READERS[dataset].meta.field_of_view if dataset in READERS else (Grid().lo, Grid().hi)
    if mode in ("finetune", "scratch"):
        fov = FINETUNE_FIELD_OF_VIEW.get(dataset, fov)
    return SampleConfig(max_points=20000, grid=Grid(*fov))


class SegmentationModel(nn.Module):
    """Backbone + BatchNorm1d + linear classifier. With `frozen`, the backbone stays in eval mode
    and gets no gradient, whatever the training loop asks."""

    def __init__(self, backbone: WaffleIron, num_classes: int, frozen: bool):
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        width = backbone.cfg.width
        # As the released ScaLR code: default BatchNorm (weight 1, bias 0), the linear layer zeroed
        # ("both zero-initialised" read literally would leave the head without any gradient).
        self.head = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, num_classes))
        nn.init.zeros_(self.head[1].weight)
        nn.init.zeros_(self.head[1].bias)
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, batch: dict) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                features = self.backbone(batch)
        else:
            features = self.backbone(batch)
        return self.head(features)


def frames_from_file(ds: LidarDataset, path: Path) -> list[int]:
    """Indices of the scans a frame list names: a text file (one scan id per line; # comments)
    or a released ScaLR .npy list (rows of strings: lidar file, label file, token; each row is
    matched by any of its strings that is a scan id or a lidar file name). Every entry must match."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "frame list is missing")
    if path.suffix == ".npy":
        try:  # the released lists are object arrays: numpy needs pickle to read them
            rows = [[str(v) for v in np.atleast_1d(row)] for row in np.load(path, allow_pickle=True)]
        except (ValueError, OSError, EOFError) as err:
            raise DatasetError(path, f"not a readable .npy frame list ({err})") from None
    else:
        rows = [[line.strip()] for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    position = {scan_id: i for i, scan_id in enumerate(ds.scan_ids)}
    aliases = ds.scan_aliases()
    indices = []
    for n, row in enumerate(rows, 1):
        found = next((position[s] for s in row if s in position), None)
        if found is None:
            found = next((position[aliases[Path(s).name]] for s in row if Path(s).name in aliases), None)
        if found is None:
            raise DatasetError(path, f"entry {n} ({' '.join(row)[:120]}) names no scan of {ds.meta.name} {ds.split}")
        indices.append(found)
    if not indices:
        raise DatasetError(path, "frame list is empty")
    return sorted(set(indices))


def label_subset(ids: list[str], fraction: float) -> list[int]:
    """Indices of every (1/fraction)-th scan of the sorted id list (SemanticKITTI's 1% rule,
    applied to every dataset)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"labels fraction {fraction} is not in (0, 1]")
    step = int(round(1 / fraction))
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return sorted(order[::step])


class LabelledScans(torch.utils.data.Dataset):
    """Labelled scans of a reader; items keyed by (position, seed) like the distillation data."""

    def __init__(self, ds: LidarDataset, indices: list[int], cfg: SampleConfig, train: bool):
        self.ds, self.indices, self.cfg, self.train = ds, indices, cfg, train

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        position, seed = key
        scan = self.ds[self.indices[position]]
        if scan.labels is None:
            raise DatasetError(self.ds.root, f"scan {scan.scan_id} has no labels; {self.ds.meta.name} {self.ds.split} cannot train a segmenter")
        rng = np.random.default_rng(seed)
        keep, inputs = student_inputs(scan.points, self.ds.meta.intensity_norm, self.cfg, rng, self.train)
        return {**inputs, "labels": scan.labels[keep].astype(np.int64), "scan_id": scan.scan_id, "keep": keep}


def layer_decay_groups(model: SegmentationModel, base_lr: float, decay: float) -> list[dict]:
    """Parameter groups with lr = base * decay^(L+1 - layer id): the embedding is layer 0,
    backbone layer k is k+1, the head L+1."""
    depth = model.backbone.cfg.depth
    groups: dict[int, list] = {}
    for name, p in model.named_parameters():
        if name.startswith("backbone.embedding."):
            layer = 0
        elif name.startswith(("backbone.spatial.", "backbone.channel.")):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = depth + 1
        groups.setdefault(layer, []).append(p)
    return [{"params": ps, "lr": base_lr * decay ** (depth + 1 - layer), "layer": layer} for layer, ps in sorted(groups.items())]


def recorded_student(checkpoint: Path, record: dict, **overrides) -> WaffleIronConfig:
    """The student configuration a run record holds; CheckpointError if there is none usable."""
    model_cfg = record.get("config", {}).get("model") if isinstance(record.get("config"), dict) else None
    if not isinstance(model_cfg, dict):
        raise CheckpointError(checkpoint, "no student configuration recorded; not a scalr checkpoint")
    if problem := inputs_problem(record):
        raise CheckpointError(checkpoint, problem)
    try:
        return WaffleIronConfig(**{**model_cfg, "grid_shape": tuple(model_cfg["grid_shape"]), **overrides})
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(checkpoint, f"recorded student configuration is unusable ({err})") from None


def load_backbone(checkpoint: Path, drop_path: float) -> tuple[WaffleIron, dict]:
    """The backbone of a pretraining or segmentation checkpoint (scalr's or the released code's),
    loaded strictly, and its run record. `regrid` it for another field of view."""
    state = read_student_checkpoint(checkpoint)
    cfg = recorded_student(checkpoint, state["config"], drop_path=drop_path)
    backbone = WaffleIron(cfg)
    weights = {k[len("backbone.") :]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    load_weights(checkpoint, backbone, weights, f"the recorded student (depth {cfg.depth}, width {cfg.width})")
    return backbone, state["config"]


def train_segmentation(cfg: SegmentConfig, resume: bool = True) -> dict:
    mode = MODES[cfg.mode]
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split)
    if len(ds) == 0:
        raise DatasetError(cfg.root, f"split {cfg.split} is empty")
    indices = frames_from_file(ds, cfg.frames_file) if cfg.frames_file else label_subset(ds.scan_ids, cfg.labels_fraction)
    drop = mode["drop_path"] if cfg.drop_path is None else cfg.drop_path
    if cfg.mode == "scratch":
        if cfg.checkpoint is not None:
            raise ValueError("training from scratch takes no --checkpoint")
        torch.manual_seed(cfg.train.seed)
        backbone = WaffleIron(dataclasses.replace(STUDENTS[cfg.student], drop_path=drop, grid_shape=cfg.sample.grid.shape))
    else:
        if cfg.checkpoint is None:
            raise ValueError(f"{cfg.mode} needs --checkpoint (a pretraining run's checkpoints/last.pt)")
        backbone, _ = load_backbone(cfg.checkpoint, drop)
        backbone.regrid(cfg.sample.grid.shape)  # WaffleIron's weights do not depend on the grid
    torch.manual_seed(cfg.train.seed)
    model = SegmentationModel(backbone, ds.meta.num_classes, frozen=cfg.mode == "probe")
    if cfg.mode == "finetune":
        decay = cfg.layer_decay if cfg.layer_decay is not None else (0.99 if cfg.labels_fraction == 1.0 else 0.95)
        groups = layer_decay_groups(model, cfg.optim.lr, decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    data = LabelledScans(ds, indices, dataclasses.replace(cfg.sample, augment=Augment(scale=(0.9, 1.1), separate_features=True)), train=True)
    steps_per_epoch = len(indices) // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise DatasetError(cfg.root, f"{len(indices)} labelled scans cannot fill one batch of {cfg.train.batch_size}")
    optim = dataclasses.replace(cfg.optim, warmup_iters=max(1, int(cfg.warmup_epochs * steps_per_epoch)))
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "frames.txt").write_text("\n".join(ds.scan_ids[i] for i in indices) + "\n")
    record = {
        "stage": cfg.mode, "scalr_version": __version__, "config": {**to_dict(cfg), "model": to_dict(backbone.cfg)},
        "dataset": {"name": ds.meta.name, "split": cfg.split, "classes": list(ds.meta.class_names), "scans": len(indices)},
        "num_classes": ds.meta.num_classes, "pretrained": str(cfg.checkpoint) if cfg.checkpoint else None,
    }  # fmt: skip
    log.info("%s on %s %s: %d labelled scans (%.0f%%), %s backbone %dx%d", cfg.mode, ds.meta.name, cfg.split, len(indices), 100 * cfg.labels_fraction, "frozen" if model.frozen else "trainable", backbone.cfg.depth, backbone.cfg.width)

    def step_loss(net, batch):
        loss = segmentation_loss(net(batch), batch["labels"])
        count = torch.tensor(float(len(batch["labels"])), device=loss.device)
        return loss * count, count

    return fit(
        model, groups, data, lambda rank, world: EpochSampler([len(indices)], cfg.train.batch_size, cfg.train.seed, rank, world),
        collate, step_loss, optim, cfg.train, cfg.out, record, resume,
    )  # fmt: skip


def load_segmenter(checkpoint: Path) -> tuple[SegmentationModel, dict]:
    """A trained segmentation model (eval mode) and its run record. A released finetuned
    checkpoint's record has no dataset: the caller knows it."""
    state = read_student_checkpoint(checkpoint)
    record = state["config"]
    if record.get("stage") not in (*MODES, "released-segmenter"):
        raise CheckpointError(checkpoint, f"a {record.get('stage', 'unknown')} checkpoint, not a segmentation model (run probe, finetune or scratch first)")
    classes = record.get("num_classes")
    released = record["stage"] == "released-segmenter"
    if not isinstance(classes, int) or classes <= 0 or not (released or isinstance(record.get("dataset"), dict)):
        raise CheckpointError(checkpoint, "run record lacks the dataset and number of classes")
    cfg = recorded_student(checkpoint, record)
    model = SegmentationModel(WaffleIron(cfg), classes, frozen=False)
    load_weights(checkpoint, model, state["model"], f"a {record['stage']} model (depth {cfg.depth}, width {cfg.width}, {classes} classes)")
    return model.eval(), record
