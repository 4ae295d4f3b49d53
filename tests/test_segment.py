"""Downstream: probing, finetuning, evaluation."""

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import tiny_store
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import stages.downstream.evaluate as evaluate_module
from pipeline.class_maps import NUSCENES_SEMANTICKITTI, ClassMap
from pipeline.datasets import open_dataset
from pipeline.datasets.nuscenes import CLASSES
from pipeline.errors import DatasetError
from pipeline.transforms import Grid, knn, student_features
from stages.cli import main
from stages.downstream.evaluate import EvaluateConfig, confusion, evaluate, iou_from_confusion
from stages.downstream.finetune import layer_decay_groups
from stages.downstream.labelled import frames_from_file, label_subset
from stages.downstream.segment import SegmentConfig, train_segmentation
from stages.downstream.segmenter import SegmentationModel
from stages.student.checkpoints import load_backbone
from stages.student.losses import lovasz_softmax, segmentation_loss
from stages.student.pretrain import PretrainConfig, pretrain
from stages.student.samples import SampleConfig
from stages.student.train import OptimConfig, TrainConfig, tensorboard_writer
from stages.student.waffleiron import WaffleIron, WaffleIronConfig
from storage.checkpoint import CheckpointError, load_checkpoint
from storage.feature_store import FeatureStore

GRID = Grid(cell=4.0)
SAMPLE = SampleConfig(max_points=10**9, grid=GRID)


@pytest.fixture(scope="module")
def pretrained(kitti_root, tmp_path_factory):
    """A tiny student distilled from a random test-vit on the KITTI-format rig."""
    tmp = tmp_path_factory.mktemp("pre")
    store = tiny_store(kitti_root, tmp / "s.zarr")
    cfg = PretrainConfig(
        stores=(store.path,),
        out=tmp / "run",
        model=WaffleIronConfig(depth=2, width=16, grid_shape=GRID.shape),
        sample=SampleConfig(max_points=5000, grid=GRID),
        optim=OptimConfig(warmup_iters=1),
        train=TrainConfig(batch_size=2, epochs=2, num_workers=0),
    )
    return pretrain(cfg)["checkpoint"]


def probe_args(kitti_root, checkpoint, out) -> list[str]:
    """`scalr probe` for one epoch of batches of 2 on the KITTI-format rig's coarse grid."""
    data = ["--dataset", "semantickitti", "--root", str(kitti_root), "--checkpoint", str(checkpoint), "--out", str(out)]
    return ["probe", *data, "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--set", "sample.grid.cell=4.0"]


def probe_cfg(kitti_root, out, checkpoint, mode="probe", **train):
    cfg = SegmentConfig.for_mode(
        mode, dataset="semantickitti", root=kitti_root, out=out, checkpoint=checkpoint, sample=SAMPLE
    )
    return cfg.__class__(
        **{
            **cfg.__dict__,
            "train": TrainConfig(**{"epochs": 30, "batch_size": 2, "num_workers": 0, "log_every": 5, **train}),
            "warmup_epochs": 1,
        }
    )


def test_probing_learns_and_keeps_the_backbone_bit_identical(kitti_root, pretrained, tmp_path):
    before = {k: v.clone() for k, v in load_checkpoint(pretrained)["model"].items() if k.startswith("backbone.")}
    cfg = probe_cfg(kitti_root, tmp_path / "probe", pretrained)
    summary = train_segmentation(cfg.__class__(**{**cfg.__dict__, "optim": OptimConfig(lr=1e-2, weight_decay=3e-3)}))
    after = load_checkpoint(summary["checkpoint"])["model"]
    for k, v in before.items():  # weights AND BatchNorm running statistics
        assert torch.equal(after[k], v), k
    result = evaluate(EvaluateConfig("semantickitti", kitti_root, summary["checkpoint"], split="train", sample=SAMPLE))
    chance = 1 / 19
    assert result["miou"] > 2 * chance and result["accuracy"] > 0.5, (result["miou"], result["accuracy"])
    assert (tmp_path / "probe/frames.txt").read_text().split() == ["00/000000", "00/000001"]


