"""inspect: what a feature store holds: summary, one entry, and feature statistics computed
out-of-core with dask (the store can be far larger than memory)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from storage.feature_store import FeatureStore, StoreError


@dataclass(frozen=True)
class InspectConfig:
    store: Path
    scan: str | None = None
    camera: str | None = None
    stats: bool = False
    plot_dir: Path | None = None  # with scan and camera: draw the entry's pictures here
    point: int | None = None  # query point of the correlation map
    class_name: str | None = None  # or a point of this class


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def summary_lines(store: FeatureStore) -> list[str]:
    a = store.attrs
    t = a["teacher"]
    m = store.manifest().to_pylist()
    weights = f"RANDOM-INIT ({t['weights']}): not a pretrained teacher" if t["random_init"] else f"weights sha256 {t['weights']}"
    points = sum(r["count"] for r in m)
    size = disk_bytes(store.path)
    lines = [
        f"store      {store.path}",
        f"teacher    {t['name']} ({t['timm_name']}), dim {t['dim']}, patch {t['patch']}, {weights}" if t.get("kind") != "student"
        else f"student    {t['checkpoint']} ({t['stage']}; depth {t['depth']}, width {t['dim']}, {t['norm']} norm), checkpoint sha256 {t['weights']}",
        f"images     resized to {a['image_size'][0]} x {a['image_size'][1]}; {a['projection']}" if a["image_size"] else f"points     {a['projection']}",
        f"layout     {_layout_line(a)}",
        f"dataset    {a['dataset']['name']} {a['dataset']['split']}: {a['dataset']['scans']} scans (root when extracted: {a['dataset_root']})",
        f"parts      {len(store.committed_parts())} of {store.plan.parts} committed",
        f"entries    {len(m)} (scan, camera), {sum(r['status'] == 'skipped' for r in m)} skipped",
        f"points     {points:,}",
        f"on disk    {size / 2**20:,.1f} MiB, {size / max(len(m), 1) / 1024:,.1f} KiB per entry = {size / max(points * t['dim'] * 2, 1):.3f} x (points x dim x 2 bytes)",
        f"{'camera':<18}{'entries':>9}{'empty':>7}{'points':>12}{'mean':>9}",
    ]
    per_cam: dict[str, list[int]] = defaultdict(list)
    for r in m:
        if r["status"] == "ok":
            per_cam[r["camera"]].append(r["count"])
    for cam, counts in per_cam.items():
        lines.append(f"{cam:<18}{len(counts):>9}{sum(c == 0 for c in counts):>7}{sum(counts):>12,}{np.mean(counts):>9,.0f}")
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
    lines = [f"entry {scan} / {camera}: part {row['part']}, offset {row['offset']}, count {row['count']}, status {row['status']} {row['reason']}".rstrip()]
    lines.append(f"  scan has {row['scan_points']:,} points; image {row['image_width']}x{row['image_height']}")
    if row["count"]:
        f = data["features"].astype(np.float32)
        norms = np.linalg.norm(f, axis=1)
        lines.append(f"  feature norms: mean {norms.mean():.3f}, min {norms.min():.3f}, max {norms.max():.3f}")
        lines.append(f"  pixel columns {data['pixel'][:, 0].min():.0f}-{data['pixel'][:, 0].max():.0f}, rows {data['pixel'][:, 1].min():.0f}-{data['pixel'][:, 1].max():.0f}")
        lines.append(f"  point index {data['point_index'].min()}-{data['point_index'].max()}; depth range {np.linalg.norm(data['points'][:, :3], axis=1).min():.1f}-{np.linalg.norm(data['points'][:, :3], axis=1).max():.1f} m")
    return lines


def feature_statistics(store: FeatureStore) -> dict:
    """Per-channel mean/variance and norm statistics over every stored feature (points layout) or
    token (grid layout: the per-point targets are bilinear mixes of these), out of core."""
    parts = [_stored_vectors(store.arrays(p)) for p in store.committed_parts()]
    parts = [p for p in parts if p.shape[0]]
    if not parts:
        return {"rows": 0, "what": "features"}
    f = da.concatenate(parts, axis=0)
    norms = da.sqrt((f * f).sum(axis=1))
    try:
        mean, var, n_mean, n_std, n_min, n_max = da.compute(f.mean(axis=0), f.var(axis=0), norms.mean(), norms.std(), norms.min(), norms.max())
    except Exception as err:  # noqa: BLE001 - a chunk failing its checksum mid-way
        raise StoreError(f"{store.path}: a features chunk failed to decode ({type(err).__name__}: {err}); run `scalr verify {store.path}`") from None
    return {"what": "features" if store.layout == "points" else "tokens", "rows": int(f.shape[0]), "channel_mean": mean, "channel_var": var, "norm_mean": float(n_mean), "norm_std": float(n_std), "norm_min": float(n_min), "norm_max": float(n_max)}


def _stored_vectors(arrays: dict) -> da.Array:
    """(rows, D) float32: the features, or the grids' tokens (dequantised), lazily."""
    if "features" in arrays:
        return da.from_zarr(arrays["features"]).astype(np.float32)
    grids = da.from_zarr(arrays["grids"]).astype(np.float32)
    if "grid_scale" in arrays:
        grids = grids * da.from_zarr(arrays["grid_scale"])[:, None]
    return grids.transpose(0, 2, 3, 1).reshape(-1, grids.shape[1])


