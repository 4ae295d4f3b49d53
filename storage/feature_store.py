"""The feature store: per-point teacher targets in Zarr, keyed by (scan, camera) via Parquet.

    <store>.zarr/
      zarr.json                      root group; attributes = provenance (see `store_attributes`)
      parts/zarr.json                group of parts
      parts/part-NNNNNN/             written by exactly one writer, never changed after commit
        features     (N, D) float16  teacher feature of each visible point
        points       (N, 4) float32  x, y, z, intensity in the lidar frame (the student's input)
        point_index  (N,)   int32    index of the point in the raw scan
        pixel        (N, 2) float32  (column, row) in the resized image
      manifest/part-NNNNNN.parquet   one row per (scan, camera) of the part, and in its schema
                                     metadata the part's integrity record (`PART_RECORD_KEY`);
                                     written LAST, by atomic rename: a part without its manifest
                                     does not exist.

All arrays of a part share the same row chunking, and a writer only ever writes whole chunks
(plus the final partial one), so no two processes ever touch the same chunk file.

Integrity. Every chunk ends with a CRC-32C (Zarr's `crc32c` codec): a truncated or altered chunk
fails to decode with an error instead of reading as garbage. Each part's record holds, per array,
its shape, dtype, the byte size of every chunk file and the SHA-256 of the array's decoded bytes.
Opening a store (`FeatureStore(path)`) runs the cheap gate `integrity_problems()`: the plan is
complete, every manifest agrees with its rows, its record and its arrays' metadata, and every
chunk file is there with its recorded size (one stat per chunk file, no decoding). `verify`
(storage/verify.py) adds the full check: every chunk decoded and every checksum recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec

from storage.targets import dequantize, quantize_int8, sample_grid

FORMAT = "scalr-feature-store"
# 3: targets as the released code computes them (pixel floor twice, its border rules, a float
#    image resize without PIL, DINOv2's own position-embedding interpolation; `recipe`).
# 2: CRC-32C per chunk, a per-part integrity record, the grid layout (1 had none).
FORMAT_VERSION = 3
LAYOUTS = ("points", "grid")  # per-point features, or each entry's token grid (sampled when read)
QUANTIZE = ("none", "int8")  # int8: grid layout only, a float32 scale per token
POINT_ARRAYS = ("points", "point_index", "pixel")  # every layout, one row per visible point
MANIFEST_SCHEMA = pa.schema(
    [
        ("scan_index", pa.int32()),
        ("scan_id", pa.string()),
        ("camera", pa.string()),
        ("part", pa.int32()),
        ("offset", pa.int64()),
        ("count", pa.int64()),
        ("grid", pa.int32()),  # grid layout: the entry's index in the part's `grids` (-1: none)
        ("scan_points", pa.int64()),
        ("image_height", pa.int32()),
        ("image_width", pa.int32()),
        ("status", pa.string()),  # "ok" or "skipped"
        ("reason", pa.string()),  # why it was skipped ("" when ok)
    ]
)
PART_RECORD_KEY = b"scalr.part"  # manifest schema metadata: the part's integrity record (JSON)
# Attributes that must agree for a rerun to continue an existing store.
IDENTITY_KEYS = ("format", "format_version", "teacher", "image_size", "dataset", "plan", "projection", "dtype", "layout", "quantize", "grid_size", "recipe")
REQUIRED_KEYS = IDENTITY_KEYS + ("cameras", "intensity_max")
GRID_POINT_CHUNK_ROWS = 1 << 13  # grid layout: per-point arrays (28 bytes a row); an entry's read decodes ~2 chunks


class StoreError(Exception):
    """A store that cannot be used as asked; the message names the store and the problem."""


def part_name(part: int) -> str:
    return f"part-{part:06d}"


def chunk_rows_for(dim: int, target_bytes: int = 4 << 20) -> int:
    """Rows per chunk so a features chunk is about 4 MiB (a power of two, at least 1024)."""
    return max(1024, 1 << int(np.log2(max(target_bytes // (2 * dim), 1))))


@dataclass(frozen=True)
class ArraySpec:
    tail: tuple[int, ...]  # shape of one row
    dtype: str
    chunk_rows: int
    per: str  # "point": one row per visible point; "grid": one row per stored grid
    columns: bool = False  # chunk bytes stored column by column (Zarr transpose codec)
    zstd_level: int = 1
    shuffle: str = "bitshuffle"

    def codecs(self) -> dict:
        """Zarr codecs of the array, chosen by measurement on stores of the synthetic nuScenes set
        (`scalr bench extract`): float16 features and grids zstd-1 bit-shuffled (~0.83x, half
        zstd-3's encode time); int8 grids zstd-5 bit-shuffled (0.79x vs 0.82x at zstd-1, and
        faster to decode than a float16 grid); per-point arrays stored column by column and
        byte-shuffled at zstd-5 (x, y, z, intensity each in its own run: 8.5 instead of 11.7 bytes
        a point). CRC-32C last: checked first on every read, before the decompressor sees a
        damaged chunk."""
        filters = [TransposeCodec(order=tuple(range(len(self.tail), -1, -1)))] if self.columns else []
        return {"filters": filters, "compressors": [BloscCodec(cname="zstd", clevel=self.zstd_level, shuffle=self.shuffle), Crc32cCodec()]}


def array_layout(attrs: dict) -> dict[str, ArraySpec]:
    """The arrays of a part of a store with these attributes."""
    dim = int(attrs["teacher"]["dim"])
    if attrs.get("layout", "points") == "points":
        rows = chunk_rows_for(dim)
        features = ArraySpec((dim,), attrs.get("dtype", "float16"), rows, "point")  # float32: student stores of `scalr embed --dtype float32`
        return {"features": features, **_point_arrays(rows)}
    h, w = attrs["grid_size"]
    if attrs.get("quantize") == "int8":
        arrays = {"grids": ArraySpec((dim, h, w), "int8", 1, "grid", zstd_level=5),
                  "grid_scale": ArraySpec((h, w), "float32", 1, "grid", zstd_level=5, shuffle="shuffle")}  # fmt: skip
    else:
        arrays = {"grids": ArraySpec((dim, h, w), "float16", 1, "grid")}  # one grid a chunk: one read per entry
    return {**arrays, **_point_arrays(GRID_POINT_CHUNK_ROWS)}


def _point_arrays(rows: int) -> dict[str, ArraySpec]:
    """The per-point arrays every layout stores beside its targets."""
    return {"points": ArraySpec((4,), "float32", rows, "point", columns=True, zstd_level=5, shuffle="shuffle"),
            "point_index": ArraySpec((), "int32", rows, "point", zstd_level=5, shuffle="shuffle"),
            "pixel": ArraySpec((2,), "float32", rows, "point", columns=True, zstd_level=5, shuffle="shuffle")}  # fmt: skip


def chunk_key(index: int, ndim: int) -> str:
    """Path of row-chunk `index` inside an array folder (Zarr v3 default chunk key encoding)."""
    return "c/" + "/".join([str(index)] + ["0"] * (ndim - 1))


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
    """A store on disk. Picklable: zarr arrays are opened lazily in each process.

    `check=True` (every reader) refuses a store that fails the integrity gate; the writer and
    `verify` open with `check=False` and look at the problems themselves."""

    def __init__(self, path: str | Path, check: bool = True):
        self.path = Path(path)
        self.attrs = _read_root_attributes(self.path)
        self._manifest: pa.Table | None = None
        self._parts: dict[int, tuple[pa.Table, dict]] = {}  # part -> (manifest rows, integrity record), as read
        self._arrays: dict[int, dict[str, zarr.Array]] = {}
        self._pid = os.getpid()
        if check:
            problems = self.integrity_problems()
            if problems:
                shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
                raise StoreError(f"{self.path}: refusing a damaged or unfinished feature store ({len(problems)} problem(s); `scalr verify` checks everything):\n  {shown}")

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: str | Path, attrs: dict) -> "FeatureStore":
        """Open the store at `path` for writing, creating it if absent. Creation is atomic (built
        in a temporary folder, then renamed), so concurrent ranks can all call this safely. An
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
        store = cls(path, check=False)
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
            file = pq.ParquetFile(path, page_checksum_verification=True)
            table, metadata = file.read(), file.schema_arrow.metadata or {}
        except FileNotFoundError:
            raise StoreError(f"{path}: missing (part {part} is not committed)") from None
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"{path}: unreadable manifest ({type(err).__name__}: {err})") from None
        if not table.schema.remove_metadata().equals(MANIFEST_SCHEMA):
            raise StoreError(f"{path}: manifest columns are {table.schema.remove_metadata().names} with other types than the manifest schema")
        if PART_RECORD_KEY not in metadata:
            raise StoreError(f"{path}: the manifest has no integrity record (written by an older scalr, or rewritten by hand)")
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

    def read_points(self, part: int, offset: int, count: int, names: tuple[str, ...] = POINT_ARRAYS) -> dict[str, np.ndarray]:
        """`points`, `point_index` and `pixel` (or some of them) of one entry: one slice each. A
        chunk that fails its checksum or does not decode is a StoreError naming the array and rows."""
        arrays = self.arrays(part)
        return {name: self._slice(part, name, arrays[name], offset, offset + count) for name in names}

    def read_targets(self, part: int, offset: int, count: int, grid: int, rows: np.ndarray, pixel: np.ndarray) -> np.ndarray:
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
            token_grid = dequantize(token_grid, self._slice(part, "grid_scale", arrays["grid_scale"], grid, grid + 1)[0])
        features = sample_grid(torch.from_numpy(np.asarray(token_grid, np.float32)), torch.from_numpy(np.ascontiguousarray(pixel)), tuple(self.attrs["image_size"]))
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
            raise StoreError(f"{self.part_folder(part) / name}: rows {start}-{stop - 1} unreadable, a chunk is corrupt or missing ({type(err).__name__}: {err}); run `scalr verify {self.path}`") from None

    def entry(self, scan_id: str, camera: str) -> tuple[dict, dict[str, np.ndarray]]:
        """(manifest row, arrays) of one (scan, camera)."""
        m = self.manifest()
        rows = m.filter(pc.and_(pc.equal(m["scan_id"], scan_id), pc.equal(m["camera"], camera))).to_pylist()
        if not rows:
            raise KeyError(f"{self.path}: no entry for scan {scan_id!r}, camera {camera!r}")
        row = rows[0]
        return row, self.read(row["part"], row["offset"], row["count"], row["grid"])

    # ---- the integrity gate ---------------------------------------------------------------
    def integrity_problems(self) -> list[str]:
        """Everything that can be checked without decoding a chunk, one line per problem naming
        the file: attributes, plan completeness, each part's manifest against its rows, its
        record and its arrays' metadata, each chunk file's presence and size. Caches the manifest."""
        problems = self.store_problems()
        if not self.attrs_usable:
            return problems
        parts = self.planned_committed_parts()
        with ThreadPoolExecutor(max_workers=8) as pool:  # stat-bound: threads hide file-system latency
            for part_problems in pool.map(self.part_problems, parts):
                problems += part_problems
        if not problems:
            self.manifest()
        return problems

    @property
    def attrs_usable(self) -> bool:
        return not _attribute_problems(self.path, self.attrs)

    def planned_committed_parts(self) -> list[int]:
        return sorted(set(self.committed_parts()) & set(range(self.plan.parts)))

    def store_problems(self) -> list[str]:
        """The store as a whole: attributes, and every planned part committed (and no other)."""
        problems = _attribute_problems(self.path, self.attrs)
        if problems:
            return problems
        plan = self.plan
        committed = set(self.committed_parts())
        missing = [p for p in range(plan.parts) if p not in committed]
        if missing:
            listed = ", ".join(part_name(p) for p in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            problems.append(f"{self.path}: {len(missing)} of {plan.parts} planned parts are not committed ({listed}); rerun the same extract-features command to finish it")
        extra = sorted(committed - set(range(plan.parts)))
        if extra:
            problems.append(f"{self.path / 'manifest'}: parts {extra} are outside the plan of {plan.parts} parts")
        return problems

    def part_problems(self, part: int) -> list[str]:
        """One committed part: its manifest rows against the plan and its record, its arrays'
        metadata against both, its chunk files' presence and sizes."""
        try:
            table, record = self.read_part_manifest(part)
        except StoreError as err:
            return [str(err)]
        where = self.manifest_path(part)
        rows = table.to_pydict()
        problems = []
        expected = {(s, c) for s in self.plan.scans_of(part) for c in self.attrs["cameras"]}
        present = set(zip(rows["scan_index"], rows["camera"]))
        if present != expected or len(rows["camera"]) != len(expected):
            lost, extra = sorted(expected - present)[:5], sorted(present - expected)[:5]
            problems.append(f"{where}: entries do not match the plan (missing {lost}, unexpected {extra}, {len(rows['camera'])} rows for {len(expected)} entries)")
        offset, grids = 0, 0
        with_grids = self.layout == "grid"
        for scan_id, camera, p, o, n, g in zip(rows["scan_id"], rows["camera"], rows["part"], rows["offset"], rows["count"], rows["grid"]):
            if p != part or o != offset or n < 0:
                return problems + [f"{where}: row {scan_id}/{camera} has part {p}, offset {o}, count {n}; after the previous rows it must be part {part}, offset {offset}"]
            if g != (grids if with_grids and n > 0 else -1):
                return problems + [f"{where}: row {scan_id}/{camera} has grid {g}; after the previous rows it must be {grids if with_grids and n > 0 else -1}"]
            offset, grids = offset + n, grids + (g >= 0)
        if record.get("rows") != offset:
            return problems + [f"{where}: the rows' counts add up to {offset} points but the part recorded {record.get('rows')}"]
        folder = self.part_folder(part)
        for name, spec in self.specs.items():
            length = offset if spec.per == "point" else grids
            problems += _array_problems(folder / name, record.get("arrays", {}).get(name), (length, *spec.tail), spec.dtype)
        return problems

    def part_record(self, part: int) -> dict:
        return self.read_part_manifest(part)[1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


def _read_root_attributes(path: Path) -> dict:
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
        raise StoreError(f"{path}: not a scalr feature store (format {attrs.get('format') if isinstance(attrs, dict) else attrs!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        why = " (its targets use scalr 0.1's pixel, border and resize rules, not the released code's)" if attrs.get("format_version") == 2 else ""
        raise StoreError(f"{path}: store format version {attrs.get('format_version')!r}{why}, this scalr reads version {FORMAT_VERSION}; extract it again with this scalr into a new --out")
    return attrs


def _attribute_problems(path: Path, attrs: dict) -> list[str]:
    where = path / "zarr.json"
    missing = [k for k in REQUIRED_KEYS if k not in attrs]
    if missing:
        return [f"{where}: attributes lack {missing}"]
    teacher, size, plan = attrs["teacher"], attrs["image_size"], attrs["plan"]
    dim = teacher.get("dim") if isinstance(teacher, dict) else None
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        return [f"{where}: teacher dimension {dim!r} is not a positive integer"]
    student = isinstance(teacher, dict) and teacher.get("kind") == "student"  # `scalr embed`: no image
    if not (student and size is None) and not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        return [f"{where}: image_size {size!r} is not [height, width]"]
    if attrs.get("dtype", "float16") not in ("float16", "float32") or (attrs.get("dtype") == "float32" and not student):
        return [f"{where}: dtype {attrs.get('dtype')!r} is not float16 (teacher stores) or float32 (student stores)"]
    if not (isinstance(plan, dict) and set(plan) == {"scans", "scans_per_part"} and all(isinstance(v, int) and v > 0 for v in plan.values())):
        return [f"{where}: plan {plan!r} is not {{scans, scans_per_part}} of positive integers"]
    if not (isinstance(attrs["cameras"], list) and attrs["cameras"] and all(isinstance(c, str) for c in attrs["cameras"])):
        return [f"{where}: cameras {attrs['cameras']!r} is not a list of camera names"]
    layout, quantize, grid_size = attrs["layout"], attrs["quantize"], attrs["grid_size"]
    if layout not in LAYOUTS or quantize not in QUANTIZE or (layout == "points" and (quantize != "none" or grid_size is not None)):
        return [f"{where}: layout {layout!r} with quantize {quantize!r} and grid_size {grid_size!r} is not one of the store layouts"]
    if layout == "grid" and not (isinstance(grid_size, list) and len(grid_size) == 2 and all(isinstance(v, int) and v > 0 for v in grid_size)):
        return [f"{where}: grid_size {grid_size!r} is not [rows, columns] of tokens"]
    return []


def _array_problems(folder: Path, record: dict | None, shape: tuple[int, ...], dtype: str) -> list[str]:
    """One array of a part against the manifest's rows and the part's record, without decoding.
    The chunking is the one the record says was written (a later scalr may chunk otherwise)."""
    if not isinstance(record, dict):
        return [f"{folder}: no integrity record for this array in the manifest"]
    chunk_rows = record.get("chunk_rows")
    if not isinstance(chunk_rows, int) or chunk_rows <= 0:
        return [f"{folder}: the part's record has no valid chunk_rows ({chunk_rows!r})"]
    try:
        meta = json.loads((folder / "zarr.json").read_bytes())
        on_disk = (tuple(meta["shape"]), meta["data_type"], tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]))
    except FileNotFoundError:
        return [f"{folder / 'zarr.json'}: array metadata is missing"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        return [f"{folder / 'zarr.json'}: corrupt array metadata ({type(err).__name__}: {err})"]
    expected = (shape, dtype, (chunk_rows, *shape[1:]))
    if on_disk != expected or tuple(record.get("shape", ())) != shape:
        return [f"{folder}: array is {on_disk[0]} {on_disk[1]} in chunks of {on_disk[2]}; the manifest and the part's record say {shape} {dtype} in chunks of {expected[2]}"]
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
        problems.insert(0, f"{folder}: {len(absent)} of {chunks} chunk files are missing (chunks {absent[:10]}{' ...' if len(absent) > 10 else ''})")
    return problems


class PartWriter:
    """Writes one part: buffers rows and writes whole chunks; `commit()` flushes the rest, records
    the part's integrity record and then publishes the manifest by atomic rename."""

    def __init__(self, store: FeatureStore, part: int):
        self.store, self.part = store, part
        self.specs = store.specs
        self.folder = store.part_folder(part)
        shutil.rmtree(self.folder, ignore_errors=True)  # leftovers of a crashed writer
        zarr.open_group(str(self.folder), mode="w", attributes={"part": part})
        self.arrays = {
            name: zarr.create_array(
                store=str(self.folder / name), shape=(0, *spec.tail), chunks=(spec.chunk_rows, *spec.tail), dtype=spec.dtype,
                **spec.codecs(), fill_value=0, config={"write_empty_chunks": True},  # every chunk is a file
            )  # fmt: skip
            for name, spec in self.specs.items()
        }
        self.hashes = {name: hashlib.sha256() for name in self.specs}  # of the decoded bytes, in row order
        self.buffer: dict[str, list[np.ndarray]] = {name: [] for name in self.specs}
        self.buffered = {"point": 0, "grid": 0}
        self.written = {"point": 0, "grid": 0}
        self.rows: list[dict] = []

    def add(self, row: dict, data: dict[str, np.ndarray] | None = None) -> None:
        """Append one (scan, camera) entry. `row` holds the manifest fields except part/offset/
        count/grid; `data` the per-point arrays and `features` (D per point) or, in the grid
        layout, `grid` (D, h, w); None for a skipped entry."""
        count = 0 if data is None else len(data["point_index"])
        has_grid = count > 0 and "grids" in self.specs
        self.rows.append({**row, "part": self.part, "offset": self.written["point"] + self.buffered["point"], "count": count,
                          "grid": self.written["grid"] + self.buffered["grid"] if has_grid else -1})  # fmt: skip
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
            arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunk_rows": spec.chunk_rows, "chunk_bytes": sizes, "sha256": self.hashes[name].hexdigest()}
        return {"part": self.part, "rows": self.written["point"], "grids": self.written["grid"], "arrays": arrays}

    def commit(self) -> None:
        self._flush(whole_chunks_only=False)
        table = pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA)
        table = table.replace_schema_metadata({PART_RECORD_KEY: json.dumps(self.record())})
        final = self.store.manifest_path(self.part)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp, write_page_checksum=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)


