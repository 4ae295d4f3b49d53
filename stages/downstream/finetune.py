"""Finetuning, and the supervised baseline trained from scratch, as the released downstream configs
(configs/downstream/*/WI_768_finetune*.yaml): every weight trained with AdamW, lr 2e-3, no weight
decay, drop path 0.2, layer-wise learning-rate decay (0.99 at 100 % labels, 0.95 below); 100 %
labels 25 epochs with 2 of warm-up (SemanticKITTI 10 and 1), 1 % and 10 % labels 45 and 4; cosine to
0. PandarGT finetunes on 384 x 384 cells over +-96 m. `segment.train_segmentation` runs it."""

from __future__ import annotations

from torch import nn

# The released finetuning configs' exceptions to a dataset's field of view.
FIELD_OF_VIEW = {"pandargt": ((-96.0, -96.0, -8.0), (96.0, 96.0, 8.0))}  # 384 x 384 cells


def recipe(dataset: str | None, labels_fraction: float) -> dict:
    """Optimisation and schedule of finetuning (or training from scratch) on `dataset`."""
    if labels_fraction < 1.0:
        epochs, warmup = 45, 4.0
    elif dataset == "semantickitti":
        epochs, warmup = 10, 1.0
    else:
        epochs, warmup = 25, 2.0
    return {"lr": 2e-3, "weight_decay": 0.0, "drop_path": 0.2, "epochs": epochs, "warmup_epochs": warmup, "min_lr": 0.0}


def default_layer_decay(labels_fraction: float) -> float:
    return 0.99 if labels_fraction == 1.0 else 0.95


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
