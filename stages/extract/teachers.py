"""Frozen ViT teachers over timm: a registry declared as data, one way to get dense features.

Every teacher maps a batch of images (B, 3, H, W) in [0, 1] (or uint8) to a token grid (B, D, H/p, W/p): the
output of the LAST block BEFORE the final LayerNorm, prefix tokens (class, registers) removed.
MaskCLIP instead returns CLIP's dense value-path features after ln_post and the visual
projection (see `MaskCLIP`). Weights load from a local file, or by name from the standard
Hugging Face cache (timm's hub repository of the architecture; downloaded once when online,
`HF_HUB_OFFLINE=1` never touches the network); random initialisation is explicit and recorded.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TeacherSpec:
    name: str  # scalr's name, e.g. "dinov2-vitl14"
    timm_name: str  # timm architecture + pretrained tag
    dim: int  # feature width
    patch: int  # patch size in pixels
    weights_file: str  # documented file name inside a --weights-dir
    weights_source: str  # where such weights come from (for error messages and the README)
    dense: str = "last-block-pre-norm"  # or "maskclip-value"
    random_init_only: bool = False


_DINOV2 = "DINOv2 checkpoints from the facebookresearch/dinov2 release (original .pth or timm's state dict)"
TEACHERS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in (
        TeacherSpec("dino-vits8", "vit_small_patch8_224.dino", 384, 8, "dino_deitsmall8_pretrain.pth", "DINO ViT-S/8 from the facebookresearch/dino release"),
        TeacherSpec("dinov2-vits14", "vit_small_patch14_dinov2.lvd142m", 384, 14, "dinov2_vits14_pretrain.pth", _DINOV2),
        TeacherSpec("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m", 768, 14, "dinov2_vitb14_pretrain.pth", _DINOV2),
        TeacherSpec("dinov2-vitl14", "vit_large_patch14_dinov2.lvd142m", 1024, 14, "dinov2_vitl14_pretrain.pth", _DINOV2),
        TeacherSpec("dinov2-vitg14", "vit_giant_patch14_dinov2.lvd142m", 1536, 14, "dinov2_vitg14_pretrain.pth", _DINOV2),
        TeacherSpec("dinov2-vits14-reg4", "vit_small_patch14_reg4_dinov2.lvd142m", 384, 14, "dinov2_vits14_reg4_pretrain.pth", _DINOV2),
        TeacherSpec("dinov2-vitb14-reg4", "vit_base_patch14_reg4_dinov2.lvd142m", 768, 14, "dinov2_vitb14_reg4_pretrain.pth", _DINOV2),
        TeacherSpec("dinov2-vitl14-reg4", "vit_large_patch14_reg4_dinov2.lvd142m", 1024, 14, "dinov2_vitl14_reg4_pretrain.pth", _DINOV2),
        TeacherSpec("dinov2-vitg14-reg4", "vit_giant_patch14_reg4_dinov2.lvd142m", 1536, 14, "dinov2_vitg14_reg4_pretrain.pth", _DINOV2),
        TeacherSpec("mae-vitb16", "vit_base_patch16_224.mae", 768, 16, "mae_pretrain_vit_base.pth", "MAE ViT-B/16 from the facebookresearch/mae release"),
        TeacherSpec(
            "maskclip-vitb16", "vit_base_patch16_clip_quickgelu_224.openai", 512, 16, "clip_vit_b16_openai.bin",
            "OpenAI CLIP ViT-B/16 as an open_clip or timm state dict (open_clip_pytorch_model.bin)", dense="maskclip-value",
        ),  # fmt: skip
        TeacherSpec("test-vit", "test_vit", 64, 16, "", "none: a tiny architecture for tests and demos", random_init_only=True),
    )
}


def get_spec(name: str) -> TeacherSpec:
    try:
        return TEACHERS[name]
    except KeyError:
        raise ValueError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}") from None


class WeightsError(Exception):
    """A missing or unusable weights file; the message names it and where such weights come from."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_weights(spec: TeacherSpec, weights: Path | None, weights_dir: Path | None, random_init: bool) -> Path | None:
    """The weights file to load (given, in --weights-dir, or by name from the Hugging Face cache),
    or None for an explicit random initialisation."""
    if random_init:
        if weights or weights_dir:
            raise WeightsError("--random-init and --weights/--weights-dir exclude each other")
        return None
    if spec.random_init_only:
        raise WeightsError(f"teacher {spec.name} has no pretrained weights: pass --random-init")
    if weights is None and weights_dir is None:
        return hub_weights(spec)
    path = Path(weights) if weights else Path(weights_dir) / spec.weights_file
    if not path.is_file():
        raise WeightsError(f"{path}: weights file for teacher {spec.name} is missing; such weights: {spec.weights_source}")
    return path


# How a ViT's position embeddings meet an image size other than its table's.
POS_EMBED = {
    "timm": "timm: the table resized once at load (bicubic, antialiased), as ScaLR+",
    "dinov2-cvpr": "dinov2-cvpr: the 37 x 37 table of 518 px kept; at every forward bicubic at scale factors "
                   "(h + 0.1) / 37, (w + 0.1) / 37, no antialias, as the released CVPR code's DINOv2",
}  # fmt: skip


HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold, preferred first


