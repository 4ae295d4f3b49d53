"""WaffleIron (Puy et al., ICCV 2023), the ScaLR student: an embedding, L layers that alternate a
spatial mix on one of three 2D planes with a channel mix, and a head.

Points are packed: a batch is one (N, C) tensor over all its samples (no padding), with the
sample of each point in `batch`. The per-cell mean of a spatial mix is a scatter-add of the
points' features weighted by their cell's precomputed inverse count.
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


@dataclass
class Plane:
    """Where each point falls on one plane, for a whole batch."""

    index: torch.Tensor  # (N,) flat cell index in [0, B * Sa * Sb)
    inv_count: torch.Tensor  # (N, 1) 1 / number of points in the point's cell
    shape: tuple[int, int, int]  # (B, Sa, Sb)


def planes_of(cells: torch.Tensor, batch: torch.Tensor, batch_size: int, grid_shape) -> list[Plane]:
    planes = []
    for a, b in PLANES:
        sa, sb = grid_shape[a], grid_shape[b]
        index = (batch * sa + cells[:, a].long()) * sb + cells[:, b].long()
        counts = torch.bincount(index, minlength=batch_size * sa * sb)
        planes.append(Plane(index, (1.0 / counts[index].float())[:, None], (batch_size, sa, sb)))
    return planes


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(channels)
    if kind == "layer":
        return nn.LayerNorm(channels)
    raise ConfigError(f"unknown norm {kind!r}: batch or layer")


def drop_path(x: torch.Tensor, rate: float, batch: torch.Tensor, batch_size: int, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (all points of a sample share the draw)."""
    if rate == 0.0 or not training:
        return x
    keep = (torch.rand(batch_size, device=x.device) >= rate).to(x.dtype) / (1 - rate)
    return x * keep[batch][:, None]


class LayerScale(nn.Module):
    """Per-channel scale, initialised U(-1, 1) as the released code's depthwise 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels).uniform_(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class ChannelMix(nn.Module):
    def __init__(self, c: int, norm: str, drop: float):
        super().__init__()
        self.norm, self.drop = make_norm(norm, c), drop
        self.mlp = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, c))
        self.scale = LayerScale(c)

    def forward(self, x, batch, batch_size):
        return x + drop_path(self.scale(self.mlp(self.norm(x))), self.drop, batch, batch_size, self.training)


class SpatialMix(nn.Module):
    def __init__(self, c: int, norm: str, drop: float):
        super().__init__()
        self.norm, self.drop = make_norm(norm, c), drop
        self.ffn = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1, groups=c)
        )
        self.scale = LayerScale(c)

    def forward(self, x, plane: Plane, batch, batch_size):
        b, sa, sb = plane.shape
        y = self.norm(x)
        grid = y.new_zeros(b * sa * sb, y.shape[1]).index_add_(0, plane.index, y * plane.inv_count.to(y.dtype))
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
        self.embedding = Embedding(cfg.in_channels, cfg.width)
        self.spatial = nn.ModuleList(SpatialMix(cfg.width, cfg.norm, cfg.drop_path) for _ in range(cfg.depth))
        self.channel = nn.ModuleList(ChannelMix(cfg.width, cfg.norm, cfg.drop_path) for _ in range(cfg.depth))

    def forward(self, batch: dict) -> torch.Tensor:
        """(N, width) point features of a packed batch (see `stages.student.samples.collate`)."""
        size = batch["batch_size"]
        planes = planes_of(batch["cells"], batch["batch"], size, self.cfg.grid_shape)
        x = self.embedding(batch["feats"], batch["neighbours"])
        for d, (spatial, channel) in enumerate(zip(self.spatial, self.channel)):
            layer = _Layer(spatial, channel, planes[d % 3], batch["batch"], size)
            x = checkpoint(layer, x, use_reentrant=False) if self.cfg.checkpointing and self.training else layer(x)
        return x


class _Layer:
    """One layer bound to its plane, so it can be checkpointed as a function of x alone."""

    def __init__(self, spatial, channel, plane, batch, size):
        self.spatial, self.channel, self.plane, self.batch, self.size = spatial, channel, plane, batch, size

    def __call__(self, x):
        return self.channel(self.spatial(x, self.plane, self.batch, self.size), self.batch, self.size)


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
