"""The feature store: per-point teacher targets in Zarr, keyed by (scan, camera) via Parquet.

What a store is made of (arrays, manifest columns, codecs, the plan of parts) is storage/layout.py;
the checks every reader runs when opening one are storage/integrity.py; the direct chunk reader is
storage/chunks.py. This module opens, reads and writes stores.

A part's manifest is written LAST, by atomic rename: a part without its manifest does not exist.
A writer claims a part first (`claim`: a lock that dies with its holder, storage/locks.py) and
writes it only if it is not committed, so two processes never write the same part and a committed
part is never rewritten. All arrays of a part share the same row chunking, and a writer only ever
writes whole chunks (plus the final partial one).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import zarr

from pipeline.errors import NotFoundError, PathError
from pipeline.files import read_regular
from storage.atomic import disk_errors, remove_stale_temporaries, temporary, write_atomically
from storage.chunks import read_rows, stored_axis_order  # noqa: F401 - stored_axis_order: part of the reading API
from storage.integrity import integrity_problems, read_root_attributes
from storage.layout import (  # noqa: F401 - re-exported: the names every caller imports from here
    FORMAT,
    FORMAT_VERSION,
    GRID_POINT_CHUNK_ROWS,
    IDENTITY_KEYS,
    LAYOUTS,
    MANIFEST_SCHEMA,
    PART_RECORD_KEY,
    POINT_ARRAYS,
    QUANTIZE,
    REQUIRED_KEYS,
    ArraySpec,
    StoreError,
    StorePlan,
    array_layout,
    chunk_key,
    chunk_rows_for,
    part_name,
)
from storage.locks import Lock, holder, try_lock
from storage.targets import dequantize, quantize_int8, sample_grid

log = logging.getLogger(__name__)


class FeatureStore:
    """A store on disk. Picklable: zarr arrays are opened lazily in each process.

    `check=True` (every reader) refuses a store that fails the integrity gate; the writer and
    `verify` open with `check=False` and look at the problems themselves."""

    def __init__(self, path: str | Path, check: bool = True):
        self.path = Path(path)
        self.attrs = read_root_attributes(self.path)
        self._manifest: pa.Table | None = None
        self._parts: dict[int, tuple[pa.Table, dict]] = {}  # part -> (manifest rows, integrity record), as read
        self._arrays: dict[int, dict[str, zarr.Array]] = {}
        self._pid = os.getpid()
        if check:
            problems = self.integrity_problems()
            if problems:
                shown = "\n  ".join(problems[:10]) + (
                    f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
                )
                raise StoreError(
                    f"{self.path}: refusing a damaged or unfinished feature store ({len(problems)} problem(s); "
                    f"`scalr verify` checks everything):\n  {shown}"
                )

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: str | Path, attrs: dict) -> FeatureStore:
        """Open the store at `path` for writing, creating it if absent. Creation is atomic (built
        in a temporary folder, then renamed), so concurrent ranks can all call this safely. An
        existing store must have the same identity (teacher, image size, dataset, plan, ...)."""
        path = Path(path)
        if not path.exists():
            with disk_errors(path):
                remove_stale_temporaries(path)
                tmp = temporary(path)
                try:
                    root = zarr.open_group(str(tmp), mode="w", attributes=attrs)
                    root.create_group("parts")
                    (tmp / "manifest").mkdir()
                    os.rename(tmp, path)
                except OSError as err:
                    if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise  # else another process created it first
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        store = cls(path, check=False)
        store.check_identity(attrs)
        return store

    def check_identity(self, attrs: dict) -> None:
        diffs = [k for k in IDENTITY_KEYS if _canonical(self.attrs.get(k)) != _canonical(attrs.get(k))]
        if diffs:
            details = "; ".join(
                f"{k}: store has {_short(self.attrs.get(k))}, this run {_short(attrs.get(k))}" for k in diffs
            )
            raise StoreError(
                f"{self.path}: holds a different feature store ({details}). Use another --out or delete it."
            )

    # ---- parts and manifest ---------------------------------------------------------------
    @property
    def plan(self) -> StorePlan:
        return StorePlan(**self.attrs["plan"])

    @property
    def dim(self) -> int:
        return int(self.attrs["teacher"]["dim"])

    @property
    def layout(self) -> str:
        return self.attrs["layout"]

    @property
    def specs(self) -> dict[str, ArraySpec]:
        return array_layout(self.attrs)

    def manifest_path(self, part: int) -> Path:
        return self.path / "manifest" / f"{part_name(part)}.parquet"

    def part_folder(self, part: int) -> Path:
        return self.path / "parts" / part_name(part)

    def is_committed(self, part: int) -> bool:
        return self.manifest_path(part).exists()

    def claim(self, part: int, wait: bool = False) -> Lock | None:
        """The right to write `part` (storage/locks.py): None while another process holds it;
        `wait` blocks until it is free. A writer checks `is_committed` after claiming."""
        folder = self.path / "claims"
        with disk_errors(folder):
            folder.mkdir(exist_ok=True)
            return try_lock(folder / f"{part_name(part)}.lock", wait)

    def claimed(self, parts: list[int], at_once: int = 8, wait_s: float = 1.0) -> Iterator[list[int]]:
        """Yield `parts` a few at a time, each claimed by this process and uncommitted; their claims
        are released when the caller moves on. Parts another process holds are left to it and
        waited for (until committed, or free again because their writer died); parts committed
        meanwhile are skipped. So two writers of one store share its parts."""
        pending, told = list(parts), set()
        while pending := [p for p in pending if not self.is_committed(p)]:
            locks = []
            for part in pending:
                lock = self.claim(part) if len(locks) < at_once else None
                if lock is not None and self.is_committed(part):  # committed between the look and the claim
                    lock.release()
                elif lock is not None:
                    locks.append((part, lock))
            if not locks:
                for part in sorted(set(pending) - told):
                    log.info(
                        "%s: part %d is being written by %s; waiting for it", self.path, part, self.claim_holder(part)
                    )
                told |= set(pending)
                time.sleep(wait_s)
                continue
            try:
                yield [p for p, _ in locks]
            finally:
                for _, lock in locks:
                    lock.release()

    def uncommit(self, part: int) -> None:
        """Withdraw a committed part (its manifest) so that it is written again: only when asked to
        redo it (`extract-features --redo-changed`), under its claim."""
        with self.claim(part, wait=True):
            self.manifest_path(part).unlink(missing_ok=True)
        self._parts.pop(part, None)
        self._manifest = None

    def claim_holder(self, part: int) -> str:
        return holder(self.path / "claims" / f"{part_name(part)}.lock")

    def committed_parts(self) -> list[int]:
        names = sorted(p.name for p in (self.path / "manifest").glob("part-*.parquet"))
        return [int(n[5:11]) for n in names]

    def read_part_manifest(self, part: int) -> tuple[pa.Table, dict]:
        """(rows, integrity record) of one committed part, read once; StoreError naming the file
        if unreadable."""
        if part not in self._parts:
            self._parts[part] = self._read_part_manifest(part)
        return self._parts[part]

    def _read_part_manifest(self, part: int) -> tuple[pa.Table, dict]:
        path = self.manifest_path(part)
        try:
            file = pq.ParquetFile(io.BytesIO(read_regular(path)), page_checksum_verification=True)
            table, metadata = file.read(), file.schema_arrow.metadata or {}
        except FileNotFoundError:
            raise StoreError(f"{path}: missing (part {part} is not committed)") from None
        except (OSError, PathError, pa.ArrowException) as err:
            raise StoreError(f"{path}: unreadable manifest ({type(err).__name__}: {err})") from None
        if not table.schema.remove_metadata().equals(MANIFEST_SCHEMA):
            raise StoreError(
                f"{path}: manifest columns are {table.schema.remove_metadata().names} with other types than the "
                "manifest schema"
            )
        if PART_RECORD_KEY not in metadata:
            raise StoreError(
                f"{path}: the manifest has no integrity record (written by an older scalr, or rewritten by hand)"
            )
        try:
            record = json.loads(metadata[PART_RECORD_KEY])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{path}: corrupt integrity record ({err})") from None
        if not isinstance(record, dict):
            raise StoreError(f"{path}: corrupt integrity record (not an object)")
        return table.replace_schema_metadata(None), record

    def manifest(self) -> pa.Table:
        """All committed manifest rows, ordered by scan then camera order within the part."""
        if self._manifest is None:
            tables = [self.read_part_manifest(part)[0] for part in self.planned_committed_parts()]
            self._manifest = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
        return self._manifest

    def arrays(self, part: int) -> dict[str, zarr.Array]:
        if self._pid != os.getpid():  # forked into a DataLoader worker: reopen there
            self._arrays, self._pid = {}, os.getpid()
        if part not in self._arrays:
            folder = self.part_folder(part)
            try:
                self._arrays[part] = {name: zarr.open_array(str(folder / name), mode="r") for name in self.specs}
            except Exception as err:  # noqa: BLE001 - any metadata failure is a damaged part
                raise StoreError(f"{folder}: part arrays unreadable ({type(err).__name__}: {err})") from None
        return self._arrays[part]

    def read(self, part: int, offset: int, count: int, grid: int = -1) -> dict[str, np.ndarray]:
        """The per-point arrays of one entry and its per-point `features` (float16)."""
        out = self.read_points(part, offset, count)
        out["features"] = self.read_targets(part, offset, count, grid, np.arange(count), out["pixel"])
        return out

    def read_points(
        self, part: int, offset: int, count: int, names: tuple[str, ...] = POINT_ARRAYS
    ) -> dict[str, np.ndarray]:
        """`points`, `point_index` and `pixel` (or some of them) of one entry: one slice each. A
        chunk that fails its checksum or does not decode is a StoreError naming the array and rows."""
        arrays = self.arrays(part)
        return {name: self._slice(part, name, arrays[name], offset, offset + count) for name in names}

    def read_targets(
        self, part: int, offset: int, count: int, grid: int, rows: np.ndarray, pixel: np.ndarray
    ) -> np.ndarray:
        """(len(rows), D) float16 targets of some rows of one entry, whose pixels are `pixel`. Points
        layout: a slice of `features`. Grid layout: the entry's grid (one chunk) sampled at those
        pixels with the rule stage 1 uses (storage/targets.py), in the caller's process (a
        DataLoader worker when training) and only for the rows asked for (the points a sample
        keeps): the step gets the same targets as from a points store."""
        arrays = self.arrays(part)
        if self.layout == "points":
            return self._slice(part, "features", arrays["features"], offset, offset + count)[rows]
        if len(rows) == 0 or grid < 0:
            return np.zeros((0, self.dim), np.float16)
        token_grid = self._slice(part, "grids", arrays["grids"], grid, grid + 1)[0]
        if "grid_scale" in arrays:
            token_grid = dequantize(
                token_grid, self._slice(part, "grid_scale", arrays["grid_scale"], grid, grid + 1)[0]
            )
        features = sample_grid(
            torch.from_numpy(np.asarray(token_grid, np.float32)),
            torch.from_numpy(np.ascontiguousarray(pixel)),
            tuple(self.attrs["image_size"]),
        )
        return features.to(torch.float16).numpy()  # torch's float16 conversion: ~10x numpy's

    def chunk_bytes_read(self, part: int, offset: int, count: int, grid: int = -1) -> int:
        """Bytes of the chunk files a read of this entry decodes (whole chunks are read)."""
        total = 0
        for name, spec in self.specs.items():
            rec = self.part_record(part)["arrays"][name]
            first, last = (offset, offset + count - 1) if spec.per == "point" else (grid, grid)
            if count and first >= 0:
                total += sum(rec["chunk_bytes"][first // rec["chunk_rows"] : last // rec["chunk_rows"] + 1])
        return total

    def _slice(self, part: int, name: str, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
        try:
            return read_rows(self.part_folder(part) / name, arr, start, stop)
        except Exception as err:  # noqa: BLE001 - missing file, checksum mismatch, truncated or corrupt chunk
            raise StoreError(
                f"{self.part_folder(part) / name}: rows {start}-{stop - 1} unreadable, a chunk is corrupt or "
                f"missing ({type(err).__name__}: {err}); run `scalr verify {self.path}`"
            ) from None

    def entry(self, scan_id: str, camera: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(manifest row, arrays) of one (scan, camera)."""
        m = self.manifest()
        rows = m.filter(pc.and_(pc.equal(m["scan_id"], scan_id), pc.equal(m["camera"], camera))).to_pylist()
        if not rows:
            raise NotFoundError(f"{self.path}: no entry for scan {scan_id!r}, camera {camera!r}")
        row = rows[0]
        return row, self.read(row["part"], row["offset"], row["count"], row["grid"])

    # ---- the integrity gate (storage/integrity.py) -----------------------------------------
    def integrity_problems(self) -> list[str]:
        """Everything that can be checked without decoding a chunk (see storage/integrity.py);
        caches the manifest when there is no problem."""
        problems = integrity_problems(self)
        if not problems:
            self.manifest()
        return problems

    def planned_committed_parts(self) -> list[int]:
        return sorted(set(self.committed_parts()) & set(range(self.plan.parts)))

    def part_record(self, part: int) -> dict:
        return self.read_part_manifest(part)[1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


class PartWriter:
    """Writes one part: buffers rows and writes whole chunks; `commit()` flushes the rest, records
    the part's integrity record and then publishes the manifest by atomic rename."""

    def __init__(self, store: FeatureStore, part: int):
        if store.is_committed(part):  # whoever writes a part has claimed it and found it uncommitted
            raise StoreError(f"{store.manifest_path(part)}: part {part} is committed and is never rewritten")
        self.store, self.part = store, part
        self.specs = store.specs
        self.folder = store.part_folder(part)
        with disk_errors(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)  # leftovers of a crashed writer
            zarr.open_group(str(self.folder), mode="w", attributes={"part": part})
            self.arrays = {
                name: zarr.create_array(
                    store=str(self.folder / name),
                    shape=(0, *spec.tail),
                    chunks=(spec.chunk_rows, *spec.tail),
                    dtype=spec.dtype,
                    **spec.codecs(),
                    fill_value=0,
                    config={"write_empty_chunks": True},  # every chunk is a file
                )
                for name, spec in self.specs.items()
            }
        self.hashes = {name: hashlib.sha256() for name in self.specs}  # of the decoded bytes, in row order
        self.buffer: dict[str, list[np.ndarray]] = {name: [] for name in self.specs}
        self.inputs: dict[str, list[int]] = {}  # the dataset files the part was computed from
        self.buffered = {"point": 0, "grid": 0}
        self.written = {"point": 0, "grid": 0}
        self.rows: list[dict] = []

    def note_inputs(self, stats: dict[str, list[int]]) -> None:
        """Record input files of the part ({path under the dataset root: [size, mtime_ns]})."""
        self.inputs.update(stats)

    def add(self, row: dict, data: dict[str, np.ndarray] | None = None) -> None:
        """Append one (scan, camera) entry. `row` holds the manifest fields except part/offset/
        count/grid; `data` the per-point arrays and `features` (D per point) or, in the grid
        layout, `grid` (D, h, w); None for a skipped entry."""
        count = 0 if data is None else len(data["point_index"])
        has_grid = count > 0 and "grids" in self.specs
        self.rows.append(
            {
                **row,
                "part": self.part,
                "offset": self.written["point"] + self.buffered["point"],
                "count": count,
                "grid": self.written["grid"] + self.buffered["grid"] if has_grid else -1,
            }
        )
        if not count:
            return
        for name in POINT_ARRAYS + (("features",) if "features" in self.specs else ()):
            self.buffer[name].append(np.asarray(data[name]))
        self.buffered["point"] += count
        if has_grid:
            grid = np.asarray(data["grid"])
            if "grid_scale" in self.specs:
                grid, scale = quantize_int8(grid)
                self.buffer["grid_scale"].append(scale[None])
            self.buffer["grids"].append(grid[None])
            self.buffered["grid"] += 1
        if self.buffered["point"] >= self.specs["points"].chunk_rows:
            with disk_errors(self.folder):
                self._flush(whole_chunks_only=True)

    def _flush(self, whole_chunks_only: bool) -> None:
        for per in ("point", "grid"):
            names = [name for name, spec in self.specs.items() if spec.per == per]
            rows_per_chunk = self.specs[names[0]].chunk_rows if names else 1
            n = self.buffered[per]
            if whole_chunks_only:
                n -= n % rows_per_chunk
            if not names or n == 0:
                continue
            start, end = self.written[per], self.written[per] + n
            for name in names:
                arr = self.arrays[name]
                merged = np.concatenate(self.buffer[name])
                block = np.ascontiguousarray(merged[:n], dtype=arr.dtype)
                arr.resize((end, *arr.shape[1:]))
                arr[start:end] = block
                self.hashes[name].update(block.tobytes())
                self.buffer[name] = [merged[n:]]
            self.written[per], self.buffered[per] = end, self.buffered[per] - n

    def record(self) -> dict:
        """The part's integrity record: per array its shape, dtype, chunking, the size of each
        chunk file and the SHA-256 of its decoded bytes."""
        arrays = {}
        for name, arr in self.arrays.items():
            spec = self.specs[name]
            chunks = -(-arr.shape[0] // spec.chunk_rows)
            sizes = [(self.folder / name / chunk_key(i, arr.ndim)).stat().st_size for i in range(chunks)]
            arrays[name] = {
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "chunk_rows": spec.chunk_rows,
                "chunk_bytes": sizes,
                "sha256": self.hashes[name].hexdigest(),
            }
        record = {"part": self.part, "rows": self.written["point"], "grids": self.written["grid"], "arrays": arrays}
        return {**record, "inputs": dict(sorted(self.inputs.items()))} if self.inputs else record

    def commit(self) -> None:
        """Flush the last rows, then publish the manifest (with the part's record) by atomic rename."""
        with disk_errors(self.folder):
            self._flush(whole_chunks_only=False)
        table = pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA)
        table = table.replace_schema_metadata({PART_RECORD_KEY: json.dumps(self.record())})
        write = lambda tmp: pq.write_table(table, tmp, write_page_checksum=True)  # noqa: E731
        write_atomically(self.store.manifest_path(self.part), write, sync=True)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value) -> str:
    text = _canonical(value)
    return text if len(text) < 160 else text[:157] + "..."