def test_finetune_layer_decay_gives_the_documented_rates():
    model = SegmentationModel(WaffleIron(WaffleIronConfig(depth=4, width=8)), 5, frozen=False)
    groups = layer_decay_groups(model, 2e-3, 0.9)
    rates = {g["layer"]: g["lr"] for g in groups}
    assert sorted(rates) == [0, 1, 2, 3, 4, 5]
    for layer, lr in rates.items():
        assert lr == pytest.approx(2e-3 * 0.9 ** (5 - layer))
    assert rates[5] == pytest.approx(2e-3)  # the head trains at the base rate
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_finetune_and_scratch_train(kitti_root, pretrained, tmp_path):
    ft = train_segmentation(probe_cfg(kitti_root, tmp_path / "ft", pretrained, mode="finetune", epochs=2))
    state = load_checkpoint(ft["checkpoint"])
    assert state["config"]["config"]["model"]["drop_path"] == 0.2
    lrs = [g["initial_lr"] for g in state["optimizer"]["param_groups"]]  # base rates (the schedule ends at lr 0)
    assert len(lrs) == 4 and lrs[0] < lrs[-1]  # embedding, 2 layers, head: decayed rates
    cfg = probe_cfg(kitti_root, tmp_path / "scratch", None, mode="scratch", epochs=1)
    scratch = train_segmentation(cfg.__class__(**{**cfg.__dict__, "student": "WI-12-64"}))
    assert scratch["steps"] == 1


