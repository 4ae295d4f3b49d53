"""The two released recipes (CVPR, ScaLR+), each value pinned on a hand-computed example: the
schedules, the student's activation, drop path and cell mean, the presets of every command, and
the refusal to mix recipes silently."""

import dataclasses
import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_store

from pipeline.errors import ConfigError
from pipeline.transforms import Grid
from stages.cli import main
from stages.downstream.segment import SegmentConfig, segmentation_model
from stages.extract.extract import ExtractConfig
from stages.recipes import downstream_rules, pretrain_settings
from stages.runtime import seeded
from stages.student.losses import cosine_distance_loss
from stages.student.pretrain import PretrainConfig, build_student, pretrain
from stages.student.samples import SampleConfig
from stages.student.schedules import rsqrt_cooldown, warmup_cosine
from stages.student.train import OptimConfig, TrainConfig
from stages.student.waffleiron import ChannelMix, WaffleIron, WaffleIronConfig, drop_path, planes_of

GRID = Grid(cell=4.0)


def test_cvpr_schedule_is_warmup_cosine_per_iteration():
    """utils/scheduler.py WarmupCosine: it / warmup (the first step at lr 0), then a cosine to
    min_lr / lr at the last iteration."""
    f = OptimConfig(lr=2e-3, min_lr=1e-5, warmup_iters=4).lr_factor(steps_per_epoch=3, epochs=4)  # 12 iterations
    assert [f(i) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.005 + 0.5 * 0.995 * (math.cos(math.pi / 2) + 1), abs=0)  # halfway
    assert f(12) == pytest.approx(0.005, abs=1e-18)
    assert warmup_cosine(6, 2, 10, 0.0) == 0.5 * (math.cos(math.pi / 2) + 1)


def test_scalr_plus_schedule_has_the_released_formula_and_its_jump():
    """LinWarmup_ReciprocalSqrt_LinCoolDown with E = 10 iterations an epoch, 65 epochs: warm-up to
    1 over E, 1 / sqrt(1 + (it - E) / 0.45E) until 63E, then linear to 0 from a base that does not
    subtract the warm-up (a jump down at 63E + 1), 0 at the last iteration."""
    settings = pretrain_settings("scalr-plus", 768)
    optim = OptimConfig(
        schedule=settings["optim.schedule"],
        warmup_epochs=settings["optim.warmup_epochs"],
        cooldown_epochs=settings["optim.cooldown_epochs"],
        timescale_epochs=settings["optim.timescale_epochs"],
    )
    f = optim.lr_factor(steps_per_epoch=10, epochs=settings["train.epochs"])
    assert [f(0), f(5), f(10)] == [0.0, 0.5, 1.0]
    assert f(19) == 1 / math.sqrt(1 + 9 / 4.5) == 1 / math.sqrt(3)
    before = f(630)
    assert before == 1 / math.sqrt(1 + 620 / 4.5)
    base = 1 / math.sqrt(1 + 630 / 4.5)
    assert f(631) == base * 18 / 19 and f(631) < before * 0.96  # the released jump
    assert f(649) == 0.0 and f(650) == 0.0
    assert rsqrt_cooldown(640, 10, 630, 4.5, 650) == base * (20 - 10 - 1) / 19