def stored_axis_order(arr: zarr.Array) -> tuple[int, ...] | None:
    """The axis order of a chunk's bytes if the array uses the store's own codecs (an optional
    transpose, little-endian bytes, blosc, CRC-32C), else None."""
    codecs = list(arr.metadata.codecs)
    order = tuple(codecs.pop(0).order) if codecs and isinstance(codecs[0], TransposeCodec) else tuple(range(arr.ndim))
    names = [type(c).__name__ for c in codecs]
    endian = str(getattr(codecs[0].endian, "value", codecs[0].endian)) if names[:1] == ["BytesCodec"] else None
    if names != ["BytesCodec", "BloscCodec", "Crc32cCodec"] or endian != ("None" if np.dtype(arr.dtype).itemsize == 1 else "little"):
        return None
    return order


def read_rows(folder: Path, arr: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a row-chunked array. For the store's own codecs (an optional
    transpose, little-endian bytes, blosc, CRC-32C) the chunk files are read here: zarr-python's
    generic read path costs ~2-3 ms a call in a one-thread loader worker, a chunk's CRC check and
    decode ~0.25 ms. A missing chunk file is an error here, never fill values. Other codecs go
    through zarr."""
    order = stored_axis_order(arr)
    if order is None:
        return arr[start:stop]
    stop = min(stop, arr.shape[0])
    rows, tail = arr.chunks[0], arr.shape[1:]
    chunk_shape = (rows, *tail)
    stored_shape = tuple(chunk_shape[axis] for axis in order)  # the chunk's bytes, axes in stored order
    dtype = np.dtype(arr.dtype).newbyteorder("<")
    blocks = []
    for i in range(start // rows, (stop - 1) // rows + 1) if stop > start else ():
        raw = (folder / chunk_key(i, arr.ndim)).read_bytes()
        if len(raw) < 4 or google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
            raise ValueError(f"chunk {i}: stored and computed CRC-32C differ")
        chunk = np.frombuffer(blosc.decompress(raw[:-4]), dtype=dtype).reshape(stored_shape).transpose(np.argsort(order))
        lo, hi = max(start - i * rows, 0), min(stop - i * rows, rows)
        blocks.append(chunk[lo:hi])
    if not blocks:
        return np.zeros((0, *tail), dtype=dtype)
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0].copy()  # C order, writable


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value) -> str:
    text = _canonical(value)
    return text if len(text) < 160 else text[:157] + "..."