def test_miou_on_a_hand_made_confusion_matrix():
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # rows labels, columns predictions; class 2 absent
    scores = iou_from_confusion(cm)
    assert scores["iou"][0] == pytest.approx(5 / 8) and scores["iou"][1] == pytest.approx(3 / 6)
    assert np.isnan(scores["iou"][2])
    assert scores["miou"] == pytest.approx((5 / 8 + 3 / 6) / 2)  # NaN-mean: the absent class does not count
    assert scores["accuracy"] == pytest.approx(8 / 11)
    labels = np.array([0, 0, 1, 255, 2])
    pred = np.array([0, 1, 1, 0, 0])
    assert confusion(pred, labels, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_lovasz_is_zero_for_perfect_predictions():
    labels = torch.tensor([0, 1, 2, 255])
    perfect = torch.eye(3)[[0, 1, 2, 0]]
    assert lovasz_softmax(perfect, labels).item() == pytest.approx(0.0)
    assert lovasz_softmax(torch.full((4, 3), 1 / 3), labels).item() > 0.5
    assert torch.isfinite(segmentation_loss(torch.randn(4, 3), torch.full((4,), 255)))


def test_label_fractions():
    ids = [f"00/{i:06d}" for i in range(250)][::-1]
    one = label_subset(ids, 0.01)
    assert sorted(ids[i] for i in one) == ["00/000000", "00/000100", "00/000200"]
    assert len(label_subset(ids, 0.1)) == 25 and len(label_subset(ids, 1.0)) == 250


def test_bad_downstream_input(kitti_root, kitti_copy, pretrained, tmp_path):
    other = tmp_path / "other.pt"
    state = load_checkpoint(pretrained)
    state["config"]["config"]["model"]["width"] = 32
    torch.save(state, other)
    with pytest.raises(
        CheckpointError,
        match=r"other.pt: weights do not fit the recorded student \(depth 2, width 32\) .*first: "
        r"embedding.point.weight is \(16, 5\), the model's is \(32, 5\)",
    ):
        load_backbone(other)
    with pytest.raises(ValueError, match="not a segmentation model"):
        evaluate(EvaluateConfig("semantickitti", kitti_root, pretrained))

    shutil.rmtree(kitti_copy / "sequences/00/labels")
    with pytest.raises(DatasetError, match="has no labels"):
        train_segmentation(probe_cfg(kitti_copy, tmp_path / "nolabels", pretrained, epochs=1))
    with pytest.raises(ValueError, match="probe needs --checkpoint"):
        train_segmentation(probe_cfg(kitti_root, tmp_path / "x", None, epochs=1))


@pytest.fixture(scope="module")
def segmenter(kitti_root, pretrained, tmp_path_factory):
    return train_segmentation(probe_cfg(kitti_root, tmp_path_factory.mktemp("seg") / "probe", pretrained, epochs=1))[
        "checkpoint"
    ]


def bad_checkpoints(good: str, segmenter: str, folder) -> dict:
    """Damaged or foreign checkpoint files, each with the words its one-line error must say."""
    bad = {}
    state = load_checkpoint(segmenter)
    state["config"]["config"]["model"]["depth"] = 3  # another architecture than its tensors
    torch.save(state, folder / "other-arch.pt")
    bad["other-arch.pt"] = "weights do not fit"
    (folder / "truncated.pt").write_bytes(Path(segmenter).read_bytes()[:5000])
    bad["truncated.pt"] = "not a readable checkpoint"
    torch.save([1, 2, 3], folder / "list.pt")
    bad["list.pt"] = "holds a list, not a checkpoint dict"
    torch.save({"weights": torch.zeros(3)}, folder / "no-model.pt")
    bad["no-model.pt"] = "has no 'model' state dict"
    (folder / "text.pt").write_text("not a checkpoint at all\n")
    bad["text.pt"] = "not a readable checkpoint"
    state = load_checkpoint(good)
    del state["config"]["config"]
    torch.save(state, folder / "no-student.pt")
    bad["no-student.pt"] = "no student configuration recorded"
    return bad


@pytest.mark.parametrize("command", ["probe", "finetune", "evaluate", "plot-features"])
def test_every_command_names_a_bad_checkpoint(command, kitti_root, pretrained, segmenter, tmp_path):
    data = ["--dataset", "semantickitti", "--root", str(kitti_root), "--split", "val"]
    extra = {
        "probe": ["--out", str(tmp_path / "run"), "--epochs", "1"],
        "finetune": ["--out", str(tmp_path / "run"), "--epochs", "1"],
        "evaluate": [],
        "plot-features": ["--scan", "08/000000", "--out", str(tmp_path / "pics")],
    }[command]
    for name, said in bad_checkpoints(pretrained, segmenter, tmp_path).items():
        if command == "evaluate" and name == "no-student.pt":
            said = "a pretrain checkpoint, not a segmentation model"
        result = CliRunner().invoke(main, [command, *data, "--checkpoint", str(tmp_path / name), *extra])
        assert result.exit_code == 1, (name, result.output)
        assert f"{tmp_path / name}: " in result.output and said in result.output and "Traceback" not in result.output, (
            name,
            result.output,
        )
    result = CliRunner().invoke(main, [command, *data, "--checkpoint", str(tmp_path / "absent.pt"), *extra])
    assert result.exit_code == 1 and "absent.pt: checkpoint file is missing" in result.output


def test_cli_probe_and_evaluate(kitti_root, pretrained, tmp_path):
    out = tmp_path / "probe"
    args = probe_args(kitti_root, pretrained, str(out))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--dataset",
            "semantickitti",
            "--root",
            str(kitti_root),
            "--split",
            "val",
            "--checkpoint",
            str(out / "checkpoints/last.pt"),
        ],
    )
    assert "mIoU" in result.output and (out / "eval-semantickitti-val.json").is_file()


def test_evaluate_runs_the_model_under_the_recipes_autocast(kitti_root, pretrained, tmp_path, monkeypatch):
    """The released Finetuner evaluates under the autocast it trains with: fp32 for a cvpr model by
    default, and what --precision says (bf16 is ScaLR+'s default: test_released_plus.py)."""
    ckpt = train_segmentation(probe_cfg(kitti_root, tmp_path / "p", pretrained, epochs=1))["checkpoint"]
    seen = []

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return run_on_scan(*args, **kwargs)

    run_on_scan = evaluate_module.run_on_scan
    monkeypatch.setattr(evaluate_module, "run_on_scan", spy)
    base = {"dataset": "semantickitti", "root": kitti_root, "checkpoint": Path(ckpt), "max_scans": 1, "device": "cpu"}
    assert evaluate(EvaluateConfig(**base, out=tmp_path / "a.json"))["precision"] == "fp32"
    assert seen == [None]
    result = evaluate(EvaluateConfig(**base, out=tmp_path / "b.json", precision="bf16"))
    assert result["precision"] == "bf16" and seen == [None, torch.bfloat16]
    assert json.loads((tmp_path / "b.json").read_text())["precision"] == "bf16"


