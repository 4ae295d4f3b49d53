"""WaffleIron (Puy et al., ICCV 2023), the ScaLR student: an embedding, L layers that alternate a
spatial mix on one of three 2D planes with a channel mix, and a head.

Points are packed: a batch is one (N, C) tensor over all its samples (no padding), with the
sample of each point in `batch`. The per-cell mean of a spatial mix is computed as the released
code of the recipe computes it (`cell_mean`): a scatter-add of the points' features weighted by
1 / (n + 1e-6) (WaffleIron 0.3, under the CVPR code), or a scatter-add divided by n (ScaLR+).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.errors import ConfigError

PLANES = ((0, 1), (0, 2), (1, 2))  # (x, y), (x, z), (y, z): layer d mixes on PLANES[d % 3]

# What the student's inputs are, recorded in every checkpoint. 2: the released ScaLR code's (the
# k nearest neighbours besides the point itself, 3-D radius, intensity standardised with each
# dataset's mean and std; biases of the embedding where the released model has them). 1 (before
# scalr 0.2, unrecorded): 16 neighbours including the point, 2-D radius, intensity / max.
STUDENT_INPUTS = 2


@dataclass(frozen=True)
class WaffleIronConfig:
    depth: int = 48
    width: int = 256
    in_channels: int = 5  # intensity, x, y, z, radius
    neighbours: int = 16
    norm: str = "batch"  # "batch", or "layer" (used at width 768: BatchNorm NaNs under mixed precision)
    activation: str = "relu"  # of the channel-mix MLP and the spatial-mix FFN: "relu", or "gelu" (ScaLR+)
    cell_mean: str = "weights"  # a cell's mean: "weights" (x / (n + 1e-6), summed: CVPR) or "divide" (sum / n: ScaLR+)
    drop_path: float = 0.0  # same rate on every layer
    grid_shape: tuple[int, int, int] = (256, 256, 32)  # cells along x, y, z (0.5 m over 128 x 128 x 16 m)
    checkpointing: bool = False  # recompute each layer in the backward pass (wide students)
    inputs: int = STUDENT_INPUTS  # see STUDENT_INPUTS; a checkpoint with other inputs is refused


STUDENTS = {
    "WI-48-96": WaffleIronConfig(width=96),
    "WI-48-256": WaffleIronConfig(width=256),
    "WI-48-384": WaffleIronConfig(width=384),
    "WI-48-768": WaffleIronConfig(width=768, norm="layer"),
    "WI-12-64": WaffleIronConfig(depth=12, width=64),  # small enough for CPU demos and tests
}


def param_count_closed_form(width: int, depth: int, in_channels: int = 5) -> int:
    """RECIPE.md: (20 + 14C + 3C^2) + L(2C^2 + 28C) for 5 input channels, without head."""
    c = width
    embedding = 4 * in_channels + (2 * in_channels + 4) * c + 3 * c * c
    return embedding + depth * (2 * c * c + 28 * c)


CELL_MEANS = ("weights", "divide")


@dataclass
class Plane:
    """Where each point falls on one plane, for a whole batch, and how its cell's mean is taken."""

    index: torch.Tensor  # (N,) flat cell index in [0, B * Sa * Sb)
    shape: tuple[int, int, int]  # (B, Sa, Sb)
    weight: torch.Tensor | None  # "weights": (N, 1) 1 / (n + 1e-6), n the points in the point's cell
    count: torch.Tensor | None  # "divide": (B * Sa * Sb, 1) points in each cell (1 where none)

    def cell_means(self, y: torch.Tensor) -> torch.Tensor:
        """(B * Sa * Sb, C) mean of the rows of `y` (N, C) in each cell (0 where none)."""
        b, sa, sb = self.shape
        grid = y.new_zeros(b * sa * sb, y.shape[1])
        if self.weight is not None:
            return grid.index_add_(0, self.index, y * self.weight.to(y.dtype))
        return grid.index_add_(0, self.index, y) / self.count.to(y.dtype)


def planes_of(cells: torch.Tensor, batch: torch.Tensor, batch_size: int, grid_shape, cell_mean: str) -> list[Plane]:
    if cell_mean not in CELL_MEANS:
        raise ConfigError(f"unknown cell_mean {cell_mean!r}: {' or '.join(CELL_MEANS)}")
    planes = []
    for a, b in PLANES:
        sa, sb = grid_shape[a], grid_shape[b]
        index = (batch * sa + cells[:, a].long()) * sb + cells[:, b].long()
        counts = torch.bincount(index, minlength=batch_size * sa * sb).float()
        if cell_mean == "weights":
            planes.append(Plane(index, (batch_size, sa, sb), (1.0 / (counts[index] + 1e-6))[:, None], None))
        else:
            planes.append(Plane(index, (batch_size, sa, sb), None, counts.clamp(min=1)[:, None]))
    return planes


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(channels)
    if kind == "layer":
        return nn.LayerNorm(channels)
    raise ConfigError(f"unknown norm {kind!r}: batch or layer")


