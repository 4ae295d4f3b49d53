"""Frozen ViT teachers over timm: one way to get dense features from any registered teacher.

Every teacher maps a batch of images (B, 3, H, W) in [0, 1] (or uint8) to a token grid
(B, D, H/p, W/p): the output of the LAST block BEFORE the final LayerNorm, prefix tokens (class,
registers) removed. MaskCLIP instead returns CLIP's dense value-path features after ln_post and the
visual projection (`maskclip_dense`).

Position embeddings meet an image size other than their table's by one of two rules (`POS_EMBED`):
timm's table resized once at load (ScaLR+), or the released CVPR code's DINOv2, which keeps its
518-px table and interpolates it at every forward; scalr computes the latter on its own forward
path (`dinov2_cvpr_tokens`), leaving timm's model as timm built it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.synth.pixel_classes import NONE
from stages.extract.registry import TeacherSpec, get_spec
from stages.extract.weights import TeacherWeights, load_weights, resolve_weights
from stages.runtime import seeded

POS_EMBED = {
    "timm": "timm: the table resized once at load (bicubic, antialiased), as ScaLR+",
    "dinov2-cvpr": "dinov2-cvpr: the 37 x 37 table of 518 px kept; at every forward bicubic at scale factors "
    "(h + 0.1) / 37, (w + 0.1) / 37, no antialias, as the released CVPR code's DINOv2",
}


class Teacher(nn.Module):
    """A frozen teacher: images in [0, 1] (float) or uint8 in, (B, D, H/p, W/p) float32 token grid out."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, pos_embed: str, provenance: dict):
        super().__init__()
        self.spec, self.pos_embed = spec, pos_embed
        self.model = model.eval().requires_grad_(False)
        cfg = timm.data.resolve_model_data_config(model)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.provenance = {**asdict(spec), **provenance, "mean": list(cfg["mean"]), "std": list(cfg["std"])}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = (x - self.mean) / self.std
        if self.spec.dense == "maskclip-value":
            return maskclip_dense(self.model, x)
        if self.pos_embed == "dinov2-cvpr":
            return dinov2_cvpr_tokens(self.model, x)
        (grid,) = self.model.forward_intermediates(x, indices=1, norm=False, output_fmt="NCHW", intermediates_only=True)
        return grid.float()


ORACLE_SLOTS = 16  # class-map values: world.Cls ids 0-13, then anything else, then NONE (the sky)


class OracleTeacher(nn.Module):
    """A teacher that knows the classes: it sees a camera's class map (the synthetic rigs only) and
    gives, per patch of `spec.patch` pixels of its input, the mean of fixed random class embeddings
    (seeded), plus Gaussian noise of std `noise` seeded by the patch grid's content. A random ViT
    has little to teach; this one has everything, so a student distilled from it must learn the
    classes if the path from pixels to points is right."""

    def __init__(self, spec: TeacherSpec, seed: int, noise: float, provenance: dict):
        super().__init__()
        self.spec, self.pos_embed, self.noise = spec, "timm", noise
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("embeddings", torch.randn(ORACLE_SLOTS, spec.dim, generator=generator), persistent=False)
        self.provenance = {**asdict(spec), **provenance, "noise": noise}

    @torch.no_grad()
    def forward(self, class_maps: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) uint8 class maps -> (B, D, H/p, W/p) float32 token grids."""
        values = class_maps[:, 0].long()
        slots = torch.where(values == NONE, ORACLE_SLOTS - 1, values.clamp(max=ORACLE_SLOTS - 2))
        fractions = F.avg_pool2d(F.one_hot(slots, ORACLE_SLOTS).permute(0, 3, 1, 2).float(), self.spec.patch)
        grids = torch.einsum("bkhw,kd->bdhw", fractions, self.embeddings.to(fractions.device))
        if self.noise > 0:
            for i, grid in enumerate(grids):
                seed = zlib.crc32(class_maps[i].cpu().numpy().tobytes())
                noise = torch.randn(grid.shape, generator=torch.Generator().manual_seed(seed))
                grids[i] = grid + self.noise * noise.to(grid.device)
        return grids.float()


TeacherModel = Teacher | OracleTeacher  # what build_teacher gives: images or class maps in, token grids out


def maskclip_dense(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP dense features (variant recorded in stores as "maskclip-value"): run all blocks but
    the last; in the last block, replace the attention output by its value path
    proj(W_v . norm1(x)) with NO residual and NO MLP; then ln_post and CLIP's visual projection."""
    b, _, h, w = x.shape
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    last = model.blocks[-1]
    attn = last.attn
    qkv = attn.qkv(last.norm1(tokens))
    v = qkv[..., 2 * attn.head_dim * attn.num_heads :]
    tokens = model.norm(attn.proj(v))
    tokens = model.head(tokens[:, model.num_prefix_tokens :])
    gh, gw = h // model.patch_embed.patch_size[0], w // model.patch_embed.patch_size[1]
    return tokens.transpose(1, 2).reshape(b, -1, gh, gw).float()


