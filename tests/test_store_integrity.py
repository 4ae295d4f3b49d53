"""Damaged feature stores: the integrity gate refuses them in every reader, `verify` names each
problem, and nothing is ever read as fill values or crashes the process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner
from helpers import reseal

from pipeline.synth import SynthConfig, generate
from stages.cli import main
from stages.extract.extract import ExtractConfig, extract
from storage.feature_store import (
    FORMAT_VERSION,
    PART_RECORD_KEY,
    FeatureStore,
    PartWriter,
    StoreError,
    read_rows,
    stored_axis_order,
)
from storage.verify import verify_store

TINY_STUDENT = [
    "--student",
    "WI-12-64",
    "--set",
    "model.depth=2",
    "--set",
    "model.width=8",
    "--set",
    "model.grid_shape=[32, 32, 4]",
    "--set",
    "sample.grid.cell=4.0",
    "--set",
    "sample.max_points=1000",
    "--epochs",
    "1",
    "--batch-size",
    "2",
    "--fresh",
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, FeatureStore]:
    """Four SemanticKITTI-format scans, one part each, in each layout (and int8 grids)."""
    root = tmp_path_factory.mktemp("kitti")
    generate("semantickitti", root, SynthConfig(seed=3, scenes=1, frames=4, azimuth_steps=256, image_scale=0.3))
    folder = tmp_path_factory.mktemp("stores")
    kinds = {"grid": ("grid", "none"), "points": ("points", "none"), "int8": ("grid", "int8")}
    return {
        kind: extract(
            ExtractConfig(
                "semantickitti",
                root,
                "train",
                "test-vit",
                folder / f"{kind}.zarr",
                random_init=True,
                image_size=(32, 64),
                num_workers=0,
                scans_per_part=1,
                layout=layout,
                quantize=quantize,
            )
        )
        for kind, (layout, quantize) in kinds.items()
    }


@pytest.fixture(scope="module")
def store(stores) -> FeatureStore:
    return stores["grid"]


def first_chunk(path: Path, part: int, array: str) -> Path:
    return next(f for f in sorted((path / f"parts/part-{part:06d}/{array}").rglob("c/**/*")) if f.is_file())


def rewrite_manifest(path: Path, edit) -> None:
    table = pq.read_table(path)  # keeps the schema metadata (the part's record)
    rows = table.to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def count_one_too_large(path: Path) -> None:
    def edit(rows):
        rows[0]["count"] += 1

    rewrite_manifest(path, edit)


# (damage, what the gate says when a reader opens the store, what verify says); F is the array of
# the targets: `features` (points layout) or `grids` (grid layout)
DAMAGES = {
    "deleted chunk": (
        lambda p, F: first_chunk(p, 1, "points").unlink(),
        "part-000001/points: 1 of 1 chunk files are missing",
        "part-000001/points: 1 of 1 chunk files are missing",
    ),
    "truncated chunk": (
        lambda p, F: truncate(first_chunk(p, 2, F)),
        "part-000002/F/c/0/0",
        "were written (truncated or overwritten)",
    ),
    "flipped bytes": (lambda p, F: flip_a_byte(first_chunk(p, 1, F)), None, "part-000001/F: chunk 0 (rows 0-"),
    "missing manifest": (
        lambda p, F: (p / "manifest/part-000003.parquet").unlink(),
        "1 of 4 planned parts are not committed (part-000003); rerun the same extract-features command to finish it",
        "1 of 4 planned parts are not committed",
    ),
    "missing part": (
        lambda p, F: shutil.rmtree(p / "parts/part-000002"),
        "part-000002/F/zarr.json: array metadata is missing",
        "part-000002/F/zarr.json: array metadata is missing",
    ),
    "count one too large": (
        lambda p, F: count_one_too_large(p / "manifest/part-000001.parquet"),
        "part-000001.parquet: the rows' counts add up to",
        "the part recorded",
    ),
    "corrupt manifest": (
        lambda p, F: truncate(p / "manifest/part-000000.parquet"),
        "part-000000.parquet: unreadable manifest",
        "part-000000.parquet: unreadable manifest",
    ),
    "manifest without record": (
        lambda p, F: pq.write_table(
            pq.read_table(p / "manifest/part-000000.parquet").replace_schema_metadata(None),
            p / "manifest/part-000000.parquet",
        ),
        "part-000000.parquet: the manifest has no integrity record",
        "no integrity record",
    ),
    "corrupt zarr.json": (
        lambda p, F: (p / "zarr.json").write_text('{"attributes": {"format'),
        "zarr.json: corrupt store metadata",
        "zarr.json: corrupt store metadata",
    ),
    "corrupt array metadata": (
        lambda p, F: (p / "parts/part-000001/pixel/zarr.json").write_bytes(b"\x00\x01garbage"),
        "part-000001/pixel/zarr.json: corrupt array metadata",
        "part-000001/pixel/zarr.json: corrupt array metadata",
    ),
    "array of another shape": (
        lambda p, F: (p / f"parts/part-000001/{F}/zarr.json").write_text(
            (p / f"parts/part-000001/{F}/zarr.json").read_text().replace('"shape": [', '"shape": [1, ', 1)
        ),
        "part-000001/F: array is",
        "the manifest and the part's record say",
    ),
}


def damage(store: FeatureStore, kind: str, tmp_path: Path) -> tuple[Path, str | None, str]:
    path = Path(shutil.copytree(store.path, tmp_path / "damaged.zarr"))
    harm, gate, found = DAMAGES[kind]
    feature_array = "grids" if store.layout == "grid" else "features"
    harm(path, feature_array)
    return path, gate and gate.replace("/F", "/" + feature_array), found.replace("/F", "/" + feature_array)


@pytest.mark.parametrize("layout", ["grid", "points"])
@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_verify_names_each_damage(stores, layout, kind, tmp_path):
    path, _, found = damage(stores[layout], kind, tmp_path)
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1 and found in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_every_reader_refuses_a_damaged_store(store, kind, tmp_path):
    """pretrain (with and without loader workers), inspect and bench pretrain: exit 1, the damaged
    file named, no traceback, no training on what is left."""
    path, gate, found = damage(store, kind, tmp_path)
    for workers in ("0", "1"):
        result = CliRunner().invoke(
            main,
            [
                "pretrain",
                "--store",
                str(path),
                "--out",
                str(tmp_path / f"run{workers}"),
                "--num-workers",
                workers,
                *TINY_STUDENT,
            ],
        )
        assert result.exit_code == 1, result.output
        said = gate or "part-000001/grids: rows 0-"  # right-sized bytes: the chunk's CRC fails when read
        assert said in result.output and "corrupt" in result.output or gate, result.output
        assert said in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / f"run{workers}/checkpoints/last.pt").exists()
    if gate is None:
        return  # bytes of the right size: found when read (above), by verify, never by opening
    for args in (["inspect", str(path)], ["bench", "pretrain", "--store", str(path), "--student", "WI-12-64"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and gate in result.output and "Traceback" not in result.output, (
            args,
            result.output,
        )


def test_a_truncated_chunk_never_crashes_the_process(store, tmp_path):
    """It used to raise once and then segfault the second read of the same chunk."""
    path = Path(shutil.copytree(store.path, tmp_path / "t.zarr"))
    truncate(first_chunk(path, 0, "grids"))
    reseal(path, 0, keep_sha256=True)  # sizes as if written so: only the chunk's CRC can tell
    code = f"""