def test_evaluate_with_corruptions(kitti_root, pretrained, tmp_path):
    cfg = probe_cfg(kitti_root, tmp_path / "p", pretrained, epochs=1)
    ckpt = train_segmentation(cfg)["checkpoint"]
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--dataset",
            "semantickitti",
            "--root",
            str(kitti_root),
            "--split",
            "train",
            "--checkpoint",
            ckpt,
            "--corruptions",
            "fog,beam_missing",
            "--out",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output

    r = json.loads((tmp_path / "r.json").read_text())["corruptions"]
    assert set(r["miou"]) == {"fog", "beam_missing"} and all(len(v) == 3 for v in r["miou"].values())
    assert r["mce"] is None and r["mrr"] > 0  # no published SemanticKITTI-C baseline in the recipe
    assert "mRR" in result.output and "n/a (no published baseline" in result.output
    bad = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--dataset",
            "semantickitti",
            "--root",
            str(kitti_root),
            "--checkpoint",
            ckpt,
            "--corruptions",
            "rain",
        ],
    )
    assert bad.exit_code == 1 and "unknown corruptions ['rain']" in bad.output


def test_domain_generalisation_through_the_shared_classes(kitti_root, nuscenes_root, pretrained, tmp_path):
    """A KITTI-trained model scored on nuScenes-format data through the 10 shared classes."""

    ckpt = train_segmentation(probe_cfg(kitti_root, tmp_path / "p", pretrained, epochs=1))["checkpoint"]
    result = evaluate(EvaluateConfig("nuscenes", nuscenes_root, ckpt, split="mini_val"))
    assert (
        list(result["per_class_iou"]) == list(NUSCENES_SEMANTICKITTI.classes)
        and result["class_map"] == "nuscenes-semantickitti-10"
    )
    lut = NUSCENES_SEMANTICKITTI.lookup("nuscenes", CLASSES)
    assert (
        lut[CLASSES.index("bus")] == NUSCENES_SEMANTICKITTI.classes.index("other_vehicle")
        and lut[CLASSES.index("manmade")] == 255
    )
    partial = ClassMap("partial", ("car",), {"nuscenes": {"car": "car"}})
    with pytest.raises(ValueError, match="leaves nuscenes classes unmapped"):
        partial.lookup("nuscenes", CLASSES)


def test_other_predictions_count_as_errors_across_datasets():
    cm = np.array([[3, 1], [0, 0]])  # one shared class; one of its points predicted as "other"
    assert iou_from_confusion(cm, 1)["iou"].tolist() == [0.75]


def released_layout(depth: int, width: int, classes: int, cin: int = 5) -> dict[str, tuple]:
    """The state dict of the released Segmenter (valeoai/ScaLR waffleiron/*.py, BatchNorm
    backbone, a 1x1 conv head), written out by hand from its modules: key -> shape."""

    def bn(prefix: str, c: int) -> dict[str, tuple]:
        return {
            f"{prefix}.weight": (c,),
            f"{prefix}.bias": (c,),
            f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,),
            f"{prefix}.num_batches_tracked": (),
        }

    c = width
    keys = {
        **bn("embed.norm", cin),
        "embed.conv1.weight": (c, cin, 1),
        "embed.conv1.bias": (c,),
        **bn("embed.conv2.0", cin),
        "embed.conv2.1.weight": (c, cin, 1, 1),
        **bn("embed.conv2.2", c),
        "embed.conv2.4.weight": (c, c, 1, 1),
        "embed.final.weight": (c, 2 * c, 1),
        "embed.final.bias": (c,),
        "classif.weight": (classes, c, 1),
        "classif.bias": (classes,),
    }
    for d in range(depth):
        keys.update(bn(f"waffleiron.channel_mix.{d}.norm", c))
        keys.update(
            {
                f"waffleiron.channel_mix.{d}.mlp.0.weight": (c, c, 1),
                f"waffleiron.channel_mix.{d}.mlp.0.bias": (c,),
                f"waffleiron.channel_mix.{d}.mlp.2.weight": (c, c, 1),
                f"waffleiron.channel_mix.{d}.mlp.2.bias": (c,),
                f"waffleiron.channel_mix.{d}.scale.weight": (c, 1, 1),
            }
        )
        keys.update(bn(f"waffleiron.spatial_mix.{d}.norm", c))
        keys.update(
            {
                f"waffleiron.spatial_mix.{d}.ffn.0.weight": (c, 1, 3, 3),
                f"waffleiron.spatial_mix.{d}.ffn.0.bias": (c,),
                f"waffleiron.spatial_mix.{d}.ffn.2.weight": (c, 1, 3, 3),
                f"waffleiron.spatial_mix.{d}.ffn.2.bias": (c,),
                f"waffleiron.spatial_mix.{d}.scale.weight": (c, 1, 1),
            }
        )
    return keys