def dinov2_cvpr_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's output before the final norm, class token removed, as an NCHW grid, for a
    DINOv2 built at 518 px with dynamic image size: timm's forward with the position embeddings of
    the released CVPR code (`dinov2_cvpr_pos_embed`)."""
    tokens = model.norm_pre(model.patch_drop(dinov2_cvpr_pos_embed(model, model.patch_embed(x))))
    for block in model.blocks:
        tokens = block(tokens)
    b, h, w = x.shape[0], *model.patch_embed.dynamic_feat_size(x.shape[-2:])
    return tokens[:, model.num_prefix_tokens :].reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous().float()


def dinov2_cvpr_pos_embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class token and position embeddings for (B, h, w, C) patch tokens, computed as the released
    CVPR code's DINOv2 (`interpolate_pos_encoding`): the 37 x 37 table bicubic at scale factors
    (h + 0.1) / 37, (w + 0.1) / 37."""
    b, h, w, c = x.shape
    pos = model.pos_embed.float()
    n = int(math.sqrt(pos.shape[1] - 1))
    if h == w == n:
        patch_pos = pos[:, 1:]
    else:
        grid = pos[:, 1:].reshape(1, n, n, c).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic")
        assert patch_pos.shape[-2:] == (h, w), patch_pos.shape
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, c)
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
    return model.pos_drop(tokens + torch.cat([pos[:, :1], patch_pos], dim=1).to(x.dtype))


def pos_embed_rule(spec: TeacherSpec, wanted: str) -> str:
    """The rule a teacher gets: the CVPR one exists for DINOv2 without registers (its only
    teachers); any other teacher keeps timm's."""
    dinov2 = "dinov2" in spec.timm_name and "reg" not in spec.timm_name
    return "dinov2-cvpr" if wanted == "dinov2-cvpr" and dinov2 else "timm"


def build_teacher(
    spec: TeacherSpec, image_size: tuple[int, int], weights: TeacherWeights, pos_embed: str = "timm", noise: float = 0.0
) -> Teacher | OracleTeacher:
    """A frozen teacher for images of `image_size` (H, W) with resolved `weights`. `pos_embed`:
    "timm" or "dinov2-cvpr" (see POS_EMBED; DINOv2 without registers only); `noise`: the oracle's."""
    h, w = image_size
    if h % spec.patch or w % spec.patch:
        raise ConfigError(f"image size {h}x{w} is not a multiple of {spec.name}'s patch size {spec.patch}")
    if spec.dense == "oracle":
        provenance = {"weights": weights.label, "weights_sha256": None, "random_init": True}
        return OracleTeacher(spec, weights.seed, noise, provenance)
    rule = pos_embed_rule(spec, pos_embed)
    kwargs = {"img_size": (h, w), "num_classes": spec.dim if spec.dense == "maskclip-value" else 0}
    if rule == "dinov2-cvpr":  # keep the 518 px table; interpolate it at every forward
        kwargs.update(img_size=518, dynamic_img_size=True)
    with seeded(weights.seed):  # the random initialisation (overwritten when weights are loaded)
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if weights.random_init:
        provenance = {"weights": weights.label, "weights_sha256": None, "random_init": True}
    else:
        load_weights(model, spec, weights.path)
        path = weights.path.resolve()
        provenance = {"weights": str(path), "weights_sha256": weights.sha256, "random_init": False, "hub": weights.hub}
    return Teacher(spec, model, rule, {**provenance, "pos_embed": POS_EMBED[rule]})


def load_teacher(
    name: str,
    image_size: tuple[int, int],
    weights: Path | None = None,
    weights_dir: Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    pos_embed: str = "timm",
) -> Teacher:
    """A registered teacher by name, its weights resolved as `extract-features` does: a file, a
    folder of documented names, the Hugging Face cache, or a seeded random initialisation."""
    spec = get_spec(name)
    return build_teacher(spec, image_size, resolve_weights(spec, weights, weights_dir, random_init, seed), pos_embed)