def stats_lines(stats: dict) -> list[str]:
    if not stats["rows"]:
        return ["feature statistics: no rows"]
    var = stats["channel_var"]
    top = np.argsort(var)[::-1][:5]
    return [
        f"feature statistics over {stats['rows']:,} {'points' if stats['what'] == 'features' else 'grid tokens'} (dask, out of core):",
        f"  norm mean {stats['norm_mean']:.3f}, std {stats['norm_std']:.3f}, min {stats['norm_min']:.3f}, max {stats['norm_max']:.3f}",
        f"  channel mean: {stats['channel_mean'].mean():+.4f} on average (min {stats['channel_mean'].min():+.3f}, max {stats['channel_mean'].max():+.3f})",
        f"  channel variance: mean {var.mean():.4f}; largest at channels {top.tolist()} ({', '.join(f'{v:.3f}' for v in var[top])})",
    ]


def inspect(cfg: InspectConfig) -> list[str]:
    store = FeatureStore(cfg.store)
    lines = summary_lines(store)
    if cfg.scan:
        cameras = [cfg.camera] if cfg.camera else store.attrs["cameras"]
        for cam in cameras:
            lines += entry_lines(store, cfg.scan, cam)
    if cfg.stats:
        lines += stats_lines(feature_statistics(store))
    if cfg.plot_dir:
        lines += [f"plot: {path}" for path in plot_entry(store, cfg.scan, cfg.camera, cfg.plot_dir, cfg.point, cfg.class_name)]
    return lines


# ---- pictures ---------------------------------------------------------------------------------
def pick_query(labels: np.ndarray | None, class_names, wanted: str | None, xyz: np.ndarray, point: int | None) -> int | None:
    """The query point: an explicit index; else a point of class `wanted` (default "car") nearest
    to that class's centroid; else None (the figure picks the point nearest the sensor)."""
    if point is not None:
        return point
    if labels is None:
        return None
    for name in ([wanted] if wanted else ["car"]):
        if name not in class_names:
            raise KeyError(f"unknown class {name!r}; classes: {', '.join(class_names)}")
        members = np.flatnonzero(labels == class_names.index(name))
        if len(members):
            centre = xyz[members].mean(axis=0)
            return int(members[np.argmin(np.linalg.norm(xyz[members] - centre, axis=1))])
    return None