def test_released_checkpoints_convert_bitwise_and_load_everywhere(kitti_root, pretrained, tmp_path):
    """A pretraining checkpoint written in the released format (as its distill.py under DDP:
    "module." keys) has exactly the released model's tensors; it converts back bitwise; probe,
    evaluate and plot-features take it as it is, with the same backbone features."""
    ours = load_checkpoint(pretrained)
    released = tmp_path / "ckpt_last.pth"
    result = CliRunner().invoke(main, ["convert", str(pretrained), str(tmp_path / "plain.pth")])
    assert result.exit_code == 0 and "released checkpoint written" in result.output, result.output
    plain = torch.load(tmp_path / "plain.pth", weights_only=True)["model_points"]
    head_out = ours["model"]["head.weight"].shape[0]
    assert {k: tuple(v.shape) for k, v in plain.items()} == released_layout(2, 16, head_out)
    torch.save(
        {
            "epoch": 1,
            "model_point": {f"module.{k}": v for k, v in plain.items()},
            "optim": {"state": {}, "param_groups": []},
        },
        released,
    )

    back = tmp_path / "back.pt"
    assert CliRunner().invoke(main, ["convert", str(released), str(back)]).exit_code == 0
    converted = load_checkpoint(back)
    assert converted["config"]["stage"] == "released-pretrain" and set(converted["model"]) == set(ours["model"])
    assert all(torch.equal(converted["model"][k], v) for k, v in ours["model"].items())
    again = tmp_path / "again.pth"
    assert CliRunner().invoke(main, ["convert", str(back), str(again)]).exit_code == 0
    round_trip = torch.load(again, weights_only=True)
    assert list(round_trip) == ["model_point"] and set(round_trip["model_point"]) == {f"module.{k}" for k in plain}
    assert all(torch.equal(round_trip["model_point"][f"module.{k}"], v) for k, v in plain.items())

    a, _ = load_backbone(pretrained)
    b, record = load_backbone(released, a.cfg.grid_shape)
    assert record["stage"] == "released-pretrain" and (b.cfg.depth, b.cfg.width, b.cfg.norm) == (2, 16, "batch")
    batch = {
        "feats": torch.randn(50, 5),
        "cells": torch.randint(0, 4, (50, 3)),
        "neighbours": torch.randint(0, 50, (50, 16)),
        "batch": torch.zeros(50, dtype=torch.long),
        "batch_size": 1,
    }
    torch.testing.assert_close(a.eval()(batch), b.eval()(batch), rtol=0, atol=0)

    args = [
        "probe",
        "--dataset",
        "semantickitti",
        "--root",
        str(kitti_root),
        "--checkpoint",
        str(released),
        "--out",
        str(tmp_path / "p"),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--set",
        "sample.grid.cell=4.0",
    ]
    assert CliRunner().invoke(main, args).exit_code == 0
    seg = tmp_path / "p/checkpoints/last.pt"
    assert CliRunner().invoke(main, ["convert", str(seg), str(tmp_path / "net.pth")]).exit_code == 0
    net = torch.load(tmp_path / "net.pth", weights_only=True)["net"]  # finetune.py's format: BatchNorm1d + conv head
    assert tuple(net["classif.1.weight"].shape) == (19, 16, 1) and "classif.0.running_mean" in net
    for ckpt in (seg, tmp_path / "net.pth"):
        result = CliRunner().invoke(
            main,
            [
                "evaluate",
                "--dataset",
                "semantickitti",
                "--root",
                str(kitti_root),
                "--split",
                "val",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(tmp_path / f"{ckpt.stem}.json"),
            ],
        )
        assert result.exit_code == 0 and "mIoU" in result.output, result.output
    result = CliRunner().invoke(
        main,
        [
            "plot-features",
            "--dataset",
            "semantickitti",
            "--root",
            str(kitti_root),
            "--scan",
            "00/000000",
            "--checkpoint",
            str(released),
            "--out",
            str(tmp_path / "pics"),
        ],
    )
    assert result.exit_code == 0 and result.output.count("plot:") == 2, result.output


