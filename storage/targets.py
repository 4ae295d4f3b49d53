"""Teacher targets from token grids: the one sampling rule (stage 1 writes with it; a grid-layout
store reads with it) and the int8 quantisation of grids.

A visible point's target is the teacher's token grid (D, h, w) upsampled bilinearly to the resized
image (align_corners=True) and read at the point's integer pixel. `sample_grid` computes exactly
that without materialising the full-resolution map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sample_grid(grid: torch.Tensor, pixels: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Per-point features from one token grid (D, h, w) at integer pixels (M, 2) = (col, row) of the
    (H, W) image: exactly `interpolate(grid, (H, W), bilinear, align_corners=True)[:, row, col]`,
    without materialising the full-resolution map."""
    h_img, w_img = image_size
    if len(pixels) == 0:
        return grid.new_zeros((0, grid.shape[0]))
    # align_corners=True maps pixel c of W onto grid x = c (w - 1) / (W - 1), which grid_sample
    # (also align_corners=True) addresses as 2 x / (w - 1) - 1 = 2 c / (W - 1) - 1.
    norm = torch.stack([2 * pixels[:, 0] / (w_img - 1) - 1, 2 * pixels[:, 1] / (h_img - 1) - 1], dim=-1)
    out = F.grid_sample(
        grid[None].float(), norm.view(1, 1, -1, 2).to(grid.device, torch.float32), mode="bilinear", align_corners=True
    )
    return out[0, :, 0].T


def quantize_int8(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D, h, w) float -> (int8 grid, float32 scale per token (h, w)): x ~ q * scale, with each
    token's largest magnitude mapped to 127 (a zero token gets scale 0)."""
    grid = np.asarray(grid, dtype=np.float32)
    scale = np.abs(grid).max(axis=0) / 127.0
    q = np.rint(grid / np.where(scale > 0, scale, 1.0)).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[None]