import sys
from storage.feature_store import FeatureStore, StoreError
store = FeatureStore({str(path)!r})
for attempt in range(3):
    try:
        store.read(0, 0, 10, 0)
    except StoreError as err:
        assert "part-000000/grids: rows 0-0 unreadable" in str(err), err
    else:
        sys.exit("read a truncated chunk")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_rewritten_content_is_caught_by_its_checksum(store, tmp_path):
    """Bytes re-encoded with a valid chunk CRC and the right sizes: only the recorded SHA-256 of
    the decoded array tells, and verify names the part and array."""
    path = Path(shutil.copytree(store.path, tmp_path / "r.zarr"))
    arr = zarr.open_array(str(path / "parts/part-000002/point_index"), mode="r+")
    arr[:5] = arr[:5][::-1]
    reseal(path, 2, keep_sha256=True)
    problems, _ = verify_store(path)
    assert problems == [
        f"{path}/parts/part-000002/point_index: content differs from what was written (SHA-256 of the decoded "
        "bytes does not match the part's record)"
    ]


def test_verify_finds_non_finite_features(stores, tmp_path):
    path = Path(shutil.copytree(stores["points"].path, tmp_path / "n.zarr"))
    arr = zarr.open_array(str(path / "parts/part-000000/features"), mode="r+")
    block = arr[:10]
    block[3, 5] = np.nan
    arr[:10] = block
    reseal(path, 0, keep_sha256=False)  # as if the writer had written the NaN
    problems, _ = verify_store(path)
    assert (
        len(problems) == 1
        and "part-000000/features: chunk 0 (rows 0-" in problems[0]
        and "1 rows with NaN or infinite values" in problems[0]
    )


