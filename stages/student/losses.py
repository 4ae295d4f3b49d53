"""Every loss scalr trains with, in one place: distillation (ScaLR's cosine distance, the PPKT
contrastive baseline) and segmentation (cross-entropy + Lovasz-softmax, Berman et al., CVPR 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.scan import IGNORE_INDEX


def cosine_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-point ScaLR loss: || f/|f| - g/|g| ||_2 (NOT squared) = sqrt(2 - 2 cos)."""
    return (F.normalize(student.float(), dim=1) - F.normalize(teacher.float(), dim=1)).norm(dim=1)


def ppkt_loss(
    student: torch.Tensor, teacher: torch.Tensor, pairs: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """PPKT baseline: InfoNCE over `pairs` random point-pixel pairs of the batch; returns the sum
    over pairs (normalised by the caller)."""
    n = student.shape[0]
    pick = torch.randperm(n, generator=generator)[: min(pairs, n)].to(student.device)
    s = F.normalize(student[pick].float(), dim=1)
    t = F.normalize(teacher[pick].float(), dim=1)
    logits = s @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(len(pick), device=logits.device), reduction="sum")


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
    """Cross-entropy (ignoring IGNORE_INDEX) + Lovasz-softmax, per point of the batch."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        ce = logits.sum() * 0.0
    return ce + lovasz_softmax(logits.softmax(dim=1), labels.long())