def test_the_schedule_the_run_trains_with(kitti_root, tmp_path):
    """A ScaLR+ pretraining: the lr logged after each step is 2e-3 times the schedule's factor of
    the next step (7 iterations an epoch, 3 epochs: warm-up over 7, cool-down over the last 14)."""
    store = tiny_store(kitti_root, tmp_path / "s.zarr", recipe="scalr-plus", image_size=(28, 56), teacher="oracle")
    cfg = PretrainConfig.preset((store.path,), tmp_path / "run", "WI-12-64", "scalr-plus")
    small = {"model": cfg.model.__class__(**{**cfg.model.__dict__, "depth": 1, "width": 8, "grid_shape": GRID.shape})}
    cfg = cfg.__class__(
        **{
            **cfg.__dict__,
            **small,
            "sample": SampleConfig(max_points=3000, grid=GRID),
            "train": TrainConfig(batch_size=1, epochs=3, num_workers=0, log_every=1, precision="fp32"),
        }
    )
    pretrain(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = len(rows)
    factor = cfg.optim.lr_factor(steps // 3, 3)
    assert [r["lr"] for r in rows] == [2e-3 * factor(r["step"]) for r in rows]
    assert rows[-1]["lr"] == 0.0


def test_pretraining_presets_of_both_recipes(tmp_path):
    cvpr = PretrainConfig.preset((tmp_path,), tmp_path, "WI-48-768", "cvpr")
    assert (cvpr.model.norm, cvpr.model.activation, cvpr.model.cell_mean, cvpr.model.drop_path) == (
        "layer",
        "relu",
        "weights",
        0.0,
    )
    assert (cvpr.head, cvpr.optim.schedule, cvpr.optim.warmup_iters, cvpr.optim.min_lr) == (
        "auto",
        "warmup-cosine",
        3500,
        1e-5,
    )
    assert (cvpr.train.epochs, cvpr.train.batch_size, cvpr.train.precision, cvpr.recipe) == (25, 8, "fp32", "cvpr")
    assert PretrainConfig.preset((tmp_path,), tmp_path, "WI-48-256", "cvpr").model.norm == "batch"
    plus = PretrainConfig.preset((tmp_path,), tmp_path, "WI-48-256", "scalr-plus")
    assert (plus.model.norm, plus.model.activation, plus.model.cell_mean) == ("layer", "gelu", "divide")
    assert (plus.model.drop_path, plus.model.checkpointing, plus.head, plus.head_hidden) == (0.2, True, "mlp", 2048)
    assert (plus.optim.lr, plus.optim.weight_decay, plus.optim.schedule) == (2e-3, 0.03, "rsqrt-cooldown")
    assert (plus.optim.warmup_epochs, plus.optim.cooldown_epochs, plus.optim.timescale_epochs) == (1.0, 2.0, 0.45)
    assert (plus.train.epochs, plus.train.batch_size, plus.train.precision, plus.recipe) == (
        65,
        8,
        "bf16",
        "scalr-plus",
    )
    with pytest.raises(ConfigError, match="recipe 'plus'"):
        PretrainConfig.preset((tmp_path,), tmp_path, "WI-48-256", "plus")


ROWS = [  # recipe, mode, dataset, labels: lr, wd, drop path, epochs, warm-up, min lr, layer decay, precision
    ("cvpr", "probe", "nuscenes", 1.0, (1e-3, 3e-3, 0.0, 20, 2, 1e-5, None, "fp32")),
    ("cvpr", "probe", "pandar64", 1.0, (1e-3, 3e-3, 0.0, 50, 2, 1e-5, None, "fp32")),
    ("cvpr", "finetune", "nuscenes", 1.0, (2e-3, 0.0, 0.2, 25, 2, 0.0, 0.99, "fp32")),
    ("cvpr", "finetune", "semantickitti", 1.0, (2e-3, 0.0, 0.2, 10, 1, 0.0, 0.99, "fp32")),
    ("cvpr", "finetune", "nuscenes", 0.01, (2e-3, 0.0, 0.2, 45, 4, 0.0, 0.95, "fp32")),
    ("cvpr", "finetune", "semantickitti", 0.1, (2e-3, 0.0, 0.2, 45, 4, 0.0, 0.95, "fp32")),
    ("cvpr", "finetune", "pandargt", 1.0, (2e-3, 0.0, 0.2, 25, 2, 0.0, 0.99, "fp32")),
    ("scalr-plus", "probe", "nuscenes", 1.0, (1e-3, 3e-3, 0.0, 20, 2, 0.0, None, "bf16")),
    ("scalr-plus", "probe", "semantickitti", 1.0, (1e-3, 3e-3, 0.0, 20, 2, 0.0, None, "bf16")),
    ("scalr-plus", "probe", "pandargt", 1.0, (1e-3, 3e-3, 0.0, 50, 2, 0.0, None, "bf16")),
    ("scalr-plus", "finetune", "nuscenes", 1.0, (1e-4, 0.0, 0.2, 25, 2, 0.0, 0.99, "bf16")),
    ("scalr-plus", "finetune", "nuscenes", 0.01, (1e-4, 0.0, 0.2, 45, 4, 0.0, 0.99, "bf16")),
    ("scalr-plus", "finetune", "nuscenes", 0.1, (1e-4, 0.0, 0.2, 45, 4, 0.0, 0.99, "bf16")),
    ("scalr-plus", "finetune", "semantickitti", 1.0, (1e-4, 0.0, 0.2, 25, 2, 0.0, 0.99, "bf16")),
    ("scalr-plus", "finetune", "semantickitti", 0.01, (1e-4, 0.0, 0.2, 45, 4, 0.0, 0.99, "bf16")),
    ("scalr-plus", "finetune", "pandar64", 1.0, (1e-4, 0.0, 0.2, 25, 2, 0.0, 0.99, "bf16")),
    ("scalr-plus", "finetune", "pandargt", 1.0, (1e-4, 0.0, 0.2, 25, 2, 0.0, 0.99, "bf16")),
]


@pytest.mark.parametrize("recipe, mode, dataset, fraction, expected", ROWS)
def test_downstream_settings_are_the_released_configs(recipe, mode, dataset, fraction, expected, tmp_path):
    """configs/downstream/<dataset>/WI_768_{linprob,finetune_*}.yaml of each branch, through the
    config a command starts from."""
    r = downstream_rules(recipe, mode, dataset, fraction)
    assert (r.lr, r.weight_decay, r.drop_path, r.epochs, r.warmup_epochs, r.min_lr, r.layer_decay, r.precision) == (
        expected
    )
    cfg = SegmentConfig.for_mode(mode, recipe, dataset=dataset, root=tmp_path, out=tmp_path, labels_fraction=fraction)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.min_lr, cfg.optim.schedule) == (
        expected[0],
        expected[1],
        expected[5],
        "warmup-cosine",
    )
    assert (cfg.train.epochs, cfg.warmup_epochs, cfg.train.precision, cfg.recipe) == (
        expected[3],
        expected[4],
        expected[7],
        recipe,
    )
    lo, hi = cfg.sample.grid.lo, cfg.sample.grid.hi
    half = {"pandar64": 128.0, "pandargt": 96.0 if mode == "finetune" else 128.0}.get(dataset, 64.0)
    assert (lo[0], hi[0], cfg.sample.grid.cell, cfg.sample.max_points) == (-half, half, 0.5, 20000)


def test_gelu_is_exact_in_both_mixes_and_the_embedding_keeps_relu():
    """ScaLR+ (waffleiron/backbone.py `gelu: True`): exact GELU (erf) between the channel mix's
    two 1x1 convs and the spatial mix's two depthwise convs; ReLU in the embedding."""
    model = WaffleIron(WaffleIronConfig(depth=1, width=4, norm="layer", activation="gelu", grid_shape=(4, 4, 2)))
    assert isinstance(model.channel[0].mlp[1], torch.nn.GELU) and model.channel[0].mlp[1].approximate == "none"
    assert isinstance(model.spatial[0].ffn[1], torch.nn.GELU)
    assert isinstance(model.embedding.neighbour[2], torch.nn.ReLU)
    mix = ChannelMix(2, "layer", 0.0, "gelu").eval()
    with torch.no_grad():
        mix.mlp[0].weight.copy_(torch.eye(2))
        mix.mlp[0].bias.zero_()
        mix.mlp[2].weight.copy_(torch.eye(2))
        mix.mlp[2].bias.zero_()
        mix.scale.weight.fill_(1.0)
    x = torch.tensor([[3.0, 1.0]])  # LayerNorm: (1, -1); GELU(1) = Phi(1), GELU(-1) = -Phi(-1)
    phi = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    expected = torch.tensor([[3.0 + phi, 1.0 - (1 - phi)]])
    torch.testing.assert_close(mix(x, torch.zeros(1, dtype=torch.long), 1), expected, atol=1e-5, rtol=0)


def test_drop_path_is_the_released_formula_per_sample():
    """DropPath: x / keep * floor(keep + U), one U per sample (here 2 samples, rate 0.2)."""
    x = torch.arange(1.0, 7.0).reshape(3, 2)
    batch = torch.tensor([0, 0, 1])
    torch.manual_seed(3)  # noqa: TID251 - the test's own draw
    u = torch.rand(2)
    torch.manual_seed(3)  # noqa: TID251
    out = drop_path(x, 0.2, batch, 2, training=True)
    mask = torch.floor(0.8 + u)
    torch.testing.assert_close(out, x.div(0.8) * mask[batch][:, None], rtol=0, atol=0)
    assert torch.equal(drop_path(x, 0.2, batch, 2, training=False), x)


@pytest.mark.parametrize("mode", ["weights", "divide"])
def test_cell_means_as_each_release_computes_them(mode):
    """Three points in one cell: CVPR (WaffleIron 0.3) sums x / (3 + 1e-6) in float32; ScaLR+
    (scatter_reduce "mean") sums, then divides by 3. An empty cell stays 0."""
    cells = torch.zeros(3, 3, dtype=torch.long)
    (plane, *_) = planes_of(cells, torch.zeros(3, dtype=torch.long), 1, (2, 2, 2), mode)
    y = torch.tensor([[0.1], [0.7], [1.3]])
    means = plane.cell_means(y)
    if mode == "weights":
        w = torch.tensor(1.0) / (torch.tensor(3.0) + 1e-6)
        assert means[0, 0] == (y * w).sum() and means[0, 0] != y.sum() / 3
    else:
        assert means[0, 0] == y.sum() / 3
    assert means[1:].abs().sum() == 0


def test_pretraining_refuses_stores_of_the_other_recipe(kitti_root, tmp_path):
    store = tiny_store(kitti_root, tmp_path / "cvpr.zarr")
    cfg = PretrainConfig.preset((store.path,), tmp_path / "run", "WI-12-64", "scalr-plus")
    with pytest.raises(ConfigError, match=r"cvpr.zarr: extracted with the cvpr recipe.*--mixed-recipes"):
        pretrain(cfg)
    args = ["pretrain", "--store", str(store.path), "--out", str(tmp_path / "r"), "--student", "WI-12-64"]
    result = CliRunner().invoke(main, [*args, "--recipe", "scalr-plus"])
    assert result.exit_code != 0 and "extracted with the cvpr recipe" in result.output


def test_a_student_is_probed_with_its_own_recipe_unless_asked(kitti_root, tmp_path):
    """A ScaLR+ student: `probe` without --recipe uses ScaLR+'s settings (recorded); --recipe cvpr
    is refused naming the checkpoint; --mixed-recipes does it on purpose and says so in the run."""
    store = tiny_store(kitti_root, tmp_path / "plus.zarr", recipe="scalr-plus", image_size=(28, 56), teacher="oracle")
    pre = PretrainConfig.preset((store.path,), tmp_path / "pre", "WI-12-64", "scalr-plus")
    model = pre.model.__class__(**{**pre.model.__dict__, "depth": 1, "width": 8, "grid_shape": GRID.shape})
    pre = pre.__class__(
        **{
            **pre.__dict__,
            "model": model,
            "sample": SampleConfig(max_points=3000, grid=GRID),
            "train": TrainConfig(batch_size=2, epochs=1, max_steps=1, num_workers=0, precision="fp32"),
            "optim": OptimConfig(schedule="warmup-cosine", warmup_iters=1),
        }
    )
    checkpoint = pretrain(pre)["checkpoint"]
    base = ["probe", "--dataset", "semantickitti", "--root", str(kitti_root), "--checkpoint", str(checkpoint)]
    quick = ["--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--set", "sample.grid.cell=4.0"]
    quick += ["--precision", "fp32"]
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "p1"), *quick])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "p1/config.json").read_text())
    assert record["config"]["recipe"] == "scalr-plus" and record["config"]["optim"]["min_lr"] == 0.0
    assert record["config"]["model"]["activation"] == "gelu"
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "p2"), *quick, "--recipe", "cvpr"])
    assert result.exit_code != 0 and "error" in result.output.lower()
    assert "made with the scalr-plus recipe (its run record), but this probe run follows cvpr" in result.output
    result = CliRunner().invoke(
        main, [*base, "--out", str(tmp_path / "p3"), *quick, "--recipe", "cvpr", "--mixed-recipes"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "p3/config.json").read_text())
    assert record["config"]["recipe"] == "cvpr" and record["config"]["mixed_recipes"] is True
    assert record["config"]["optim"]["min_lr"] == 1e-5


