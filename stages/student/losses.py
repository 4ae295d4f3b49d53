"""Segmentation losses: cross-entropy (ignore 255) + Lovasz-softmax (Berman et al., CVPR 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.scan import IGNORE_INDEX


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovasz extension of the Jaccard loss, averaged over the classes present in `labels`.
    probs (N, K) softmax outputs, labels (N,) with IGNORE_INDEX for ignored points."""
    valid = labels != IGNORE_INDEX
    probs, labels = probs[valid], labels[valid]
    if labels.numel() == 0:
        return probs.sum() * 0.0
    losses = []
    for c in torch.unique(labels):
        fg = (labels == c).float()
        errors = (fg - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        fg_sorted = fg[order]
        gts = fg_sorted.sum()
        intersection = gts - fg_sorted.cumsum(0)
        union = gts + (1.0 - fg_sorted).cumsum(0)
        jaccard = 1.0 - intersection / union
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])  # the Lovasz gradient
        losses.append(torch.dot(errors_sorted, jaccard))
    return torch.stack(losses).mean()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    ce = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        ce = logits.sum() * 0.0
    return ce + lovasz_softmax(logits.softmax(dim=1), labels.long())