def test_verify_checks_the_teacher_against_the_registry(store, tmp_path):
    path = Path(shutil.copytree(store.path, tmp_path / "relabelled.zarr"))
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["teacher"]["name"] = "dino-vits8"  # 384 dims, patch 8: the arrays hold 64
    (path / "zarr.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1
    assert (
        "teacher dino-vits8 is recorded with dim 64, patch 16; the registry's dino-vits8 has dim 384, patch 8"
        in result.output
    )
    meta["attributes"]["teacher"].update(name="dino-vits8", dim=384, patch=8)  # relabelled consistently
    (path / "zarr.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1 and "part-000000/grids: array is (" in result.output and "384" in result.output


def test_a_store_of_an_older_format_is_refused(store, tmp_path):
    path = Path(shutil.copytree(store.path, tmp_path / "old.zarr"))
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="store format version 1, this scalr reads version 4; extract it again"):
        FeatureStore(path)
    meta["attributes"]["format_version"] = 2  # the old pixel, border and resize rules
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(
        StoreError,
        match=r"version 2 \(its targets use scalr 0.1's pixel, border and resize rules, not the released code's\), "
        r"this scalr reads version 4",
    ):
        FeatureStore(path)
    meta["attributes"]["format_version"] = 3  # the number types before the released code's
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"version 3 \(float32 PandaSet points and float64 nuScenes projection"):
        FeatureStore(path)


def test_every_chunk_is_a_file_even_when_all_zero(tmp_path):
    """A chunk of fill values is still written, so a missing file always means damage."""

    dim, n = 2048, 3000  # points layout, chunks of 1024 rows: three chunks
    attrs = {
        "format": "scalr-feature-store",
        "format_version": FORMAT_VERSION,
        "plan": {"scans": 1, "scans_per_part": 1},
        "teacher": {"dim": dim},
        "layout": "points",
    }
    store = FeatureStore.create_or_open(tmp_path / "z.zarr", attrs)
    writer = PartWriter(store, 0)
    writer.add(
        {
            "scan_index": 0,
            "scan_id": "a",
            "camera": "c",
            "scan_points": n,
            "image_height": 1,
            "image_width": 1,
            "status": "ok",
            "reason": "",
        },
        {
            "features": np.zeros((n, dim), np.float16),
            "points": np.zeros((n, 4), np.float32),
            "point_index": np.zeros(n, np.int32),
            "pixel": np.zeros((n, 2), np.float32),
        },
    )
    writer.commit()
    record = json.loads(pq.read_schema(store.manifest_path(0)).metadata[PART_RECORD_KEY])
    for name, rec in record["arrays"].items():
        files = [f for f in (tmp_path / f"z.zarr/parts/part-000000/{name}").rglob("c/**/*") if f.is_file()]
        assert len(files) == len(rec["chunk_bytes"]) == -(-n // rec["chunk_rows"]) >= 2, name


def test_bench_open_counts_what_the_gate_reads(store):
    result = CliRunner().invoke(main, ["bench", "open", str(store.path), "--repeats", "1"])
    assert result.exit_code == 0 and "4 parts, 16 chunk files" in result.output, (
        result.output
    )  # 1 grid + 3 point arrays a part
    assert "scalr view: manifests" in result.output and "first scan" in result.output


@pytest.mark.parametrize("layout", ["grid", "points", "int8"])
def test_direct_chunk_reads_equal_zarr_and_never_fill(stores, layout, tmp_path):
    """The store reads its own chunk files (CRC, blosc, columns transposed back) instead of going
    through zarr's generic path: bitwise the same rows, and a chunk file that vanished after
    opening is an error."""

    store = stores[layout]
    for part in store.committed_parts():
        for name, arr in store.arrays(part).items():
            assert stored_axis_order(arr) == ((1, 0) if name in ("points", "pixel") else tuple(range(arr.ndim))), name
            n = arr.shape[0]
            for start, stop in [(0, n), (0, 1), (n // 3, n // 2 + 1), (max(n - 2, 0), n), (3, 3)]:
                got = read_rows(store.part_folder(part) / name, arr, start, stop)
                assert got.dtype == arr.dtype and np.array_equal(got, arr[start:stop]), (part, name, start, stop)
    path = Path(shutil.copytree(store.path, tmp_path / "s.zarr"))
    opened = FeatureStore(path)
    first_chunk(path, 0, "points").unlink()
    with pytest.raises(StoreError, match="part-000000/points: rows 0-9 unreadable, a chunk is corrupt or missing"):
        opened.read_points(0, 0, 10)
