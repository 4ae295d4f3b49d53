"""verify: check a feature store end to end, without trusting anything it says about itself.

The cheap checks are the integrity gate every reader runs (storage/integrity.py);
verify adds what needs the data itself: every chunk decoded (each one's CRC-32C checked by the
codec), the SHA-256 of every array's decoded bytes compared with the one recorded at commit, no
NaN or infinite value, and the recorded teacher compared with the teacher registry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from storage.feature_store import FeatureStore, StoreError, part_name
from storage.integrity import attrs_usable, part_problems, store_problems


def verify_store(path, teachers: Mapping[str, tuple[int, int]] | None = None) -> tuple[list[str], dict]:
    """(problems, counts). `teachers` maps a registered teacher name to its (dim, patch); when
    given, the store's teacher must be one of them with the same dimension and patch."""
    try:
        store = FeatureStore(path, check=False)
    except StoreError as err:
        return [str(err)], {}
    problems = store_problems(store)
    if not attrs_usable(store):
        return problems, {}
    if (
        teachers is not None and store.attrs["teacher"].get("kind") != "student"
    ):  # a student store names its checkpoint instead
        problems += _teacher_problems(store, teachers)
    counts = {"parts": store.plan.parts, "entries": 0, "points": 0, "skipped": 0}
    for part in store.planned_committed_parts():
        cheap = part_problems(store, part)
        problems += cheap or _content_problems(store, part)
        if not cheap:
            rows = store.read_part_manifest(part)[0].to_pydict()
            counts["entries"] += len(rows["count"])
            counts["points"] += sum(rows["count"])
            counts["skipped"] += sum(s == "skipped" for s in rows["status"])
    return problems, counts


def _teacher_problems(store: FeatureStore, teachers: Mapping[str, tuple[int, int]]) -> list[str]:
    teacher = store.attrs["teacher"]
    where = store.path / "zarr.json"
    name = teacher.get("name")
    if name not in teachers:
        return [f"{where}: teacher {name!r} is not in the teacher registry"]
    dim, patch = teachers[name]
    if (teacher.get("dim"), teacher.get("patch")) != (dim, patch):
        return [
            f"{where}: teacher {name} is recorded with dim {teacher.get('dim')}, patch {teacher.get('patch')}; "
            f"the registry's {name} has dim {dim}, patch {patch}"
        ]
    return []


def _content_problems(store: FeatureStore, part: int) -> list[str]:
    """Decode every chunk of a part whose files passed the cheap checks; compare checksums."""
    record = store.part_record(part)
    folder = store.path / "parts" / part_name(part)
    problems = []
    try:
        arrays = store.arrays(part)
    except StoreError as err:
        return [str(err)]
    for name in store.specs:
        arr, digest = arrays[name], hashlib.sha256()
        rows_per_chunk = arr.chunks[0]
        for start in range(0, arr.shape[0], rows_per_chunk):
            last = min(start + rows_per_chunk, arr.shape[0]) - 1
            where = f"{folder / name}: chunk {start // rows_per_chunk} (rows {start}-{last})"
            try:
                block = arr[start : start + rows_per_chunk]
            except Exception as err:  # noqa: BLE001 - checksum mismatch, truncated or corrupt chunk
                problems.append(f"{where} is corrupt ({type(err).__name__}: {err})")
                digest = None
                break
            digest.update(np.ascontiguousarray(block).tobytes())
            if block.dtype.kind == "f" and not np.isfinite(block).all():
                bad = int((~np.isfinite(block)).reshape(len(block), -1).any(axis=1).sum())
                problems.append(f"{where}: {bad} rows with NaN or infinite values")
        if digest is not None and digest.hexdigest() != record["arrays"][name]["sha256"]:
            problems.append(
                f"{folder / name}: content differs from what was written (SHA-256 of the decoded bytes does not "
                "match the part's record)"
            )
    return problems
