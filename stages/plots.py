"""PNG figures shared by the stages (matplotlib, headless)."""

from __future__ import annotations

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


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """First three principal components mapped to RGB in [0, 1] (2nd-98th percentile stretch)."""
    f = features.astype(np.float32)
    f = f - f.mean(axis=0)
    _, _, vt = np.linalg.svd(f[:: max(1, len(f) // 20000)], full_matrices=False)
    comps = f @ vt[:3].T
    lo, hi = np.percentile(comps, 2, axis=0), np.percentile(comps, 98, axis=0)
    return np.clip((comps - lo) / np.maximum(hi - lo, 1e-8), 0, 1)


def feature_figure(
    xyz: np.ndarray,
    features: np.ndarray,
    out: Path,
    title: str,
    kind: str = "correlation",
    query: int | None = None,
    image: np.ndarray | None = None,
    pixels: np.ndarray | None = None,
    on_image: np.ndarray | None = None,
) -> Path:
    """Points coloured by the cosine similarity of their feature to a query point's (blue -1 to
    red +1; `kind="correlation"`, the paper's Fig. 1) or by the PCA of the features (`kind="pca"`),
    in bird's-eye view and, when an image is given, on the image at `pixels` (column, row) for the
    points selected by the boolean mask `on_image`."""
    if kind == "correlation":
        query = int(np.argmin(np.linalg.norm(xyz[:, :2], axis=1))) if query is None else query
        values = cosine_to(features, query)
        colours, cmap = None, plt.get_cmap("coolwarm")
    else:
        colours, values, cmap = pca_rgb(features), None, None
    panels = 2 if image is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 6.5), layout="constrained", squeeze=False)
    ax = axes[0, 0]
    kwargs = dict(s=2, linewidths=0)
    if colours is None:
        mappable = ax.scatter(xyz[:, 0], xyz[:, 1], c=values, cmap=cmap, vmin=-1, vmax=1, **kwargs)
        ax.scatter(xyz[query, 0], xyz[query, 1], marker="*", s=250, c="black", edgecolors="white", linewidths=1.0, label="query point")
        ax.legend(loc="upper right")
    else:
        ax.scatter(xyz[:, 0], xyz[:, 1], c=colours, **kwargs)
    ax.set_aspect("equal")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_title("bird's-eye view")
    ax.set_facecolor("0.15")
    if image is not None:
        ax2 = axes[0, 1]
        ax2.imshow(image)
        sel = on_image if on_image is not None else np.ones(len(xyz), bool)
        if colours is None:
            ax2.scatter(pixels[:, 0], pixels[:, 1], c=values[sel], cmap=cmap, vmin=-1, vmax=1, s=4, linewidths=0)
            if sel[query]:
                qpix = pixels[np.flatnonzero(sel) == query][0]
                ax2.scatter([qpix[0]], [qpix[1]], marker="*", s=250, c="black", edgecolors="white", linewidths=1.0)
        else:
            ax2.scatter(pixels[:, 0], pixels[:, 1], c=colours[sel], s=4, linewidths=0)
        ax2.set_axis_off()
        ax2.set_title("projected on the camera image")
    if colours is None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.8, label="cosine similarity to the query point's feature (centred)")
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