def hub_weights(spec: TeacherSpec) -> Path:
    """The teacher's pretrained weights from the standard Hugging Face cache (timm's repository of
    its architecture), downloaded into the cache first when online. Offline and absent: one line
    naming the repository and file and the two ways to provide them."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    cfg = timm.get_pretrained_cfg(spec.timm_name)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise WeightsError(f"teacher {spec.name} has no Hugging Face repository in timm's registry: pass --weights FILE or --weights-dir DIR (holding {spec.weights_file}); such weights: {spec.weights_source}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
    files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else HUB_FILES
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline))
        except (LocalEntryNotFoundError, EntryNotFoundError):
            continue
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise WeightsError(f"teacher {spec.name}: cannot fetch {repo}/{filename} from the Hugging Face Hub ({str(err).splitlines()[0][:200]}); pass --weights FILE or --weights-dir DIR") from None
    where = "not in the Hugging Face cache (offline: HF_HUB_OFFLINE=1)" if offline else "not on the Hugging Face Hub"
    raise WeightsError(
        f"teacher {spec.name}: weights {where}: repository {repo}, file {files[0]}. Provide them either in the cache "
        f"(online once: huggingface-cli download {repo} {files[0]}) or as a local file (--weights FILE, or --weights-dir DIR holding {spec.weights_file}; {spec.weights_source})"
    )


def hub_provenance(path: Path | None) -> dict | None:
    """{repo, revision, file} when `path` lies in a Hugging Face cache snapshot, else None."""
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]+)/(.+)$", str(path)) if path else None
    return {"repo": f"{m[1]}/{m[2]}", "revision": m[3], "file": m[4]} if m else None


class Teacher(nn.Module):
    """A frozen teacher: images in [0, 1] (float) or uint8 in, (B, D, H/p, W/p) float32 token grid out."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, provenance: dict):
        super().__init__()
        self.spec = spec
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
        (grid,) = self.model.forward_intermediates(x, indices=1, norm=False, output_fmt="NCHW", intermediates_only=True)
        return grid.float()


def maskclip_dense(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP dense features (variant recorded in stores as "maskclip-value"): run all blocks but
    the last; in the last block, replace the attention output by its value path
    proj(W_v . norm1(x)) with NO residual and NO MLP; then ln_post and CLIP's visual projection."""
    b, _, h, w = x.shape
    tokens = model.patch_embed(x)
    tokens = model._pos_embed(tokens)
    tokens = model.norm_pre(tokens)
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


def dinov2_cvpr_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm's `_pos_embed` for (B, h, w, C) patch tokens, computed as the released CVPR code's
    DINOv2 (`interpolate_pos_encoding`): bound to a model built at 518 px with dynamic image size."""
    b, h, w, c = x.shape
    pos = self.pos_embed.float()
    n = int(math.sqrt(pos.shape[1] - 1))
    if h == w == n:
        patch_pos = pos[:, 1:]
    else:
        grid = pos[:, 1:].reshape(1, n, n, c).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic")
        assert patch_pos.shape[-2:] == (h, w), patch_pos.shape
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, c)
    tokens = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
    return self.pos_drop(tokens + torch.cat([pos[:, :1], patch_pos], dim=1).to(x.dtype))


def pos_embed_rule(spec: TeacherSpec, wanted: str) -> str:
    """The rule a teacher gets: the CVPR one exists for DINOv2 without registers (its only
    teachers); any other teacher keeps timm's."""
    dinov2 = "dinov2" in spec.timm_name and "reg" not in spec.timm_name
    return "dinov2-cvpr" if wanted == "dinov2-cvpr" and dinov2 else "timm"


def load_weights(model: nn.Module, spec: TeacherSpec, path: Path) -> None:
    """Load a local checkpoint through timm's converters (original DINO/DINOv2/MAE/CLIP releases
    or timm state dicts; position embeddings resized to the model's grid), strictly: only the
    classifier, unused for dense features, may be absent or extra."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = checkpoint_filter_fn(load_state_dict(str(path), weights_only=False), model)
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, AttributeError, pickle.UnpicklingError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise WeightsError(f"{path}: cannot load as {spec.name} ({spec.timm_name}): {first}") from None

    def unused(key: str) -> bool:  # classifier parts; MaskCLIP needs its head (the visual projection)
        return key.startswith("fc_norm.") or (key.startswith("head.") and spec.dense != "maskclip-value")

    missing = [k for k in result.missing_keys if not unused(k)]
    unexpected = [k for k in result.unexpected_keys if not unused(k)]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: not {spec.name} weights ({spec.timm_name}): {len(missing)} missing tensors {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}; such weights: {spec.weights_source}"
        )


def load_teacher(
    name: str,
    image_size: tuple[int, int],
    weights: Path | None = None,
    weights_dir: Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    pos_embed: str = "timm",
) -> Teacher:
    """Build a frozen teacher for images of `image_size` (H, W), from a local file or random init.
    `pos_embed`: "timm" or "dinov2-cvpr" (see POS_EMBED; DINOv2 without registers only)."""
    spec = get_spec(name)
    path = resolve_weights(spec, weights, weights_dir, random_init)
    h, w = image_size
    if h % spec.patch or w % spec.patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of {spec.name}'s patch size {spec.patch}")
    rule = pos_embed_rule(spec, pos_embed)
    kwargs = dict(img_size=(h, w), num_classes=spec.dim if spec.dense == "maskclip-value" else 0)
    if rule == "dinov2-cvpr":  # keep the 518 px table; interpolate it at every forward
        kwargs.update(img_size=518, dynamic_img_size=True)
    if path is None:
        torch.manual_seed(seed)
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        provenance = {"weights": f"random-init seed {seed}", "weights_sha256": None, "random_init": True}
    else:
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        load_weights(model, spec, path)
        provenance = {"weights": str(path.resolve()), "weights_sha256": sha256_file(path), "random_init": False, "hub": hub_provenance(path)}
    if rule == "dinov2-cvpr":
        model._pos_embed = types.MethodType(dinov2_cvpr_pos_embed, model)
    return Teacher(spec, model, {**provenance, "pos_embed": POS_EMBED[rule]})
