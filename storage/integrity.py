"""The integrity gate: everything about a store that can be checked without decoding a chunk,
one line per problem naming the file. Every reader runs it when it opens a store
(`FeatureStore(path)`); `verify` (storage/verify.py) runs it and then decodes everything.

Every chunk ends with a CRC-32C (Zarr's `crc32c` codec): a truncated or altered chunk fails to
decode with an error instead of reading as garbage. Each part's record (in its manifest's schema
metadata) holds, per array, its shape, dtype, the byte size of every chunk file and the SHA-256 of
the array's decoded bytes. The gate checks the attributes, that the plan is complete, that every
manifest agrees with its rows, its record and its arrays' metadata, and that every chunk file is
there with its recorded size (one stat per chunk file, run on threads).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from pipeline.errors import PathError
from pipeline.files import read_regular
from storage.layout import (
    FORMAT,
    FORMAT_VERSION,
    LAYOUTS,
    QUANTIZE,
    REQUIRED_KEYS,
    ArraySpec,
    StoreError,
    StorePlan,
    chunk_key,
    part_name,
)


class StoreFiles(Protocol):
    """What the gate reads of a store, without decoding a chunk (storage.feature_store.FeatureStore)."""

    path: Path
    attrs: dict
    plan: StorePlan
    layout: str
    specs: dict[str, ArraySpec]

    def committed_parts(self) -> list[int]: ...
    def planned_committed_parts(self) -> list[int]: ...
    def read_part_manifest(self, part: int) -> tuple[pa.Table, dict]: ...
    def manifest_path(self, part: int) -> Path: ...
    def part_folder(self, part: int) -> Path: ...


def integrity_problems(store: StoreFiles) -> list[str]:
    """Everything that can be checked without decoding a chunk, one line per problem naming
    the file: attributes, plan completeness, each part's manifest against its rows, its
    record and its arrays' metadata, each chunk file's presence and size."""
    problems = store_problems(store)
    if not attrs_usable(store):
        return problems
    parts = store.planned_committed_parts()
    with ThreadPoolExecutor(max_workers=8) as pool:  # stat-bound: threads hide file-system latency
        for found in pool.map(lambda part: part_problems(store, part), parts):
            problems += found
    return problems


def attrs_usable(store: StoreFiles) -> bool:
    return not attribute_problems(store.path, store.attrs)


def store_problems(store: StoreFiles) -> list[str]:
    """The store as a whole: attributes, and every planned part committed (and no other)."""
    problems = attribute_problems(store.path, store.attrs)
    if problems:
        return problems
    plan = store.plan
    committed = set(store.committed_parts())
    missing = [p for p in range(plan.parts) if p not in committed]
    if missing:
        listed = ", ".join(part_name(p) for p in missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        problems.append(
            f"{store.path}: {len(missing)} of {plan.parts} planned parts are not committed ({listed}); rerun the "
            "same extract-features command to finish it"
        )
    extra = sorted(committed - set(range(plan.parts)))
    if extra:
        problems.append(f"{store.path / 'manifest'}: parts {extra} are outside the plan of {plan.parts} parts")
    return problems


def part_problems(store: StoreFiles, part: int) -> list[str]:
    """One committed part: its manifest rows against the plan and its record, its arrays'
    metadata against both, its chunk files' presence and sizes."""
    try:
        table, record = store.read_part_manifest(part)
    except StoreError as err:
        return [str(err)]
    where = store.manifest_path(part)
    rows = table.to_pydict()
    problems = []
    expected = {(s, c) for s in store.plan.scans_of(part) for c in store.attrs["cameras"]}
    present = set(zip(rows["scan_index"], rows["camera"]))
    if present != expected or len(rows["camera"]) != len(expected):
        lost, extra = sorted(expected - present)[:5], sorted(present - expected)[:5]
        problems.append(
            f"{where}: entries do not match the plan (missing {lost}, unexpected {extra}, {len(rows['camera'])} "
            f"rows for {len(expected)} entries)"
        )
    offset, grids = 0, 0
    with_grids = store.layout == "grid"
    for scan_id, camera, p, o, n, g in zip(
        rows["scan_id"], rows["camera"], rows["part"], rows["offset"], rows["count"], rows["grid"]
    ):
        if p != part or o != offset or n < 0:
            return problems + [
                f"{where}: row {scan_id}/{camera} has part {p}, offset {o}, count {n}; after the previous rows it "
                f"must be part {part}, offset {offset}"
            ]
        if g != (grids if with_grids and n > 0 else -1):
            return problems + [
                f"{where}: row {scan_id}/{camera} has grid {g}; after the previous rows it must be "
                f"{grids if with_grids and n > 0 else -1}"
            ]
        offset, grids = offset + n, grids + (g >= 0)
    if record.get("rows") != offset:
        return problems + [
            f"{where}: the rows' counts add up to {offset} points but the part recorded {record.get('rows')}"
        ]
    folder = store.part_folder(part)
    for name, spec in store.specs.items():
        length = offset if spec.per == "point" else grids
        array_record = record.get("arrays", {}).get(name)
        problems += array_problems(folder / name, array_record, (length, *spec.tail), spec.dtype, spec.codec_names())
    return problems


