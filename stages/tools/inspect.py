"""inspect: what a feature store holds: summary, one entry, feature statistics computed out of core
with dask (the store can be far larger than memory), and with --plot its pictures (pictures.py)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from stages.tools.pictures import norm_histogram_figure, plot_entry
from storage.feature_store import FeatureStore, StoreError


@dataclass(frozen=True)
class InspectConfig:
    store: Path
    scan: str | None = None
    camera: str | None = None
    stats: bool = False
    plot_dir: Path | None = None  # with scan: its pictures (every camera, or `camera`); with stats: the norm histogram
    point: int | None = None  # query point of the correlation map (index in the raw scan)
    class_name: str | None = None  # or a point of this class
    pca_from: Path | None = None  # PCA colours fitted on this store instead (same feature size)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def summary_lines(store: FeatureStore) -> list[str]:
    a = store.attrs
    t = a["teacher"]
    m = store.manifest().to_pylist()
    weights = (
        f"RANDOM-INIT ({t['weights']}): not a pretrained teacher"
        if t["random_init"]
        else f"weights sha256 {t['weights']}"
    )
    points = sum(r["count"] for r in m)
    size = disk_bytes(store.path)
    lines = [
        f"store      {store.path}",
        f"teacher    {t['name']} ({t['timm_name']}), dim {t['dim']}, patch {t['patch']}, {weights}"
        if t.get("kind") != "student"
        else f"student    {t['checkpoint']} ({t['stage']}; depth {t['depth']}, width {t['dim']}, {t['norm']} norm), "
        f"checkpoint sha256 {t['weights']}",
        f"images     resized to {a['image_size'][0]} x {a['image_size'][1]}; {a['projection']}"
        if a["image_size"]
        else f"points     {a['projection']}",
        f"layout     {_layout_line(a)}",
        f"dataset    {a['dataset']['name']} {a['dataset']['split']}: {a['dataset']['scans']} scans (root when "
        f"extracted: {a['dataset_root']})",
        f"parts      {len(store.committed_parts())} of {store.plan.parts} committed",
        f"entries    {len(m)} (scan, camera), {sum(r['status'] == 'skipped' for r in m)} skipped",
        f"points     {points:,}",
        f"on disk    {size / 2**20:,.1f} MiB, {size / max(len(m), 1) / 1024:,.1f} KiB per entry = "
        f"{size / max(points * t['dim'] * 2, 1):.3f} x (points x dim x 2 bytes)",
        f"{'camera':<18}{'entries':>9}{'empty':>7}{'points':>12}{'mean':>9}",
    ]
    per_cam: dict[str, list[int]] = defaultdict(list)
    for r in m:
        if r["status"] == "ok":
            per_cam[r["camera"]].append(r["count"])
    for cam, counts in per_cam.items():
        lines.append(
            f"{cam:<18}{len(counts):>9}{sum(c == 0 for c in counts):>7}{sum(counts):>12,}{np.mean(counts):>9,.0f}"
        )
    skipped = [r for r in m if r["status"] == "skipped"]
    if skipped:
        lines.append("skipped entries:")
        lines += [f"  {r['scan_id']} {r['camera']}: {r['reason']}" for r in skipped]
    if a.get("index_problems"):
        lines.append("bad index files passed over at extraction (--on-error skip):")
        lines += [f"  {p}" for p in a["index_problems"]]
    return lines


def _layout_line(a: dict) -> str:
    if a["layout"] == "points":
        return "points: a float16 feature per visible point"
    h, w = a["grid_size"]
    kind = "int8 with a float32 scale per token" if a["quantize"] == "int8" else "float16"
    return f"grid: each image's {h} x {w} token grid ({kind}), targets sampled at the points' pixels when read"


def entry_lines(store: FeatureStore, scan: str, camera: str) -> list[str]:
    row, data = store.entry(scan, camera)
    lines = [
        f"entry {scan} / {camera}: part {row['part']}, offset {row['offset']}, count {row['count']}, status "
        f"{row['status']} {row['reason']}".rstrip()
    ]
    lines.append(f"  scan has {row['scan_points']:,} points; image {row['image_width']}x{row['image_height']}")
    if row["count"]:
        f = data["features"].astype(np.float32)
        norms = np.linalg.norm(f, axis=1)
        lines.append(f"  feature norms: mean {norms.mean():.3f}, min {norms.min():.3f}, max {norms.max():.3f}")
        lines.append(
            f"  pixel columns {data['pixel'][:, 0].min():.0f}-{data['pixel'][:, 0].max():.0f}, rows "
            f"{data['pixel'][:, 1].min():.0f}-{data['pixel'][:, 1].max():.0f}"
        )
        depth = np.linalg.norm(data["points"][:, :3], axis=1)
        index = data["point_index"]
        lines.append(f"  point index {index.min()}-{index.max()}; depth range {depth.min():.1f}-{depth.max():.1f} m")
    return lines


NORM_BINS = 24


def feature_statistics(store: FeatureStore) -> dict:
    """Per-channel mean/variance, norm statistics, a norm histogram and the zero-norm rows over
    every stored feature (points layout) or token (grid layout: the per-point targets are bilinear
    mixes of these), out of core; and each camera's visible fraction of its scans' points."""
    visible = camera_visible_fractions(store)
    parts = [_stored_vectors(store.arrays(p)) for p in store.committed_parts()]
    parts = [p for p in parts if p.shape[0]]
    if not parts:
        return {"rows": 0, "what": "features", "visible": visible}
    f = da.concatenate(parts, axis=0)
    norms = da.sqrt((f * f).sum(axis=1))
    try:
        mean, var, n_mean, n_std, n_min, n_max, zero = da.compute(
            f.mean(axis=0), f.var(axis=0), norms.mean(), norms.std(), norms.min(), norms.max(), (norms == 0).sum()
        )
        counts, edges = da.histogram(
            norms, bins=NORM_BINS, range=(0.0, max(float(n_max), 1e-6))
        )  # a second pass: the range needs the maximum
        counts = counts.compute()
    except Exception as err:  # noqa: BLE001 - a chunk failing its checksum mid-way
        raise StoreError(
            f"{store.path}: a features chunk failed to decode ({type(err).__name__}: {err}); run `scalr verify "
            f"{store.path}`"
        ) from None
    return {
        "what": "features" if store.layout == "points" else "tokens",
        "rows": int(f.shape[0]),
        "channel_mean": mean,
        "channel_var": var,
        "norm_mean": float(n_mean),
        "norm_std": float(n_std),
        "norm_min": float(n_min),
        "norm_max": float(n_max),
        "zero_norm_rows": int(zero),
        "norm_histogram": (counts, np.asarray(edges)),
        "visible": visible,
    }


def camera_visible_fractions(store: FeatureStore) -> dict[str, tuple[float, float, float]]:
    """camera -> (mean, min, max) over its stored entries of the fraction of the scan's points it
    sees (from the manifest alone)."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in store.manifest().to_pylist():
        if r["status"] == "ok" and r["scan_points"] > 0:
            out[r["camera"]].append(r["count"] / r["scan_points"])
    return {cam: (float(np.mean(v)), float(np.min(v)), float(np.max(v))) for cam, v in out.items()}