def test_scratch_students_are_built_as_the_recipe_builds_them(kitti_root, tmp_path):
    cfg = SegmentConfig.for_mode(
        "scratch", "scalr-plus", dataset="semantickitti", root=kitti_root, out=tmp_path / "s", student="WI-12-64"
    )
    model = segmentation_model(cfg, 19)
    assert (model.backbone.cfg.activation, model.backbone.cfg.norm, model.backbone.cfg.drop_path) == (
        "gelu",
        "layer",
        0.2,
    )


def test_scalr_plus_head_loss_and_stage_one_defaults(tmp_path):
    """The distillation head conv-ReLU-conv with biases (ReLU although the backbone has GELU),
    the un-squared L2 distance of unit vectors averaged over the paired points, images of 448 x 896."""
    plus = PretrainConfig.preset((tmp_path,), tmp_path, "WI-48-256", "scalr-plus")
    student = build_student(plus.model, 1024, plus.head, plus.head_hidden, teachers=1)
    head = student.head
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (256, 2048, 1024)
    assert head[0].bias is not None and head[2].bias is not None
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [6.0, 8.0]])
    assert cosine_distance_loss(s, t).tolist() == [float(torch.tensor(2.0).sqrt()), 0.0]  # mean: sqrt(2) / 2
    assert ExtractConfig("nuscenes", tmp_path, "train", "dinov2-vitl14", tmp_path, recipe="scalr-plus").image_size == (
        448,
        896,
    )
    assert ExtractConfig("nuscenes", tmp_path, "train", "dinov2-vitl14", tmp_path).image_size == (224, 448)


def test_checkpointing_each_mix_changes_no_number():
    """Gradient checkpointing around each mix (ScaLR+) recomputes the same forward, drop path
    included: the same loss and gradients as without."""
    cfg = WaffleIronConfig(depth=2, width=8, norm="layer", activation="gelu", drop_path=0.2, grid_shape=(4, 4, 2))
    batch = {
        "feats": torch.randn(40, 5, generator=torch.Generator().manual_seed(0)),
        "cells": torch.randint(0, 2, (40, 3), generator=torch.Generator().manual_seed(1)),
        "neighbours": torch.randint(0, 40, (40, 16), generator=torch.Generator().manual_seed(2)),
        "batch": torch.tensor([0] * 20 + [1] * 20),
        "batch_size": 2,
    }
    grads = []
    for checkpointing in (False, True):
        with seeded(4):
            model = WaffleIron(dataclasses.replace(cfg, checkpointing=checkpointing)).train()
        with seeded(5):
            model(batch).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
