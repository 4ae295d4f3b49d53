"""PNG figures shared by the stages (matplotlib, headless)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.datasets.base import load_image  # noqa: E402
from pipeline.geometry import Projection  # noqa: E402
from pipeline.scan import IGNORE_INDEX, Camera, Scan  # noqa: E402


def class_colours(num_classes: int) -> np.ndarray:
    """A fixed colour per class index: tab20's saturated colours first, then its light ones."""
    cmap = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return np.array([cmap(order[i % 20])[:3] for i in range(num_classes)])


def projection_figure(
    scan: Scan,
    views: list[tuple[Camera, Projection]],
    colour_by: str,
    out: Path,
    class_names: tuple[str, ...] = (),
) -> Path:
    """Points projected on each camera image, coloured by depth or label: the calibration check."""
    if colour_by == "label" and scan.labels is None:
        raise ValueError(f"scan {scan.scan_id} has no labels to colour by")
    cols = min(3, len(views))
    rows = -(-len(views) // cols)
    first = views[0][0].image_size
    panel_w = 6.0 if cols > 1 else 10.0
    size = (panel_w * cols, rows * panel_w * first[0] / first[1] + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    mappable = None
    present: set[int] = set()
    palette = class_colours(len(class_names))
    for ax, (camera, proj) in zip(axes.ravel(), views):
        ax.imshow(load_image(camera.image_path))
        if colour_by == "depth":
            mappable = ax.scatter(proj.uv[:, 0], proj.uv[:, 1], c=proj.depth, cmap="turbo", s=3, vmin=0, vmax=50, linewidths=0)
        else:
            labels = scan.labels[proj.point_index]
            keep = labels != IGNORE_INDEX
            present.update(np.unique(labels[keep]).tolist())
            ax.scatter(proj.uv[keep, 0], proj.uv[keep, 1], c=palette[labels[keep]], s=3, linewidths=0)
        ax.set_title(f"{camera.name}: {len(proj)} points", fontsize=10)
        ax.set_axis_off()
    for ax in axes.ravel()[len(views):]:
        ax.set_axis_off()
    fig.suptitle(f"scan {scan.scan_id}: lidar points coloured by {colour_by}")
    if mappable is not None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.6, label="depth [m]")
    elif present:
        handles = [plt.Line2D([], [], marker="o", ls="", color=palette[c], label=class_names[c]) for c in sorted(present)]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(8, len(handles)), fontsize=9, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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
    return plt.get_cmap("coolwarm")((np.asarray(values) + 1.0) / 2.0)[:, :3]


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
    def fit(cls, features: np.ndarray, max_rows: int = 20000) -> "PcaBasis":
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


def scan_figure(scan, kind: str, out: Path, title: str, query: int | None = None, basis: PcaBasis | None = None) -> Path:
    """A scan's features (stages/scan_features.ScanFeatures) in bird's-eye view and on the image
    of every camera that has one: coloured by the cosine similarity of each feature to the query
    row's (`kind="correlation"`, blue -1 to red +1, the paper's Fig. 1) or by `basis`'s PCA colours
    (`kind="pca"`; fitted on this scan when not given)."""
    if kind == "correlation":
        colours = similarity_rgb(cosine_to(scan.features, query))
    else:
        colours = (basis or PcaBasis.fit(scan.features)).rgb(scan.features)
    cameras = [c for c in scan.cameras if c.image is not None]
    panels = 1 + len(cameras)
    cols = min(3, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 5.2 * rows + 0.8), layout="constrained", squeeze=False)
    star = dict(marker="*", s=250, c="black", edgecolors="white", linewidths=1.0)
    ax = axes[0, 0]
    ax.scatter(scan.xyz[:, 0], scan.xyz[:, 1], c=colours, s=2, linewidths=0)
    if kind == "correlation":
        ax.scatter(scan.xyz[query, 0], scan.xyz[query, 1], label="query point", **star)
        ax.legend(loc="upper right")
    ax.set_aspect("equal")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_title(f"bird's-eye view, {len(scan.xyz):,} points")
    ax.set_facecolor("0.15")
    for ax, cam in zip(axes.ravel()[1:], cameras):
        ax.imshow(cam.image)
        ax.scatter(cam.pixels[:, 0], cam.pixels[:, 1], c=colours[cam.rows], s=4, linewidths=0)
        if kind == "correlation" and np.any(cam.rows == query):
            qpix = cam.pixels[np.flatnonzero(cam.rows == query)[0]]
            ax.scatter([qpix[0]], [qpix[1]], **star)
        ax.set_title(f"{cam.name}: {len(cam.rows):,} points", fontsize=10)
        ax.set_axis_off()
    for ax in axes.ravel()[panels:]:
        ax.set_axis_off()
    if kind == "correlation":
        mappable = plt.cm.ScalarMappable(norm=plt.Normalize(-1, 1), cmap="coolwarm")
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.6, label="cosine similarity to the query point's feature (centred)")
    fig.suptitle(title + (f"\nquery: {scan.describe(query)}" if kind == "correlation" else "") + (f"\n({scan.note})" if scan.note else ""), fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
