"""Linear probing, as the released downstream configs (configs/downstream/*/WI_768_linprob*.yaml):
the pretrained backbone frozen in eval mode (no gradient, fixed BatchNorm statistics), a new
BatchNorm1d + linear head trained with AdamW, lr 1e-3, weight decay 3e-3, no drop path, 20 epochs
(PandaSet 50) of which 2 warm up, then cosine to 1e-5. `segment.train_segmentation` runs it."""

from __future__ import annotations

PANDASET = ("pandar64", "pandargt")


def recipe(dataset: str | None, labels_fraction: float) -> dict:
    """Optimisation and schedule of probing `dataset` (the label fraction does not change it)."""
    epochs = 50 if dataset in PANDASET else 20
    return {"lr": 1e-3, "weight_decay": 3e-3, "drop_path": 0.0, "epochs": epochs, "warmup_epochs": 2.0, "min_lr": 1e-5}