def plot_entry(store: FeatureStore, scan_id: str, camera: str, out_dir: Path, point: int | None = None, class_name: str | None = None) -> list[Path]:
    """Teacher-target correlation map and PCA of one store entry, in BEV and on the image (the image
    and labels come from the raw dataset when it is still there)."""
    from pipeline.datasets import open_dataset
    from pipeline.errors import DatasetError
    from stages.extract import load_resized
    from stages.plots import feature_figure

    row, data = store.entry(scan_id, camera)
    if row["count"] == 0:
        raise KeyError(f"{store.path}: entry {scan_id}/{camera} has no visible point to draw")
    a = store.attrs
    image = labels = class_names = None
    try:
        ds = open_dataset(a["dataset"]["name"], a["dataset_root"], a["dataset"]["split"])
        scan = ds[ds.index_of(scan_id)]
        if scan.labels is not None:
            labels, class_names = scan.labels[data["point_index"]], ds.meta.class_names
        if a["image_size"]:  # a student store (`scalr embed`) has none: bird's-eye view only
            cam = scan.camera(camera)
            image = load_resized(cam.image_path, cam.image_size, tuple(a["image_size"]))
    except (DatasetError, KeyError, OSError):
        pass  # the raw dataset is gone: bird's-eye view only
    xyz = data["points"][:, :3]
    query = pick_query(labels, class_names or (), class_name, xyz, point)
    stem = f"{a['teacher']['name']}-{scan_id.replace('/', '-')}-{camera}".replace(":", "-")
    kind = a["teacher"].get("kind", "teacher")
    title = f"{kind} {a['teacher']['name']}{' (random init)' if a['teacher']['random_init'] else ''}: {scan_id} {camera}"
    return [
        feature_figure(xyz, data["features"], Path(out_dir) / f"{stem}-correlation.png", title + ", feature correlation", "correlation", query, image, data["pixel"]),
        feature_figure(xyz, data["features"], Path(out_dir) / f"{stem}-pca.png", title + ", PCA of features", "pca", None, image, data["pixel"]),
    ]


def plot_student(checkpoint: Path, dataset: str, root: Path, split: str, scan_id: str, camera: str | None, out_dir: Path, point: int | None = None, class_name: str | None = None) -> list[Path]:
    """The same two pictures for a student's backbone features on a raw scan."""
    import torch

    from pipeline.datasets import open_dataset
    from pipeline.datasets.base import load_image
    from stages.evaluate import trained_sample_config
    from stages.plots import feature_figure
    from stages.segment import load_backbone
    from stages.student_data import collate, student_inputs

    backbone, record = load_backbone(checkpoint, 0.0)
    ds = open_dataset(dataset, root, split)
    sample = trained_sample_config(record, ds.meta)
    backbone.regrid(sample.grid.shape).eval()
    scan = ds[ds.index_of(scan_id)]
    keep, inputs = student_inputs(scan.points, ds.meta.intensity_norm, sample, np.random.default_rng(0), train=False)
    with torch.no_grad():
        features = backbone(collate([{**inputs, "scan_id": scan_id}])).numpy()
    xyz = scan.points[keep, :3]
    cam = scan.camera(camera or scan.cameras[0].name)
    proj = ds.project(scan, cam.name)
    position = np.full(scan.num_points, -1)
    position[proj.point_index] = np.arange(len(proj))
    on_image = position[keep] >= 0
    pixels = proj.uv[position[keep][on_image]]
    labels = scan.labels[keep] if scan.labels is not None else None
    query = pick_query(labels, ds.meta.class_names, class_name, xyz, point)
    image = load_image(cam.image_path)
    stem = f"student-{Path(checkpoint).parent.parent.name}-{scan_id.replace('/', '-')}-{cam.name}"
    title = f"student {record.get('stage', '')} {Path(checkpoint).parent.parent.name}: {scan_id} {cam.name}"
    return [
        feature_figure(xyz, features, Path(out_dir) / f"{stem}-correlation.png", title + ", feature correlation", "correlation", query, image, pixels, on_image),
        feature_figure(xyz, features, Path(out_dir) / f"{stem}-pca.png", title + ", PCA of features", "pca", None, image, pixels, on_image),
    ]
