"""What a feature store is made of: the format's constants, the manifest's columns, each
layout's arrays with their chunking and codecs, and the plan of parts. No I/O here.

    <store>.zarr/
      zarr.json                      root group; attributes = provenance (stages/extract.store_attributes)
      parts/part-NNNNNN/             written by exactly one writer, never changed after commit
        features     (N, D) float16  teacher feature of each visible point (points layout)
        grids        (G, D, h, w)    each entry's token grid (grid layout; int8 + grid_scale when quantized)
        points       (N, 4) float32  x, y, z, intensity in the lidar frame (the student's input);
                                     float64 where the dataset's released code reads float64 (PandaSet)
        point_index  (N,)   int32    index of the point in the raw scan
        pixel        (N, 2) float32  (column, row) in the resized image
      manifest/part-NNNNNN.parquet   one row per (scan, camera) of the part, and in its schema
                                     metadata the part's integrity record (`PART_RECORD_KEY`)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec

from pipeline.errors import ScalrError

FORMAT = "scalr-feature-store"
# 4: each dataset's number types as the released code's: PandaSet points float64 (`points_dtype`),
#    nuScenes pixels through the devkit's float32 transform chain (`projection`).
# 3: targets as the released code computes them (pixel floor twice, its border rules, a float
#    image resize without PIL, DINOv2's own position-embedding interpolation; `recipe`).
# 2: CRC-32C per chunk, a per-part integrity record, the grid layout (1 had none).
FORMAT_VERSION = 4
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
IDENTITY_KEYS = (
    "format",
    "format_version",
    "teacher",
    "image_size",
    "dataset",
    "plan",
    "projection",
    "dtype",
    "layout",
    "quantize",
    "grid_size",
    "recipe",
    "points_dtype",
)
# Of those, what stores of several teachers must share to be joined into one target: the same
# scans and points, seen through the same resized images (the teachers and layouts may differ).
JOIN_KEYS = ("dataset", "image_size", "projection", "plan", "recipe", "points_dtype")
REQUIRED_KEYS = IDENTITY_KEYS + ("cameras", "intensity_max")
GRID_POINT_CHUNK_ROWS = 1 << 13  # grid layout: per-point arrays (28 bytes a row); an entry's read decodes ~2 chunks
POINTS_DTYPES = ("float32", "float64")  # of the `points` array: the dataset's own number type


class StoreError(ScalrError):
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

    def codec_names(self) -> list[str]:
        """The names of the codecs in an array's zarr.json, in order (what the integrity gate admits)."""
        return (["transpose"] if self.columns else []) + ["bytes", "blosc", "crc32c"]

    def codecs(self) -> dict:
        """Zarr codecs of the array, chosen by measurement on stores of the synthetic nuScenes set
        (`scalr bench extract`): float16 features and grids zstd-1 bit-shuffled (~0.83x, half
        zstd-3's encode time); int8 grids zstd-5 bit-shuffled (0.79x vs 0.82x at zstd-1, and
        faster to decode than a float16 grid); per-point arrays stored column by column and
        byte-shuffled at zstd-5 (x, y, z, intensity each in its own run: 8.5 instead of 11.7 bytes
        a point). CRC-32C last: checked first on every read, before the decompressor sees a
        damaged chunk."""
        filters = [TransposeCodec(order=tuple(range(len(self.tail), -1, -1)))] if self.columns else []
        return {
            "filters": filters,
            "compressors": [BloscCodec(cname="zstd", clevel=self.zstd_level, shuffle=self.shuffle), Crc32cCodec()],
        }


def array_layout(attrs: dict) -> dict[str, ArraySpec]:
    """The arrays of a part of a store with these attributes."""
    dim = int(attrs["teacher"]["dim"])
    if attrs.get("layout", "points") == "points":
        rows = chunk_rows_for(dim)
        features = ArraySpec(
            (dim,), attrs.get("dtype", "float16"), rows, "point"
        )  # float32: student stores of `scalr embed --dtype float32`
        return {"features": features, **_point_arrays(rows, attrs)}
    h, w = attrs["grid_size"]
    if attrs.get("quantize") == "int8":
        arrays = {
            "grids": ArraySpec((dim, h, w), "int8", 1, "grid", zstd_level=5),
            "grid_scale": ArraySpec((h, w), "float32", 1, "grid", zstd_level=5, shuffle="shuffle"),
        }
    else:
        arrays = {"grids": ArraySpec((dim, h, w), "float16", 1, "grid")}  # one grid a chunk: one read per entry
    return {**arrays, **_point_arrays(GRID_POINT_CHUNK_ROWS, attrs)}


def _point_arrays(rows: int, attrs: dict) -> dict[str, ArraySpec]:
    """The per-point arrays every layout stores beside its targets."""
    points = attrs.get("points_dtype", "float32")
    if points not in POINTS_DTYPES:
        raise StoreError(f"points_dtype {points!r}: one of {', '.join(POINTS_DTYPES)}")
    return {
        "points": ArraySpec((4,), points, rows, "point", columns=True, zstd_level=5, shuffle="shuffle"),
        "point_index": ArraySpec((), "int32", rows, "point", zstd_level=5, shuffle="shuffle"),
        "pixel": ArraySpec((2,), "float32", rows, "point", columns=True, zstd_level=5, shuffle="shuffle"),
    }


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
