"""Nothing is mixed silently: an extraction resumed over changed dataset files, a synthetic root
written twice, a store given twice or one teacher twice in a joined target."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_same_store, tiny_store

from pipeline.errors import DatasetError, PathError
from pipeline.synth import MARKER, SynthConfig, generate
from stages.cli import main
from stages.extract.extract import ExtractConfig, extract
from stages.student.samples import DistillationData, SampleConfig
from storage.feature_store import FeatureStore, StoreError
from storage.verify import verify_store

TINY = SynthConfig(seed=3, scenes=1, frames=4, azimuth_steps=256, image_scale=0.3)


def config(root, out, **kw) -> ExtractConfig:
    base = {"random_init": True, "image_size": (32, 64), "scans_per_part": 2, "num_workers": 0}
    return ExtractConfig("semantickitti", root, "train", "test-vit", out, **{**base, **kw})


def test_a_resume_over_changed_files_is_refused_or_redone(tmp_path):
    root = tmp_path / "kitti"
    generate("semantickitti", root, TINY)
    out = tmp_path / "s.zarr"
    store = extract(config(root, out))
    record = store.part_record(0)["inputs"]
    assert "sequences/00/velodyne/000000.bin" in record and "sequences/00/image_2/000001.png" in record
    assert "sequences/00/calib.txt" in record and "sequences/00/velodyne/000002.bin" not in record  # part 1's
    scan = root / "sequences/00/velodyne/000001.bin"  # an input of part 0, edited since
    points = np.fromfile(scan, dtype=np.float32).reshape(-1, 4)
    points[:, 3] = 0.5
    points.tofile(scan)
    later(scan)
    with pytest.raises(DatasetError, match=rf"{scan}: changed \(size or modification time\) since part 0 of .*s.zarr"):
        extract(config(root, out))
    result = CliRunner().invoke(main, ["extract-features", *cli_args(root, out)])
    assert result.exit_code == 1 and f"Error: {scan}: changed" in result.output and "--redo-changed" in result.output
    extract(config(root, out, redo_changed=True))
    assert verify_store(out)[0] == []
    extract(config(root, tmp_path / "fresh.zarr"))
    assert_same_store(out, tmp_path / "fresh.zarr")  # part 0 computed again from the edited file


def later(path):
    """A modification time one second on (file systems with coarse clocks may not tell a quick edit)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def cli_args(root, out):
    return [
        *("--dataset", "semantickitti", "--root", root, "--split", "train", "--teacher", "test-vit", "--random-init"),
        *("--image-size", "32x64", "--scans-per-part", "2", "--num-workers", "0", "--out", out),
    ]


def test_an_unchanged_dataset_resumes_and_a_touched_file_counts_as_changed(tmp_path):
    root = tmp_path / "kitti"
    generate("semantickitti", root, TINY)
    out = tmp_path / "s.zarr"
    extract(config(root, out))
    extract(config(root, out))  # nothing changed: nothing to do, no complaint
    image = root / "sequences/00/image_2/000003.png"
    later(image)
    with pytest.raises(DatasetError, match="000003.png: changed"):
        extract(config(root, out))


def test_synth_never_mixes_two_datasets(tmp_path):
    root = tmp_path / "synth"
    generate("semantickitti", root, TINY)
    assert (root / MARKER).is_file()
    with pytest.raises(PathError, match="holds a synthetic dataset already; pass --overwrite"):
        generate("semantickitti", root, replace(TINY, seed=4))
    scans = sorted(p.name for p in (root / "sequences/00/velodyne").iterdir())
    generate("semantickitti", root, replace(TINY, frames=2), overwrite=True)  # fewer frames: nothing left over
    assert sorted(p.name for p in (root / "sequences/00/velodyne").iterdir()) == scans[:2]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    result = CliRunner().invoke(main, ["synth", "--format", "nuscenes", "--out", str(mine), "--overwrite"])
    assert result.exit_code == 1 and "is not empty and not a scalr synthetic dataset" in result.output
    assert (mine / "thesis.tex").read_text() == "keep me"


def test_a_store_given_twice_or_a_teacher_twice_is_refused(kitti_root, tmp_path):
    store = tiny_store(kitti_root, tmp_path / "a.zarr")
    with pytest.raises(StoreError, match="a.zarr: given twice"):
        DistillationData([store.path, tmp_path / "." / "a.zarr"], SampleConfig())
    copy = shutil.copytree(store.path, tmp_path / "copy.zarr")
    with pytest.raises(StoreError, match="teacher test-vit of .*a.zarr again \\(the same weights\\)"):
        DistillationData([store.path, copy], SampleConfig())
    other = tiny_store(kitti_root, tmp_path / "b.zarr", seed=1)  # the same teacher, other weights
    assert FeatureStore(other.path).attrs["teacher"]["weights"] != store.attrs["teacher"]["weights"]
    with pytest.raises(StoreError, match="again \\(other weights\\)"):
        DistillationData([store.path, other.path], SampleConfig())