def test_released_checkpoint_with_a_foreign_tensor_is_named(pretrained, tmp_path):
    plain = tmp_path / "plain.pth"
    CliRunner().invoke(main, ["convert", str(pretrained), str(plain)])
    state = torch.load(plain, weights_only=True)
    state["model_points"]["embed.extra.weight"] = torch.zeros(3)
    torch.save(state, plain)
    with pytest.raises(
        CheckpointError, match="plain.pth: embed.extra.weight is not a tensor of the released WaffleIron segmenter"
    ):
        load_backbone(plain)


def test_embed_writes_student_features_of_the_released_evaluation_points(kitti_root, pretrained, tmp_path):
    """`scalr embed`: one entry per scan; the kept points are the released evaluation code's
    (first point of each 0.1 m voxel cut from the cloud's minimum, then the strict field of view),
    written out here by hand; features are the backbone's on exactly those inputs."""

    out = tmp_path / "e.zarr"
    args = [
        "embed",
        "--checkpoint",
        str(pretrained),
        "--dataset",
        "semantickitti",
        "--root",
        str(kitti_root),
        "--split",
        "val",
        "--out",
        str(out),
        "--dtype",
        "float32",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, ["verify", str(out)]).output.startswith(f"{out}: OK")
    summary = CliRunner().invoke(main, ["inspect", str(out)])
    assert summary.exit_code == 0 and "student" in summary.output and "lidar" in summary.output, summary.output
    pictures = CliRunner().invoke(
        main,
        [
            "inspect",
            str(out),
            "--scan",
            "08/000000",
            "--camera",
            "lidar",
            "--plot",
            str(tmp_path / "pics"),
            "--class",
            "car",
        ],
    )
    assert pictures.exit_code == 0 and pictures.output.count("plot:") == 2, pictures.output
    store = FeatureStore(out)
    ds = open_dataset("semantickitti", kitti_root, "val")
    backbone, _ = load_backbone(pretrained, (256, 256, 32))
    backbone.eval()
    for row in store.manifest().to_pylist():
        scan = ds[ds.index_of(row["scan_id"])]
        xyz = scan.points[:, :3]
        _, first = np.unique(((xyz - xyz.min(0)) / np.float32(0.1)).astype(int), axis=0, return_index=True)
        inside = ((xyz[first] > np.float32(-64 + 1e-4)) & (xyz[first] < np.float32(64 - 1e-4)))[:, :2].all(1) & (
            np.abs(xyz[first, 2]) < np.float32(8 - 1e-4)
        )
        kept = np.sort(first[inside])
        entry = store.read_points(row["part"], row["offset"], row["count"], names=("point_index", "points", "features"))
        assert row["camera"] == "lidar" and entry["point_index"].tolist() == kept.tolist()
        p = scan.points[kept]
        batch = {
            "feats": torch.from_numpy(student_features(p[:, :3], p[:, 3], (0.28613698, 0.14090556))),
            "cells": torch.from_numpy(((p[:, :3].astype(np.float64) + [64, 64, 8]) / 0.5).astype(np.int32)),
            "neighbours": torch.from_numpy(knn(p[:, :3], 16)),
            "batch": torch.zeros(len(p), dtype=torch.long),
            "batch_size": 1,
        }
        with torch.no_grad():
            expected = backbone(batch).numpy()
        np.testing.assert_allclose(entry["features"], expected, rtol=1e-5, atol=1e-6)
        assert entry["features"].dtype == np.float32 and np.array_equal(entry["points"], p)
    plain = zarr.open_group(str(out / "parts/part-000000"), mode="r")
    assert plain["features"].dtype == np.float32 and plain["features"].shape[1] == 16
    every = tmp_path / "all.zarr"
    assert CliRunner().invoke(main, [*args[:-4], "--out", str(every), "--voxel-size", "0"]).exit_code == 0
    counts = {r["scan_id"]: r["count"] for r in FeatureStore(every).manifest().to_pylist()}
    for scan_id, count in counts.items():
        xyz = ds[ds.index_of(scan_id)].points[:, :3]
        assert count == int(
            ((np.abs(xyz[:, :2]) < np.float32(64 - 1e-4)).all(1) & (np.abs(xyz[:, 2]) < np.float32(8 - 1e-4))).sum()
        )