def make_activation(kind: str) -> nn.Module:
    """ReLU, or GELU (exact, not the tanh approximation) as ScaLR+'s backbone."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "gelu":
        return nn.GELU()
    raise ConfigError(f"unknown activation {kind!r}: relu or gelu")


def drop_path(x: torch.Tensor, rate: float, batch: torch.Tensor, batch_size: int, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (all points of a sample share the draw), computed as the
    released DropPath: mask = floor(keep + U(0, 1)) with keep = 1 - rate, branch / keep * mask."""
    if rate == 0.0 or not training:
        return x
    keep = 1 - rate
    mask = (keep + torch.rand(batch_size, dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask[batch][:, None]


class LayerScale(nn.Module):
    """Per-channel scale, initialised U(-1, 1) as the released code's depthwise 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels).uniform_(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class ChannelMix(nn.Module):
    def __init__(self, c: int, norm: str, drop: float, activation: str = "relu"):
        super().__init__()
        self.norm, self.drop = make_norm(norm, c), drop
        self.mlp = nn.Sequential(nn.Linear(c, c), make_activation(activation), nn.Linear(c, c))
        self.scale = LayerScale(c)

    def forward(self, x, batch, batch_size):
        return x + drop_path(self.scale(self.mlp(self.norm(x))), self.drop, batch, batch_size, self.training)


class SpatialMix(nn.Module):
    def __init__(self, c: int, norm: str, drop: float, activation: str = "relu"):
        super().__init__()
        self.norm, self.drop = make_norm(norm, c), drop
        self.ffn = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=c),
            make_activation(activation),
            nn.Conv2d(c, c, 3, padding=1, groups=c),
        )
        self.scale = LayerScale(c)

    def forward(self, x, plane: Plane, batch, batch_size):
        b, sa, sb = plane.shape
        y = self.norm(x)
        grid = plane.cell_means(y)
        grid = self.ffn(grid.view(b, sa, sb, -1).permute(0, 3, 1, 2))  # channels-last strides, no copy
        y = grid.permute(0, 2, 3, 1).reshape(b * sa * sb, -1)[plane.index]
        return x + drop_path(self.scale(y), self.drop, batch, batch_size, self.training)


class Embedding(nn.Module):
    """Point branch (1x1 conv) + neighbour branch on (neighbour - centre) features of the k
    nearest neighbours (the point itself excluded), max-pooled; both concatenated and mixed.
    Always BatchNorm. Biases where the released model has them: point branch and final mix."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(cin)
        self.point = nn.Linear(cin, c)
        self.neighbour_norm = nn.BatchNorm1d(cin)
        self.neighbour = nn.Sequential(
            nn.Linear(cin, c, bias=False), nn.BatchNorm1d(c), nn.ReLU(inplace=True), nn.Linear(c, c, bias=False)
        )
        self.final = nn.Linear(2 * c, c)

    def forward(self, feats: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        x = self.norm(feats)
        n, k = neighbours.shape
        diff = (x[neighbours] - x[:, None, :]).reshape(n * k, -1)
        h = self.neighbour(self.neighbour_norm(diff)).view(n, k, -1).amax(dim=1)
        return self.final(torch.cat([self.point(x), h], dim=1))


class WaffleIron(nn.Module):
    """Backbone: embedding + `depth` layers of (spatial mix on plane d % 3, channel mix)."""

    def __init__(self, cfg: WaffleIronConfig):
        super().__init__()
        self.cfg = cfg
        c, norm, drop, act = cfg.width, cfg.norm, cfg.drop_path, cfg.activation
        self.embedding = Embedding(cfg.in_channels, c)
        self.spatial = nn.ModuleList(SpatialMix(c, norm, drop, act) for _ in range(cfg.depth))
        self.channel = nn.ModuleList(ChannelMix(c, norm, drop, act) for _ in range(cfg.depth))

    def forward(self, batch: dict) -> torch.Tensor:
        """(N, width) point features of a packed batch (see `stages.student.samples.collate`)."""
        size, samples = batch["batch_size"], batch["batch"]
        planes = planes_of(batch["cells"], samples, size, self.cfg.grid_shape, self.cfg.cell_mean)
        x = self.embedding(batch["feats"], batch["neighbours"])
        recompute = self.cfg.checkpointing and self.training  # each mix recomputed in the backward pass
        for d, (spatial, channel) in enumerate(zip(self.spatial, self.channel)):
            if recompute:
                x = checkpoint(spatial, x, planes[d % 3], samples, size, use_reentrant=False)
                x = checkpoint(channel, x, samples, size, use_reentrant=False)
            else:
                x = channel(spatial(x, planes[d % 3], samples, size), samples, size)
        return x


def make_head(width: int, out: int, kind: str, hidden: int = 2048) -> nn.Module:
    """Distillation head: 1x1 linear (one teacher) or a 2-layer MLP with ReLU (several teachers;
    ScaLR+, as its released segmenter)."""
    if kind == "linear":
        return nn.Linear(width, out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))
    raise ConfigError(f"unknown head {kind!r}: linear or mlp")


class Student(nn.Module):
    """Backbone + head; `features()` gives the backbone's point features."""

    def __init__(self, backbone: WaffleIron, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.backbone(batch))
