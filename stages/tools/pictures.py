"""PNG pictures: points projected on the camera images (the calibration check), a scan's features
as PCA colours or as the similarity to a query point (the paper's Fig. 1) in bird's-eye view and on
every camera's image, for a store (`inspect --plot`) or a student (`plot-features`), and the
feature-norm histogram of a store. Drawn on matplotlib Figures: no pyplot, no global backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline.datasets.base import load_image
from pipeline.errors import ConfigError, NotFoundError
from pipeline.geometry import Projection
from pipeline.scan import IGNORE_INDEX, Camera, Scan
from stages.tools.colours import PcaBasis, class_colours, cosine_to, similarity_rgb
from stages.tools.scan_features import ScanFeatures, StoreScans, StudentScans, pick_query
from storage.feature_store import FeatureStore, StoreError


def projection_figure(
    scan: Scan,
    views: list[tuple[Camera, Projection]],
    colour_by: str,
    out: Path,
    class_names: tuple[str, ...] = (),
) -> Path:
    """Points projected on each camera image, coloured by depth or label: the calibration check."""
    if colour_by == "label" and scan.labels is None:
        raise ConfigError(f"scan {scan.scan_id} has no labels to colour by")
    cols = min(3, len(views))
    rows = -(-len(views) // cols)
    first = views[0][0].image_size
    panel_w = 6.0 if cols > 1 else 10.0
    size = (panel_w * cols, rows * panel_w * first[0] / first[1] + 1.2)
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    mappable = None
    present: set[int] = set()
    palette = class_colours(len(class_names))
    for ax, (camera, proj) in zip(axes.ravel(), views):
        ax.imshow(load_image(camera.image_path))
        if colour_by == "depth":
            mappable = ax.scatter(
                proj.uv[:, 0], proj.uv[:, 1], c=proj.depth, cmap="turbo", s=3, vmin=0, vmax=50, linewidths=0
            )
        else:
            labels = scan.labels[proj.point_index]
            keep = labels != IGNORE_INDEX
            present.update(np.unique(labels[keep]).tolist())
            ax.scatter(proj.uv[keep, 0], proj.uv[keep, 1], c=palette[labels[keep]], s=3, linewidths=0)
        ax.set_title(f"{camera.name}: {len(proj)} points", fontsize=10)
        ax.set_axis_off()
    for ax in axes.ravel()[len(views) :]:
        ax.set_axis_off()
    fig.suptitle(f"scan {scan.scan_id}: lidar points coloured by {colour_by}")
    if mappable is not None:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.6, label="depth [m]")
    elif present:
        handles = [Line2D([], [], marker="o", ls="", color=palette[c], label=class_names[c]) for c in sorted(present)]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(8, len(handles)), fontsize=9, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def scan_figure(
    scan: ScanFeatures, kind: str, out: Path, title: str, query: int | None = None, basis: PcaBasis | None = None
) -> Path:
    """A scan's features in bird's-eye view and on the image
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
    fig = Figure(figsize=(6.5 * cols, 5.2 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    star = {"marker": "*", "s": 250, "c": "black", "edgecolors": "white", "linewidths": 1.0}
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
        mappable = ScalarMappable(norm=Normalize(-1, 1), cmap=matplotlib.colormaps["coolwarm"])
        fig.colorbar(
            mappable,
            ax=axes.ravel().tolist(),
            shrink=0.6,
            label="cosine similarity to the query point's feature (centred)",
        )
    fig.suptitle(
        title
        + (f"\nquery: {scan.describe(query)}" if kind == "correlation" else "")
        + (f"\n({scan.note})" if scan.note else ""),
        fontsize=11,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def norm_histogram_figure(stats: dict, store: FeatureStore, out: Path) -> Path:
    counts, edges = stats["norm_histogram"]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue", edgecolor="white")
    ax.set_xlabel(f"L2 norm of a stored {'feature' if stats['what'] == 'features' else 'grid token'}")
    ax.set_ylabel("rows")
    ax.set_title(
        f"{store.attrs['teacher']['name']}: {stats['rows']:,} rows, {stats['zero_norm_rows']:,} of norm 0", fontsize=10
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def plot_entry(
    store: FeatureStore,
    scan_id: str,
    camera: str | None,
    out_dir: Path,
    point: int | None = None,
    class_name: str | None = None,
    pca_from: FeatureStore | None = None,
) -> list[Path]:
    """The cached features of one scan (every camera, or only `camera`): the correlation map to
    a query point and the PCA colours, in bird's-eye view and on each camera's image (images and
    labels from the raw dataset when it is still there). PCA colours are fitted once on the store
    (or on `pca_from`, a store of the same feature size, to compare two stores in one palette)."""
    if pca_from is not None and pca_from.dim != store.dim:
        raise StoreError(f"--pca-from {pca_from.path}: features of {pca_from.dim} dims, {store.path} has {store.dim}")
    scans = StoreScans(store)
    basis = StoreScans(pca_from).pca() if pca_from is not None else scans.pca()
    if scan_id not in scans.scan_ids:
        raise NotFoundError(
            f"{store.path}: no stored point for scan {scan_id!r} (scans with points: {len(scans.scan_ids)}; "
            f"`scalr inspect {store.path}` lists the entries)"
        )
    scan = scans.load(scan_id)
    return _scan_pictures(
        scan if camera is None else scan.only(camera),
        f"{store.attrs['teacher']['name']}-{store.attrs['dataset']['name']}",
        camera,
        out_dir,
        point,
        class_name,
        basis,
    )


def plot_student(
    checkpoint: Path,
    dataset: str,
    root: Path,
    split: str,
    scan_id: str,
    camera: str | None,
    out_dir: Path,
    point: int | None = None,
    class_name: str | None = None,
    recipe: str | None = None,
) -> list[Path]:
    """The same pictures for a student's backbone features on a raw scan (PCA fitted once for the
    checkpoint, on the split's first scan). `recipe`: see `StudentScans`."""
    scans = StudentScans(checkpoint, dataset, root, split, recipe)
    scan = scans.load(scan_id)
    return _scan_pictures(
        scan if camera is None else scan.only(camera),
        f"student-{scans.run_name}-{dataset}",
        camera,
        out_dir,
        point,
        class_name,
        scans.pca(),
    )


def _scan_pictures(
    scan: ScanFeatures,
    prefix: str,
    camera: str | None,
    out_dir: Path,
    point: int | None,
    class_name: str | None,
    basis: PcaBasis,
) -> list[Path]:
    query = pick_query(scan, point, class_name)
    # the prefix names the dataset: PandaSet's two lidars share scan ids
    stem = f"{prefix}-{scan.scan_id}-{camera or 'all-cameras'}"
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)
    title = f"{scan.source}: scan {scan.scan_id}, {camera or 'every camera'}"
    return [
        scan_figure(
            scan, "correlation", Path(out_dir) / f"{stem}-correlation.png", title + ", feature correlation", query
        ),
        scan_figure(
            scan,
            "pca",
            Path(out_dir) / f"{stem}-pca.png",
            title + ", PCA of features (fitted once for the store or run)",
            basis=basis,
        ),
    ]
