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
