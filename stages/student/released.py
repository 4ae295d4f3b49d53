"""The released ScaLR code's checkpoint format (valeoai/ScaLR), mapped to scalr's and back.

The released `distill.py` saves `{"model_point": state_dict, "optim": ..., "epoch": ...}` (the
published checkpoints use "model_points"), `finetune.py` saves `{"net": state_dict, ...}`; keys may
carry DistributedDataParallel's "module." prefix. Its Segmenter holds `embed`, `waffleiron` and
`classif` (the distillation head: one 1x1 conv, or conv-ReLU-conv for several teachers; after
finetuning BatchNorm1d + conv). scalr's modules are the same computation with Linear layers and
per-channel LayerScale vectors: a key maps to a key and a tensor is reshaped, never changed.

The architecture (depth, width, norm, head) is read from the tensors; the activation (ReLU in the
CVPR code, GELU in ScaLR+) is not in them: it comes from the recipe, which the file itself often
shows (`recipe_evidence`), else from `--recipe`. The grid is not in them either (WaffleIron's
weights do not depend on it): it comes from the dataset's released configs.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import torch

from stages.recipes import MIXES
from stages.student.waffleiron import WaffleIronConfig
from storage.checkpoint import CheckpointError

RELEASED_KEYS = ("model_points", "model_point", "net")  # distill.py (published / as saved), finetune.py

# (released prefix, scalr prefix, trailing singleton dims of the released `.weight`)
_FIXED = [
    ("embed.norm.", "backbone.embedding.norm.", 0),
    ("embed.conv1.", "backbone.embedding.point.", 1),
    ("embed.conv2.0.", "backbone.embedding.neighbour_norm.", 0),
    ("embed.conv2.1.", "backbone.embedding.neighbour.0.", 2),
    ("embed.conv2.2.", "backbone.embedding.neighbour.1.", 0),
    ("embed.conv2.4.", "backbone.embedding.neighbour.3.", 2),
    ("embed.final.", "backbone.embedding.final.", 1),
]
_LAYER = [  # inside waffleiron.{channel_mix,spatial_mix}.D / backbone.{channel,spatial}.D
    ("channel_mix", "channel", "norm.", 0),
    ("channel_mix", "channel", "mlp.0.", 1),
    ("channel_mix", "channel", "mlp.2.", 1),
    ("channel_mix", "channel", "scale.", 2),
    ("spatial_mix", "spatial", "norm.", 0),
    ("spatial_mix", "spatial", "ffn.0.", 0),
    ("spatial_mix", "spatial", "ffn.2.", 0),
    ("spatial_mix", "spatial", "scale.", 2),
]
_LAYER_KEY = re.compile(r"^waffleiron\.(channel_mix|spatial_mix)\.(\d+)\.(.+)$")
_SCALR_LAYER_KEY = re.compile(r"^backbone\.(channel|spatial)\.(\d+)\.(.+)$")


def released_key(state: dict) -> str | None:
    """The key holding the model weights if `state` is a released-format checkpoint, else None."""
    if not isinstance(state, dict) or "model" in state:
        return None
    for key in RELEASED_KEYS:
        weights = state.get(key)
        if isinstance(weights, dict) and weights and all(torch.is_tensor(v) for v in weights.values()):
            return key
    return None


def _rename(key: str, to_scalr: bool) -> tuple[str, int | None] | None:
    """(the key in the other format, trailing singleton dims of the released `.weight`; None for
    the head, whose convs become linears) or None for a key of neither model."""
    src, dst = (0, 1) if to_scalr else (1, 0)
    head = ("classif.", "head.")
    if key.startswith(head[src]):
        return head[dst] + key[len(head[src]) :], None
    if m := (_LAYER_KEY if to_scalr else _SCALR_LAYER_KEY).match(key):
        rule = next((r for r in _LAYER if r[src] == m[1] and m[3].startswith(r[2])), None)
        if rule is None:
            return None
        return (f"backbone.{rule[1]}.{m[2]}.{m[3]}" if to_scalr else f"waffleiron.{rule[0]}.{m[2]}.{m[3]}"), rule[3]
    rule = next((r for r in _FIXED if key.startswith(r[src])), None)
    return None if rule is None else (rule[dst] + key[len(rule[src]) :], rule[2])


def _convert(weights: dict, path: Path, to_scalr: bool) -> dict:
    out = {}
    for key, tensor in weights.items():
        renamed = _rename(key, to_scalr)
        if renamed is None:
            what = (
                "is not a tensor of the released WaffleIron segmenter (embed.*, waffleiron.*, classif.*)"
                if to_scalr
                else "has no counterpart in the released WaffleIron segmenter"
            )
            raise CheckpointError(path, f"{key} {what}")
        name, dims = renamed
        if dims is None:  # head: conv weight (out, in, 1) <-> linear (out, in)
            dims = 1 if tensor.ndim == (3 if to_scalr else 2) and key.endswith("weight") else 0
        if key.endswith("weight") and dims:
            tensor = (
                tensor.reshape(tensor.shape[: tensor.ndim - dims])
                if to_scalr
                else tensor.reshape(*tensor.shape, *([1] * dims))
            )
        out[name] = tensor
    return out


def from_released(weights: dict, path: Path) -> dict:
    """Released Segmenter weights -> scalr weights (`backbone.*`, `head.*`)."""
    return _convert(weights, path, to_scalr=True)


def to_released(weights: dict, path: Path) -> dict:
    """scalr weights (`backbone.*`, `head.*`) -> released Segmenter weights."""
    return _convert(weights, path, to_scalr=False)


def recipe_evidence(weights: dict, state: dict) -> list[tuple[str, str]]:
    """(recipe, what shows it) for each sign in a released file (`weights`: its state dict, keys
    without "module.") of which code made it: BatchNorm in the mixes (only the CVPR code's
    WaffleIron has it), an MLP distillation head (only ScaLR+'s segmenter), the fields of the
    saved learning-rate schedule (the CVPR code's WarmupCosine has `max_iter`, ScaLR+'s schedules
    `max_it`)."""
    signs = []
    batch_norm = next((k for k in weights if _LAYER_KEY.match(k) and k.endswith(".norm.running_mean")), None)
    if batch_norm:
        signs.append(("cvpr", f"{batch_norm}: BatchNorm in the mixes, which only the CVPR code's WaffleIron has"))
    if "classif.0.weight" in weights and "classif.2.weight" in weights:
        signs.append(("scalr-plus", "classif.0.weight, classif.2.weight: an MLP distillation head, only ScaLR+'s"))
    scheduler = state.get("scheduler")
    lambdas = scheduler.get("lr_lambdas") if isinstance(scheduler, dict) else None
    fields = lambdas[0] if isinstance(lambdas, (list, tuple)) and lambdas and isinstance(lambdas[0], dict) else {}
    if "max_iter" in fields:
        signs.append(("cvpr", "scheduler.lr_lambdas[0].max_iter: the CVPR code's WarmupCosine"))
    elif "max_it" in fields:
        signs.append(("scalr-plus", "scheduler.lr_lambdas[0].max_it: a ScaLR+ schedule"))
    return signs


def released_recipe(weights: dict, state: dict, path: Path, told: str | None) -> tuple[str, str]:
    """(the recipe that made a released file, why scalr says so): what the file shows, else what
    the caller was told (`--recipe`), else cvpr (the format's first release). A file whose signs
    disagree is refused, naming them."""
    signs = recipe_evidence(weights, state)
    shown = {recipe for recipe, _ in signs}
    if len(shown) > 1:
        raise CheckpointError(path, f"shows both recipes: {'; '.join(why for _, why in signs)}")
    if signs:
        return signs[0][0], signs[0][1]
    if told is not None:
        return told, "--recipe (the file does not show it)"
    return "cvpr", "assumed: the file does not show it (pass --recipe scalr-plus for a ScaLR+ file)"


def architecture(weights: dict, path: Path, recipe: str = "cvpr") -> tuple[WaffleIronConfig, dict]:
    """(student configuration, head description) read from scalr-named weights, with what the
    tensors cannot show from the `recipe`: the activation and the cell mean."""
    try:
        point = weights["backbone.embedding.point.weight"]
    except KeyError:
        raise CheckpointError(path, "no embedding weights (embed.conv1.weight): not a WaffleIron checkpoint") from None
    width, in_channels = point.shape
    depth = len({int(k.split(".")[2]) for k in weights if k.startswith("backbone.channel.")})
    norm = "batch" if "backbone.channel.0.norm.running_mean" in weights else "layer"
    cfg = WaffleIronConfig(
        depth=depth,
        width=width,
        in_channels=in_channels,
        norm=norm,
        activation=MIXES[recipe].activation,
        cell_mean=MIXES[recipe].cell_mean,
    )
    if "head.weight" in weights:
        head = {"kind": "linear", "out": int(weights["head.weight"].shape[0])}
    elif "head.2.weight" in weights:
        head = {
            "kind": "mlp",
            "hidden": int(weights["head.0.weight"].shape[0]),
            "out": int(weights["head.2.weight"].shape[0]),
        }
    elif "head.0.running_mean" in weights and "head.1.weight" in weights:
        head = {"kind": "segmentation", "out": int(weights["head.1.weight"].shape[0])}
    else:
        head = {"kind": "none"}
    return cfg, head


def released_record(cfg: WaffleIronConfig, head: dict, path: Path, state: dict, recipe: tuple[str, str]) -> dict:
    """A scalr run record for weights that came without one: the architecture, the recipe that
    made them and why scalr says so; it keeps the released key and "module." prefix so `convert`
    writes the same file layout back."""
    key = released_key(state)
    stage = "released-segmenter" if head["kind"] == "segmentation" else "released-pretrain"
    return {
        "stage": stage,
        "config": {"model": asdict(cfg), "recipe": recipe[0]},
        "recipe_source": recipe[1],
        "head": head,
        "released_from": str(path),
        "released_layout": {"key": key, "module_prefix": all(k.startswith("module.") for k in state[key])},
        **({"num_classes": head["out"]} if head["kind"] == "segmentation" else {"target_dim": head.get("out")}),
    }
