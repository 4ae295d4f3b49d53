"""verify: check a feature store end to end, without trusting anything it says about itself."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import zarr

from storage.feature_store import ARRAYS, IDENTITY_KEYS, MANIFEST_SCHEMA, FeatureStore, StoreError, part_name


def verify_store(path) -> tuple[list[str], dict]:
    """(problems, counts). No problems means: every planned part is committed, every manifest row
    is readable and consistent with its arrays, every chunk file exists and decodes, and no
    feature is NaN or infinite."""
    try:
        store = FeatureStore(path)
    except StoreError as err:
        return [str(err)], {}
    problems: list[str] = []
    attrs = store.attrs
    missing_keys = [k for k in IDENTITY_KEYS + ("cameras",) if k not in attrs]
    if missing_keys:
        return [f"{store.path}/zarr.json: attributes lack {missing_keys}"], {}
    dim = attrs["teacher"].get("dim")
    if not isinstance(dim, int) or dim <= 0 or len(attrs["image_size"]) != 2:
        problems.append(f"{store.path}/zarr.json: incoherent attributes (teacher dim {dim!r}, image size {attrs['image_size']!r})")
        return problems, {}
    plan = store.plan
    cameras = set(attrs["cameras"])
    counts = {"parts": plan.parts, "entries": 0, "points": 0, "skipped": 0}
    for part in range(plan.parts):
        manifest = store.manifest_path(part)
        if not manifest.is_file():
            problems.append(f"{manifest}: missing (part {part} of {plan.parts} not committed; rerun extract-features to finish)")
            continue
        try:
            rows = pq.read_table(manifest, schema=MANIFEST_SCHEMA).to_pylist()
        except Exception as err:  # noqa: BLE001 - any parquet failure is a corrupt manifest
            problems.append(f"{manifest}: unreadable manifest ({err})")
            continue
        problems += _check_part(store, part, rows, dim, cameras, plan.scans_of(part))
        counts["entries"] += len(rows)
        counts["points"] += sum(r["count"] for r in rows)
        counts["skipped"] += sum(r["status"] == "skipped" for r in rows)
    return problems, counts


def _check_part(store: FeatureStore, part: int, rows: list[dict], dim: int, cameras: set[str], scans: range) -> list[str]:
    where = store.manifest_path(part)
    problems = []
    expected = {(s, c) for s in scans for c in cameras}
    present = {(r["scan_index"], r["camera"]) for r in rows}
    if present != expected:
        lost = sorted(expected - present)[:5]
        extra = sorted(present - expected)[:5]
        problems.append(f"{where}: entries do not match the plan (missing {lost}, unexpected {extra})")
    offset = 0
    for r in rows:
        if r["part"] != part or r["offset"] != offset or r["count"] < 0:
            problems.append(f"{where}: row {r['scan_id']}/{r['camera']} has part {r['part']}, offset {r['offset']}, count {r['count']}; expected part {part}, offset {offset}")
            return problems
        offset += r["count"]
    folder = store.path / "parts" / part_name(part)
    try:
        arrays = {name: zarr.open_array(str(folder / name), mode="r") for name in ARRAYS}
    except Exception as err:  # noqa: BLE001
        return problems + [f"{folder}: part arrays unreadable ({err})"]
    shapes = {name: a.shape for name, a in arrays.items()}
    if any(s[0] != offset for s in shapes.values()) or shapes["features"][1:] != (dim,):
        return problems + [f"{folder}: array shapes {shapes} do not match the manifest's {offset} rows of dimension {dim}"]
    for name, arr in arrays.items():
        if arr.nchunks_initialized != arr.nchunks:
            problems.append(f"{folder / name}: {arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunk files are missing")
            continue
        rows_per_chunk = arr.chunks[0]
        for start in range(0, offset, rows_per_chunk):
            try:
                block = arr[start : start + rows_per_chunk]
            except Exception as err:  # noqa: BLE001 - a truncated or corrupt chunk
                problems.append(f"{folder / name}: chunk {start // rows_per_chunk} (rows {start}-{start + rows_per_chunk - 1}) is corrupt ({type(err).__name__}: {err})")
                continue
            if block.dtype.kind == "f" and not np.isfinite(block).all():
                bad = int((~np.isfinite(block)).reshape(len(block), -1).any(axis=1).sum())
                problems.append(f"{folder / name}: {bad} rows with NaN or infinite values in rows {start}-{start + len(block) - 1}")
    return problems
