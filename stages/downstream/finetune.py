"""Finetuning's own parts (its settings per recipe: stages/recipes.py): layer-wise learning-rate
decay, and the released finetuning configs' field of view where it differs from probing's
(PandarGT: 384 x 384 cells over +-96 m). `segment.train_segmentation` runs it."""

from __future__ import annotations

from torch import nn

# The released finetuning configs' exceptions to a dataset's field of view (both recipes).
FIELD_OF_VIEW = {"pandargt": ((-96.0, -96.0, -8.0), (96.0, 96.0, 8.0))}  # 384 x 384 cells


def layer_decay_groups(model: nn.Module, base_lr: float, decay: float) -> list[dict]:
    """Parameter groups of a segmentation model with lr = base * decay^(L+1 - layer id): the
    embedding is layer 0, backbone layer k is k+1, the head L+1."""
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
    return [
        {"params": ps, "lr": base_lr * decay ** (depth + 1 - layer), "layer": layer}
        for layer, ps in sorted(groups.items())
    ]
