"""Colours of features and classes, shared by the pictures and the viewer: PCA colours fitted once
per store or run, cosine similarity to a query feature on the coolwarm scale, one colour per class."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib
import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Colours or an image in [0, 1] (or already uint8) as uint8."""
    return image if image.dtype == np.uint8 else np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def class_colours(num_classes: int) -> np.ndarray:
    """A fixed colour per class index: tab20's saturated colours first, then its light ones."""
    cmap = matplotlib.colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return np.array([cmap(order[i % 20])[:3] for i in range(num_classes)])


def cosine_to(features: np.ndarray, query: int, centre: bool = True) -> np.ndarray:
    """Cosine similarity of every feature to the query's. Centred on the cloud's mean feature by
    default: features of random or lightly trained networks share a large common component that
    otherwise makes every point look alike."""
    f = features.astype(np.float32)
    if centre:
        f = f - f.mean(axis=0)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)
    return f @ f[query]


def similarity_rgb(values: np.ndarray) -> np.ndarray:
    """Cosine similarities in [-1, 1] as RGB in [0, 1]: blue -1, grey 0, red +1 (coolwarm)."""
    return matplotlib.colormaps["coolwarm"]((np.asarray(values) + 1.0) / 2.0)[:, :3]


@dataclass(frozen=True)
class PcaBasis:
    """The first three principal components of some features and the range shown as RGB (their
    2nd to 98th percentiles on the fitted rows). Fitted once per store or run and applied to
    every scan, so a colour means the same feature direction in every picture."""

    mean: np.ndarray  # (D,)
    axes: np.ndarray  # (3, D), each with its largest coefficient positive (SVD signs are arbitrary)
    low: np.ndarray  # (3,)
    high: np.ndarray  # (3,)

    @classmethod
    def fit(cls, features: np.ndarray, max_rows: int = 20000) -> PcaBasis:
        f = features.astype(np.float32)[:: max(1, len(features) // max_rows)]
        mean = f.mean(axis=0)
        centred = (f - mean).astype(np.float64)
        _, vectors = np.linalg.eigh(centred.T @ centred)  # D x D: far cheaper than an SVD of the rows
        axes = np.zeros((3, f.shape[1]), np.float32)
        top = vectors[:, ::-1][:, : min(3, len(f))].T  # largest variance first
        axes[: len(top)] = top
        axes *= np.where(axes[np.arange(3), np.abs(axes).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
        comps = (f - mean) @ axes.T
        return cls(mean, axes, np.percentile(comps, 2, axis=0), np.percentile(comps, 98, axis=0))

    def rgb(self, features: np.ndarray) -> np.ndarray:
        comps = (features.astype(np.float32) - self.mean) @ self.axes.T
        return np.clip((comps - self.low) / np.maximum(self.high - self.low, 1e-8), 0, 1)