def _stored_vectors(arrays: dict) -> da.Array:
    """(rows, D) float32: the features, or the grids' tokens (dequantised), lazily."""
    if "features" in arrays:
        return da.from_zarr(arrays["features"]).astype(np.float32)
    grids = da.from_zarr(arrays["grids"]).astype(np.float32)
    if "grid_scale" in arrays:
        grids = grids * da.from_zarr(arrays["grid_scale"])[:, None]
    return grids.transpose(0, 2, 3, 1).reshape(-1, grids.shape[1])


def stats_lines(stats: dict) -> list[str]:
    lines = ["visible fraction of each scan's points, per camera (mean, min - max over entries):"]
    lines += [f"  {cam:<18}{mean:>7.1%}  ({lo:.1%} - {hi:.1%})" for cam, (mean, lo, hi) in stats["visible"].items()]
    if not stats["rows"]:
        return lines + ["feature statistics: no rows"]
    var = stats["channel_var"]
    top = np.argsort(var)[::-1][:5]
    what = "points" if stats["what"] == "features" else "grid tokens"
    lines += [
        f"feature statistics over {stats['rows']:,} {what} (dask, out of core):",
        f"  norm mean {stats['norm_mean']:.3f}, std {stats['norm_std']:.3f}, min {stats['norm_min']:.3f}, max "
        f"{stats['norm_max']:.3f}",
        f"  zero-norm rows: {stats['zero_norm_rows']:,}"
        + (" (features that carry nothing: check the teacher and the projection)" if stats["zero_norm_rows"] else ""),
        f"  channel mean: {stats['channel_mean'].mean():+.4f} on average (min {stats['channel_mean'].min():+.3f}, "
        f"max {stats['channel_mean'].max():+.3f})",
        f"  channel variance: mean {var.mean():.4f}; largest at channels {top.tolist()} "
        f"({', '.join(f'{v:.3f}' for v in var[top])})",
        "  norm histogram:",
    ]
    counts, edges = stats["norm_histogram"]
    widest = max(int(counts.max()), 1)
    lines += [
        f"  {lo:8.3f} - {hi:8.3f} {n:>12,} {'#' * round(40 * n / widest)}"
        for lo, hi, n in zip(edges[:-1], edges[1:], counts)
    ]
    return lines


def inspect(cfg: InspectConfig) -> list[str]:
    store = FeatureStore(cfg.store)
    lines = summary_lines(store)
    if cfg.scan:
        cameras = [cfg.camera] if cfg.camera else store.attrs["cameras"]
        for cam in cameras:
            lines += entry_lines(store, cfg.scan, cam)
    if cfg.stats:
        stats = feature_statistics(store)
        lines += stats_lines(stats)
        if cfg.plot_dir and stats["rows"]:
            lines.append(
                f"plot: {norm_histogram_figure(stats, store, Path(cfg.plot_dir) / f'{store.path.stem}-norms.png')}"
            )
    if cfg.plot_dir and cfg.scan:
        pca_from = FeatureStore(cfg.pca_from) if cfg.pca_from else None
        lines += [
            f"plot: {path}"
            for path in plot_entry(store, cfg.scan, cfg.camera, cfg.plot_dir, cfg.point, cfg.class_name, pca_from)
        ]
    return lines