def test_frame_lists_text_and_released_npy(nuscenes_root, tmp_path):
    """--frames-file: scan ids one a line, or the released .npy rows (lidar file, label file,
    token) matched by token or by lidar file name; an entry naming no scan is an error."""

    ds = open_dataset("nuscenes", nuscenes_root, "mini_train")
    ids = ds.scan_ids
    last = len(ids) - 1
    assert last >= 1
    (tmp_path / "f.txt").write_text(f"# two frames\n{ids[last]}\n\n{ids[0]}\n")
    assert frames_from_file(ds, tmp_path / "f.txt") == [0, last]
    files = {token: name for name, token in ds.scan_aliases().items()}
    rows = np.array(
        [[f"samples/LIDAR_TOP/{files[ids[last]]}", "lidarseg/x.bin", "not-a-token"], ["a", "b", ids[0]]], dtype=object
    )
    np.save(tmp_path / "f.npy", rows, allow_pickle=True)
    assert frames_from_file(ds, tmp_path / "f.npy") == [0, last]
    (tmp_path / "bad.txt").write_text(f"{ids[0]}\nnope\n")
    with pytest.raises(DatasetError, match="bad.txt: entry 2 \\(nope\\) names no scan of nuscenes mini_train"):
        frames_from_file(ds, tmp_path / "bad.txt")


def test_runs_table_plot_and_tensorboard(kitti_root, pretrained, tmp_path, monkeypatch, caplog):
    """`scalr runs` finds runs under a folder and shows each one's stage, student, teachers or
    pretraining run, steps, final loss and best evaluated mIoU; --plot draws all loss curves.
    Every run writes TensorBoard events (evaluation too); without tensorboard, a note, no failure."""

    out = tmp_path / "runs/probe"
    args = probe_args(kitti_root, pretrained, str(out))
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (
        CliRunner()
        .invoke(
            main,
            [
                "evaluate",
                "--dataset",
                "semantickitti",
                "--root",
                str(kitti_root),
                "--split",
                "val",
                "--checkpoint",
                str(out / "checkpoints/last.pt"),
            ],
        )
        .exit_code
        == 0
    )
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {
        "train/loss",
        "train/lr",
        "train/samples_per_s",
        "train/peak_memory_mib",
        "eval/semantickitti-val/miou",
    } <= set(tags)
    assert any(t.startswith("eval/semantickitti-val/iou/") for t in tags)

    pretrain_run = Path(pretrained).parent.parent
    result = CliRunner().invoke(
        main,
        [
            "runs",
            str(tmp_path / "runs"),
            str(pretrain_run),
            "--plot",
            str(tmp_path / "loss.png"),
            "--json-out",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = {r["stage"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert (
        rows["pretrain"]["teachers"] == ["test-vit"]
        and rows["pretrain"]["steps"] == 2
        and rows["pretrain"]["parameters"] > 0
    )
    assert rows["probe"]["best_miou"] == json.loads((out / "eval-semantickitti-val.json").read_text())["miou"]
    assert rows["probe"]["datasets"] == ["semantickitti/train"] and rows["probe"]["pretrained"] == str(pretrained)
    assert "probe" in result.output and "test-vit" in result.output and (tmp_path / "loss.png").stat().st_size > 10_000
    assert (
        CliRunner().invoke(main, ["runs", str(tmp_path / "nothing")]).output.strip().endswith("no such run or folder")
    )

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were absent

    with caplog.at_level(logging.INFO, logger="stages.student.train"):
        assert tensorboard_writer(tmp_path / "x") is None
    assert "tensorboard is not installed" in caplog.text and not (tmp_path / "x/tensorboard").exists()
