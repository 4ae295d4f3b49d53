"""Comparisons shared by the tests, stating exactly what a feature store guarantees.

A store's manifest, point indices, pixels and points are bitwise the same however it was
computed (threads, DataLoader workers, dask workers, ranks, resumed or not). Its features are
bitwise the same when the teacher ran with the same number of CPU threads; with another thread
count the float32 reductions inside the teacher round differently, and after the cast to float16
a feature may differ by one float16 step (ulp) of the larger of the two values, or by 2^-16 for
values so close to zero that a float32 rounding difference spans several float16 steps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

from stages.extract.extract import ExtractConfig, extract
from storage.feature_store import PART_RECORD_KEY, FeatureStore

FEATURE_FLOOR = 2.0**-16


def features_within_one_ulp(a: np.ndarray, b: np.ndarray) -> bool:
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    step = np.spacing(np.maximum(np.abs(a32), np.abs(b32)).astype(np.float16)).astype(np.float32)
    return bool((np.abs(a32 - b32) <= np.maximum(step, FEATURE_FLOOR)).all())


def assert_same_store(a: Path, b: Path, same_threads: bool = True) -> None:
    """`same_threads`: the teacher ran with the same thread count for both stores."""
    sa, sb = FeatureStore(a), FeatureStore(b)
    assert sa.manifest().equals(sb.manifest())
    assert sa.committed_parts() == sb.committed_parts()
    for part in sa.committed_parts():
        for name, arr in sa.arrays(part).items():
            x, y = arr[:], sb.arrays(part)[name][:]
            if name in ("features", "grids") and x.dtype == np.float16 and not same_threads:
                assert x.shape == y.shape and features_within_one_ulp(x, y), (part, name)
            else:
                assert np.array_equal(x, y), (part, name)


def reseal(store_path: Path, part: int, keep_sha256: bool) -> None:
    """Re-record a part's chunk sizes (and, unless `keep_sha256`, checksums) after its arrays were
    rewritten by hand: what a writer that wrote these bytes would have recorded."""
    manifest = store_path / f"manifest/part-{part:06d}.parquet"
    table = pq.read_table(manifest)
    record = json.loads(table.schema.metadata[PART_RECORD_KEY])
    for name, rec in record["arrays"].items():
        folder = store_path / f"parts/part-{part:06d}/{name}"
        chunks = [f for f in folder.rglob("c/**/*") if f.is_file()]  # in chunk order (c/10 after c/9)
        chunks.sort(key=lambda f: tuple(int(i) for i in f.relative_to(folder / "c").parts))
        rec["chunk_bytes"] = [f.stat().st_size for f in chunks]
        if not keep_sha256:
            rec["sha256"] = hashlib.sha256(
                np.ascontiguousarray(zarr.open_array(str(folder), mode="r")[:]).tobytes()
            ).hexdigest()
    pq.write_table(table.replace_schema_metadata({PART_RECORD_KEY: json.dumps(record)}), manifest)


def tiny_config(root: Path, out: Path, dataset: str = "semantickitti", split: str = "train", **kw) -> ExtractConfig:
    """Extraction with the tiny random-init test teacher at 32 x 64 (no loader workers), as most tests use."""
    cfg = {"random_init": True, "image_size": (32, 64), "num_workers": 0, **kw}
    return ExtractConfig(dataset, root, split, cfg.pop("teacher", "test-vit"), out, **cfg)


def tiny_store(root: Path, out: Path, dataset: str = "semantickitti", split: str = "train", **kw) -> FeatureStore:
    """The store of `tiny_config`."""
    return extract(tiny_config(root, out, dataset, split, **kw))