def read_root_attributes(path: Path) -> dict:
    meta = path / "zarr.json"
    if not meta.is_file():
        raise StoreError(f"{path}: not a feature store (no zarr.json)")
    try:
        attrs = json.loads(meta.read_bytes())["attributes"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise StoreError(f"{meta}: corrupt store metadata ({type(err).__name__}: {err})") from None
    except OSError as err:
        raise StoreError(f"{meta}: unreadable ({err.strerror})") from None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise StoreError(
            f"{path}: not a scalr feature store (format {attrs.get('format') if isinstance(attrs, dict) else attrs!r})"
        )
    if attrs.get("format_version") != FORMAT_VERSION:
        why = {
            2: " (its targets use scalr 0.1's pixel, border and resize rules, not the released code's)",
            3: " (float32 PandaSet points and float64 nuScenes projection, not the released code's number types)",
        }.get(attrs.get("format_version"), "")
        raise StoreError(
            f"{path}: store format version {attrs.get('format_version')!r}{why}, this scalr reads version "
            f"{FORMAT_VERSION}; extract it again with this scalr into a new --out"
        )
    return attrs


def attribute_problems(path: Path, attrs: dict) -> list[str]:
    where = path / "zarr.json"
    missing = [k for k in REQUIRED_KEYS if k not in attrs]
    if missing:
        return [f"{where}: attributes lack {missing}"]
    teacher, size, plan = attrs["teacher"], attrs["image_size"], attrs["plan"]
    dim = teacher.get("dim") if isinstance(teacher, dict) else None
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        return [f"{where}: teacher dimension {dim!r} is not a positive integer"]
    student = isinstance(teacher, dict) and teacher.get("kind") == "student"  # `scalr embed`: no image
    if not (student and size is None) and not (
        isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    ):
        return [f"{where}: image_size {size!r} is not [height, width]"]
    if attrs.get("dtype", "float16") not in ("float16", "float32") or (attrs.get("dtype") == "float32" and not student):
        return [f"{where}: dtype {attrs.get('dtype')!r} is not float16 (teacher stores) or float32 (student stores)"]
    if not (
        isinstance(plan, dict)
        and set(plan) == {"scans", "scans_per_part"}
        and all(isinstance(v, int) and v > 0 for v in plan.values())
    ):
        return [f"{where}: plan {plan!r} is not {{scans, scans_per_part}} of positive integers"]
    if not (
        isinstance(attrs["cameras"], list) and attrs["cameras"] and all(isinstance(c, str) for c in attrs["cameras"])
    ):
        return [f"{where}: cameras {attrs['cameras']!r} is not a list of camera names"]
    layout, quantize, grid_size = attrs["layout"], attrs["quantize"], attrs["grid_size"]
    if (
        layout not in LAYOUTS
        or quantize not in QUANTIZE
        or (layout == "points" and (quantize != "none" or grid_size is not None))
    ):
        return [
            f"{where}: layout {layout!r} with quantize {quantize!r} and grid_size {grid_size!r} is not one of the "
            "store layouts"
        ]
    if layout == "grid" and not (
        isinstance(grid_size, list) and len(grid_size) == 2 and all(isinstance(v, int) and v > 0 for v in grid_size)
    ):
        return [f"{where}: grid_size {grid_size!r} is not [rows, columns] of tokens"]
    return []


def array_problems(
    folder: Path, record: dict | None, shape: tuple[int, ...], dtype: str, codecs: list[str]
) -> list[str]:
    """One array of a part against the manifest's rows and the part's record, without decoding.
    The chunking is the one the record says was written (a later scalr may chunk otherwise); the
    codecs must be the store's own: a foreign one (Zarr can name a pickling codec) is never run."""
    if not isinstance(record, dict):
        return [f"{folder}: no integrity record for this array in the manifest"]
    chunk_rows = record.get("chunk_rows")
    if not isinstance(chunk_rows, int) or chunk_rows <= 0:
        return [f"{folder}: the part's record has no valid chunk_rows ({chunk_rows!r})"]
    try:
        meta = json.loads(read_regular(folder / "zarr.json"))
        on_disk = (tuple(meta["shape"]), meta["data_type"], tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]))
        on_disk_codecs = [c["name"] for c in meta["codecs"]]
    except FileNotFoundError:
        return [f"{folder / 'zarr.json'}: array metadata is missing"]
    except PathError as err:
        return [str(err)]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        return [f"{folder / 'zarr.json'}: corrupt array metadata ({type(err).__name__}: {err})"]
    if on_disk_codecs != codecs:
        return [
            f"{folder / 'zarr.json'}: codecs {on_disk_codecs} are not the store's {codecs}: refused (never decoded)"
        ]
    expected = (shape, dtype, (chunk_rows, *shape[1:]))
    if on_disk != expected or tuple(record.get("shape", ())) != shape:
        return [
            f"{folder}: array is {on_disk[0]} {on_disk[1]} in chunks of {on_disk[2]}; the manifest and the part's "
            f"record say {shape} {dtype} in chunks of {expected[2]}"
        ]
    sizes = record.get("chunk_bytes", [])
    chunks = -(-shape[0] // chunk_rows)
    if len(sizes) != chunks:
        return [f"{folder}: the part's record lists {len(sizes)} chunk files, the shape needs {chunks}"]
    problems, absent = [], []
    base, ndim = str(folder), len(shape)
    for i, size in enumerate(sizes):  # plain os.stat on strings: ~3x faster than Path.stat here
        path = f"{base}/{chunk_key(i, ndim)}"
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError:
            absent.append(i)
            continue
        if actual != size:
            problems.append(f"{path}: chunk file is {actual} bytes, {size} were written (truncated or overwritten)")
    if absent:
        problems.insert(
            0,
            f"{folder}: {len(absent)} of {chunks} chunk files are missing (chunks "
            f"{absent[:10]}{' ...' if len(absent) > 10 else ''})",
        )
    return problems
