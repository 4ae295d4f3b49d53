"""probe-store: a teacher's linear-probe mIoU from its stores alone, on every layout, int8 and
several teachers joined; a run folder `scalr runs` lists beside students."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import tiny_store

from pipeline.errors import ConfigError
from stages.cli import main
from stages.downstream.probe_store import ProbeStoreConfig, probe_store
from stages.tools.runs import find_runs, run_row, table_lines


@pytest.fixture(scope="module")
def stores(kitti_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ps")
    kinds = {"grid": {}, "points": {"layout": "points"}, "int8": {"quantize": "int8"}}
    made = {
        k: {s: tiny_store(kitti_root, tmp / f"{k}-{s}.zarr", split=s, **kw) for s in ("train", "val")}
        for k, kw in kinds.items()
    }
    made["dino"] = {
        s: tiny_store(kitti_root, tmp / f"dino-{s}.zarr", split=s, teacher="dino-vits8") for s in ("train", "val")
    }
    return made


def run(stores, kitti_root, out, *kinds, **kw):
    train = tuple(stores[k]["train"].path for k in kinds)
    val = tuple(stores[k]["val"].path for k in kinds)
    return probe_store(ProbeStoreConfig(train, val, "semantickitti", kitti_root, out, epochs=5, **kw))


def test_every_layout_scores_the_same_targets(stores, kitti_root, tmp_path):
    results = {k: run(stores, kitti_root, tmp_path / k, k) for k in ("grid", "points", "int8")}
    counts = {k: r["visible_points"] for k, r in results.items()}
    assert counts["grid"] == counts["points"] == counts["int8"]
    assert sum(counts["grid"]["train"].values()) == results["grid"]["points"]["train"] > 1000
    assert abs(results["grid"]["miou"] - results["points"]["miou"]) < 0.02  # float16 rounding of the same targets
    record = json.loads((tmp_path / "grid/config.json").read_text())
    assert record["stage"] == "probe-store" and [s["teacher"]["name"] for s in record["stores"]] == ["test-vit"]


def test_teachers_join_and_a_fraction_samples_scans(stores, kitti_root, tmp_path):
    joined = run(stores, kitti_root, tmp_path / "joined", "grid", "dino")
    assert joined["teachers"] == ["dino-vits8", "test-vit"]
    half = run(stores, kitti_root, tmp_path / "half", "grid", fraction=0.5)
    assert 0 < half["points"]["train"] < joined["points"]["train"]
    with pytest.raises(ConfigError, match="teachers"):
        probe_store(
            ProbeStoreConfig(
                (stores["grid"]["train"].path,),
                (stores["dino"]["val"].path,),
                "semantickitti",
                kitti_root,
                tmp_path / "x",
            )
        )  # noqa: E501


@pytest.mark.parametrize(
    ("other", "key"), [({"seed": 1}, "teacher"), ({"image_size": (64, 128)}, "image_size")], ids=["weights", "size"]
)
def test_validation_stores_of_other_teaching_are_refused(stores, kitti_root, tmp_path, other, key):
    """The same teacher name with other weights, or another image size, is not the same teaching."""
    val = tiny_store(kitti_root, tmp_path / "val.zarr", split="val", **other)
    cfg = ProbeStoreConfig((stores["grid"]["train"].path,), (val.path,), "semantickitti", kitti_root, tmp_path / "x")
    with pytest.raises(ConfigError, match=f"val.zarr: its {key} differs"):
        probe_store(cfg)


def test_the_cli_writes_a_run_that_scalr_runs_lists(stores, kitti_root, tmp_path):
    out = tmp_path / "runs/teacher"
    args = ["probe-store", "--train", stores["int8"]["train"].path, "--val", stores["int8"]["val"].path]
    result = CliRunner().invoke(
        main, [str(a) for a in (*args, "--dataset", "semantickitti", "--root", kitti_root, "--out", out, "--epochs", 3)]
    )
    assert result.exit_code == 0 and "mIoU" in result.output and "visible train" in result.output, result.output
    (row,) = [run_row(r) for r in find_runs([tmp_path / "runs"])]
    saved = json.loads((out / "eval-semantickitti-val.json").read_text())
    assert row["stage"] == "probe-store" and row["teachers"] == ["test-vit"] and row["best_miou"] == saved["miou"]
    assert np.isfinite(saved["miou"]) and table_lines([row])[2].split()[1:3] == ["probe-store", "-"]  # own column


def test_the_oracle_is_near_its_ceiling_and_a_random_teacher_far_below(stores, kitti_root, tmp_path):
    """The oracle sees every pixel's class: its probe recovers the classes it has points of (its
    ceiling: 1 for each); the random-init ViT's is far below."""
    oracle = {
        s: tiny_store(kitti_root, tmp_path / f"oracle-{s}.zarr", split=s, teacher="oracle", image_size=(224, 448))
        for s in ("train", "val")
    }  # noqa: E501
    found = probe_store(
        ProbeStoreConfig((oracle["train"].path,), (oracle["val"].path,), "semantickitti", kitti_root, tmp_path / "o")
    )  # noqa: E501
    random = run(stores, kitti_root, tmp_path / "r", "grid")
    seen = [
        c for c, n in found["visible_points"]["train"].items() if n >= 300 and found["visible_points"]["val"][c] >= 300
    ]
    assert seen and all(found["per_class_iou"][c] >= 0.6 for c in seen), (seen, found["per_class_iou"])  # 0.69-0.94
    assert found["miou"] >= random["miou"] + 0.2 and found["accuracy"] >= 0.8, (
        found["miou"],
        random["miou"],
    )  # 0.39, 0.06


def test_the_oracle_refuses_data_without_class_maps(kitti_copy, tmp_path):
    shutil.rmtree(kitti_copy / ".scalr-classes")
    result = CliRunner().invoke(
        main,
        [
            str(a)
            for a in (
                "extract-features",
                "--dataset",
                "semantickitti",
                "--root",
                kitti_copy,
                "--teacher",
                "oracle",
                "--random-init",
                "--out",
                tmp_path / "s.zarr",
            )
        ],
    )  # noqa: E501
    assert result.exit_code == 1 and "teacher oracle sees the class maps only the synthetic rigs have" in result.output
