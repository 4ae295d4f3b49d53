"""The feature store: per-point teacher targets in Zarr, keyed by (scan, camera) via Parquet.

    <store>.zarr/
      zarr.json                      root group; attributes = provenance (see `store_attributes`)
      parts/zarr.json                group of parts
      parts/part-NNNNNN/             written by exactly one writer, never changed after commit
        features     (N, D) float16  teacher feature of each visible point
        points       (N, 4) float32  x, y, z, intensity in the lidar frame (the student's input)
        point_index  (N,)   int32    index of the point in the raw scan
        pixel        (N, 2) float32  (column, row) in the resized image
      manifest/part-NNNNNN.parquet   one row per (scan, camera) of the part; written LAST, by atomic
                                     rename: a part without its manifest does not exist.

All arrays of a part share the same row chunking, and a writer only ever writes whole chunks
(plus the final partial one), so no two processes ever touch the same chunk file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

FORMAT = "scalr-feature-store"
FORMAT_VERSION = 1
ARRAYS = ("features", "points", "point_index", "pixel")
MANIFEST_SCHEMA = pa.schema(
    [
        ("scan_index", pa.int32()),
        ("scan_id", pa.string()),
        ("camera", pa.string()),
        ("part", pa.int32()),
        ("offset", pa.int64()),
        ("count", pa.int64()),
        ("scan_points", pa.int64()),
        ("image_height", pa.int32()),
        ("image_width", pa.int32()),
        ("status", pa.string()),  # "ok" or "skipped"
        ("reason", pa.string()),  # why it was skipped ("" when ok)
    ]
)
# Attributes that must agree for a rerun to continue an existing store.
IDENTITY_KEYS = ("format", "format_version", "teacher", "image_size", "dataset", "plan", "projection", "dtype")


class StoreError(Exception):
    """A store that cannot be used as asked; the message names the store and the problem."""


def part_name(part: int) -> str:
    return f"part-{part:06d}"


def chunk_rows_for(dim: int, target_bytes: int = 4 << 20) -> int:
    """Rows per chunk so a features chunk is about 4 MiB (a power of two, at least 1024)."""
    return max(1024, 1 << int(np.log2(max(target_bytes // (2 * dim), 1))))


@dataclass(frozen=True)
class StorePlan:
    """Which scans go in which part: consecutive runs of `scans_per_part` scans (all cameras of a
    scan in the same part). Deterministic, so every worker and every rerun agree."""

    scans: int
    scans_per_part: int

    @property
    def parts(self) -> int:
        return -(-self.scans // self.scans_per_part)

    def scans_of(self, part: int) -> range:
        return range(part * self.scans_per_part, min((part + 1) * self.scans_per_part, self.scans))


class FeatureStore:
    """A store on disk. Picklable: zarr arrays are opened lazily in each process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.path / "zarr.json"
        if not meta.is_file():
            raise StoreError(f"{self.path}: not a feature store (no zarr.json)")
        self.attrs = zarr.open_group(str(self.path), mode="r").attrs.asdict()
        if self.attrs.get("format") != FORMAT:
            raise StoreError(f"{self.path}: not a scalr feature store (format {self.attrs.get('format')!r})")
        self._manifest: pa.Table | None = None
        self._arrays: dict[int, dict[str, zarr.Array]] = {}
        self._pid = os.getpid()

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: str | Path, attrs: dict) -> "FeatureStore":
        """Open the store at `path`, creating it if absent. Creation is atomic (built in a
        temporary folder, then renamed), so concurrent ranks can all call this safely. An
        existing store must have the same identity (teacher, image size, dataset, plan, ...)."""
        path = Path(path)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            root = zarr.open_group(str(tmp), mode="w", attributes=attrs)
            root.create_group("parts")
            (tmp / "manifest").mkdir()
            try:
                os.rename(tmp, path)
            except OSError:  # another process created it first
                shutil.rmtree(tmp, ignore_errors=True)
        store = cls(path)
        store.check_identity(attrs)
        return store

    def check_identity(self, attrs: dict) -> None:
        diffs = [k for k in IDENTITY_KEYS if _canonical(self.attrs.get(k)) != _canonical(attrs.get(k))]
        if diffs:
            details = "; ".join(f"{k}: store has {_short(self.attrs.get(k))}, this run {_short(attrs.get(k))}" for k in diffs)
            raise StoreError(f"{self.path}: holds a different feature store ({details}). Use another --out or delete it.")

    # ---- parts and manifest ---------------------------------------------------------------
    @property
    def plan(self) -> StorePlan:
        return StorePlan(**self.attrs["plan"])

    def manifest_path(self, part: int) -> Path:
        return self.path / "manifest" / f"{part_name(part)}.parquet"

    def committed_parts(self) -> list[int]:
        names = sorted(p.name for p in (self.path / "manifest").glob("part-*.parquet"))
        return [int(n[5:11]) for n in names]

    def manifest(self) -> pa.Table:
        """All committed manifest rows, ordered by scan then camera order within the part."""
        if self._manifest is None:
            files = [self.manifest_path(p) for p in self.committed_parts()]
            tables = [pq.read_table(f, schema=MANIFEST_SCHEMA) for f in files]
            self._manifest = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
        return self._manifest

    def arrays(self, part: int) -> dict[str, zarr.Array]:
        if self._pid != os.getpid():  # forked into a DataLoader worker: reopen there
            self._arrays, self._pid = {}, os.getpid()
        if part not in self._arrays:
            group = self.path / "parts" / part_name(part)
            self._arrays[part] = {name: zarr.open_array(str(group / name), mode="r") for name in ARRAYS}
        return self._arrays[part]

    def read(self, part: int, offset: int, count: int) -> dict[str, np.ndarray]:
        """The rows of one entry: one slice per array."""
        return {name: arr[offset : offset + count] for name, arr in self.arrays(part).items()}

    def entry(self, scan_id: str, camera: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(manifest row, arrays) of one (scan, camera)."""
        m = self.manifest()
        rows = m.filter(pc.and_(pc.equal(m["scan_id"], scan_id), pc.equal(m["camera"], camera))).to_pylist()
        if not rows:
            raise KeyError(f"{self.path}: no entry for scan {scan_id!r}, camera {camera!r}")
        row = rows[0]
        return row, self.read(row["part"], row["offset"], row["count"])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


class PartWriter:
    """Writes one part: buffers rows and writes whole chunks; `commit()` flushes the rest and
    then publishes the manifest by atomic rename."""

    def __init__(self, store: FeatureStore, part: int, dim: int):
        self.store, self.part, self.dim = store, part, dim
        self.folder = store.path / "parts" / part_name(part)
        shutil.rmtree(self.folder, ignore_errors=True)  # leftovers of a crashed writer
        self.chunk_rows = chunk_rows_for(dim)
        zarr.open_group(str(self.folder), mode="w", attributes={"part": part})
        compressor = BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")  # measured: ~0.9x float16 size at half zstd-3 cost
        shapes = {"features": ((dim,), "float16"), "points": ((4,), "float32"), "point_index": ((), "int32"), "pixel": ((2,), "float32")}
        self.arrays = {
            name: zarr.create_array(
                store=str(self.folder / name), shape=(0, *tail), chunks=(self.chunk_rows, *tail), dtype=dtype,
                compressors=compressor, fill_value=0,
            )  # fmt: skip
            for name, (tail, dtype) in shapes.items()
        }
        self.buffer: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
        self.buffered = 0
        self.written = 0
        self.rows: list[dict] = []

    @property
    def size(self) -> int:
        return self.written + self.buffered

    def add(self, row: dict, data: dict[str, np.ndarray] | None = None) -> None:
        """Append one (scan, camera) entry. `row` holds the manifest fields except part/offset/
        count; `data` the per-point arrays (None for a skipped entry)."""
        count = 0 if data is None else len(data["point_index"])
        self.rows.append({**row, "part": self.part, "offset": self.size, "count": count})
        if count:
            for name in ARRAYS:
                self.buffer[name].append(np.asarray(data[name]))
            self.buffered += count
            if self.buffered >= self.chunk_rows:
                self._flush(whole_chunks_only=True)

    def _flush(self, whole_chunks_only: bool) -> None:
        if not self.buffered:
            return
        merged = {name: np.concatenate(parts) for name, parts in self.buffer.items()}
        n = (self.buffered // self.chunk_rows) * self.chunk_rows if whole_chunks_only else self.buffered
        if n == 0:
            return
        end = self.written + n
        for name, arr in self.arrays.items():
            arr.resize((end, *arr.shape[1:]))
            arr[self.written : end] = merged[name][:n]
        self.written = end
        self.buffer = {name: [merged[name][n:]] for name in ARRAYS}
        self.buffered -= n

    def commit(self) -> None:
        self._flush(whole_chunks_only=False)
        table = pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA)
        final = self.store.manifest_path(self.part)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value) -> str:
    text = _canonical(value)
    return text if len(text) < 160 else text[:157] + "..."
