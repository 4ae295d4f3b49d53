"""ScaLR+ checkpoints (valeoai/ScaLR v0.2.0) as the released code writes them: loaded as they are
in every command, read strictly, converted both ways bitwise, and computing what the released
segmenter computes (a reference forward written here from its modules, in its own layout)."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from stages.cli import main
from stages.student.checkpoints import load_backbone, read_student_checkpoint
from storage.checkpoint import CheckpointError

DEPTH, WIDTH, HIDDEN, OUT, CIN = 2, 8, 16, 6, 5


def layer_norm(prefix: str, c: int, g: torch.Generator) -> dict:
    return {
        f"{prefix}.weight": 1 + 0.1 * torch.randn(c, generator=g),
        f"{prefix}.bias": 0.1 * torch.randn(c, generator=g),
    }


def batch_norm(prefix: str, c: int, g: torch.Generator) -> dict:
    return {
        f"{prefix}.weight": 1 + 0.1 * torch.randn(c, generator=g),
        f"{prefix}.bias": 0.1 * torch.randn(c, generator=g),
        f"{prefix}.running_mean": 0.1 * torch.randn(c, generator=g),
        f"{prefix}.running_var": 1 + torch.rand(c, generator=g),
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def released_plus_segmenter(head: str = "mlp", seed: int = 0) -> dict:
    """The state dict of ScaLR+'s Segmenter (scalr_plus: waffleiron/segmenter.py, backbone.py,
    embedding.py), key by key from its modules: BatchNorm embedding, LayerNorm mixes, 1x1 and
    depthwise convs, LayerScale as a depthwise 1x1 conv, and the head: conv-ReLU-conv (`mlp`, as
    distilled) or BatchNorm + conv (`segmentation`, as finetune.py leaves it)."""
    g = torch.Generator().manual_seed(seed)
    c = WIDTH

    def w(*shape):
        return torch.randn(*shape, generator=g) / max(1, shape[1] if len(shape) > 1 else 1) ** 0.5

    state = {
        **batch_norm("embed.norm", CIN, g),
        "embed.conv1.weight": w(c, CIN, 1),
        "embed.conv1.bias": 0.1 * torch.randn(c, generator=g),
        **batch_norm("embed.conv2.0", CIN, g),
        "embed.conv2.1.weight": w(c, CIN, 1, 1),
        **batch_norm("embed.conv2.2", c, g),
        "embed.conv2.4.weight": w(c, c, 1, 1),
        "embed.final.weight": w(c, 2 * c, 1),
        "embed.final.bias": 0.1 * torch.randn(c, generator=g),
    }
    for d in range(DEPTH):
        cm, sm = f"waffleiron.channel_mix.{d}", f"waffleiron.spatial_mix.{d}"
        state.update(layer_norm(f"{cm}.norm", c, g))
        state.update(
            {
                f"{cm}.mlp.0.weight": w(c, c, 1),
                f"{cm}.mlp.0.bias": 0.1 * torch.randn(c, generator=g),
                f"{cm}.mlp.2.weight": w(c, c, 1),
                f"{cm}.mlp.2.bias": 0.1 * torch.randn(c, generator=g),
                f"{cm}.scale.weight": torch.rand(c, 1, 1, generator=g) * 2 - 1,
            }
        )
        state.update(layer_norm(f"{sm}.norm", c, g))
        state.update(
            {
                f"{sm}.ffn.0.weight": w(c, 1, 3, 3),
                f"{sm}.ffn.0.bias": 0.1 * torch.randn(c, generator=g),
                f"{sm}.ffn.2.weight": w(c, 1, 3, 3),
                f"{sm}.ffn.2.bias": 0.1 * torch.randn(c, generator=g),
                f"{sm}.scale.weight": torch.rand(c, 1, 1, generator=g) * 2 - 1,
            }
        )
    if head == "mlp":
        state.update(
            {
                "classif.0.weight": w(HIDDEN, c, 1),
                "classif.0.bias": 0.1 * torch.randn(HIDDEN, generator=g),
                "classif.2.weight": w(OUT, HIDDEN, 1),
                "classif.2.bias": 0.1 * torch.randn(OUT, generator=g),
            }
        )
    else:
        state.update(
            {**batch_norm("classif.0", c, g), "classif.1.weight": w(19, c, 1), "classif.1.bias": torch.zeros(19)}
        )
    return state


def distiller_file(path, state: dict) -> None:
    """As utils/distiller.py `save_state` under DDP: "module." keys, its optimiser, its schedule."""
    schedule = {"max_it": 650, "warmup_end": 10, "cooldown_start": 630, "timescale": 4.5}
    torch.save(
        {
            "epoch": 3,
            "model_point": {f"module.{k}": v for k, v in state.items()},
            "optim": {"state": {}, "param_groups": [{"lr": 2e-3, "weight_decay": 0.03, "params": [0]}]},
            "scheduler": {"lr_lambdas": [schedule], "base_lrs": [2e-3], "last_epoch": 31, "_step_count": 32},
            "scaler": None,
        },
        path,
    )


def reference_backbone(state: dict, feats, cells, neighbours, grid_shape) -> torch.Tensor:
    """The released ScaLR+ backbone's forward for one sample in its own layout (1 x C x N),
    written from its modules: eval-mode BatchNorm embedding with the k nearest neighbours (the
    point itself dropped), then per layer: LayerNorm over channels, scatter_reduce mean per cell,
    depthwise 3x3 - GELU - depthwise 3x3, LayerScale, gather back, residual; LayerNorm, 1x1 conv -
    GELU - 1x1 conv, LayerScale, residual."""
    s = state

    def bn(x, p):
        return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"])

    def ln(x, p):  # over channels of 1 x C x N
        return F.layer_norm(x.transpose(1, -1), (x.shape[1],), s[f"{p}.weight"], s[f"{p}.bias"]).transpose(1, -1)

    x = bn(feats.T[None], "embed.norm")  # 1 x 5 x N
    point = F.conv1d(x, s["embed.conv1.weight"], s["embed.conv1.bias"])
    gathered = torch.stack([x[0][:, neighbours[:, k]] for k in range(neighbours.shape[1])], -1)[None]
    neigh = bn(gathered - x[..., None], "embed.conv2.0")
    neigh = F.conv2d(neigh, s["embed.conv2.1.weight"])
    neigh = F.relu(bn(neigh, "embed.conv2.2"))
    neigh = F.conv2d(neigh, s["embed.conv2.4.weight"]).max(-1)[0]
    tokens = F.conv1d(torch.cat([point, neigh], 1), s["embed.final.weight"], s["embed.final.bias"])
    planes = ((0, 1), (0, 2), (1, 2))
    c = tokens.shape[1]
    for d in range(DEPTH):
        a, b = planes[d % 3]
        h, w = grid_shape[a], grid_shape[b]
        index = (cells[:, a] * w + cells[:, b])[None, None].expand(1, c, -1)
        p = f"waffleiron.spatial_mix.{d}"
        grid = torch.zeros(1, c, h * w).scatter_reduce_(2, index, ln(tokens, f"{p}.norm"), "mean", include_self=False)
        grid = F.conv2d(grid.reshape(1, c, h, w), s[f"{p}.ffn.0.weight"], s[f"{p}.ffn.0.bias"], padding=1, groups=c)
        grid = F.conv2d(F.gelu(grid), s[f"{p}.ffn.2.weight"], s[f"{p}.ffn.2.bias"], padding=1, groups=c)
        grid = F.conv1d(grid.reshape(1, c, h * w), s[f"{p}.scale.weight"], groups=c)
        tokens = tokens + torch.gather(grid, 2, index)
        p = f"waffleiron.channel_mix.{d}"
        y = F.conv1d(ln(tokens, f"{p}.norm"), s[f"{p}.mlp.0.weight"], s[f"{p}.mlp.0.bias"])
        y = F.conv1d(F.gelu(y), s[f"{p}.mlp.2.weight"], s[f"{p}.mlp.2.bias"])
        tokens = tokens + F.conv1d(y, s[f"{p}.scale.weight"], groups=c)
    return tokens[0].T


def random_batch(n: int = 60, grid_shape=(6, 6, 4), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    cells = torch.stack([torch.randint(0, size, (n,), generator=g) for size in grid_shape], 1)
    return {
        "feats": torch.randn(n, CIN, generator=g),
        "cells": cells,
        "neighbours": torch.randint(0, n, (n, 16), generator=g),
        "batch": torch.zeros(n, dtype=torch.long),
        "batch_size": 1,
    }


@pytest.fixture(scope="module")
def plus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plus") / "ckpt_last.pth"
    distiller_file(path, released_plus_segmenter())
    return path


def test_the_released_scalr_plus_backbone_is_computed_as_released(plus_file):
    """Architecture from the tensors (LayerNorm, widths, MLP head), GELU and the exact cell mean
    from the recipe the file shows (its head, its schedule); the backbone's features equal the
    reference forward's."""
    backbone, record = load_backbone(plus_file, (6, 6, 4))
    cfg = backbone.cfg
    assert (cfg.depth, cfg.width, cfg.norm, cfg.activation, cfg.cell_mean) == (DEPTH, WIDTH, "layer", "gelu", "divide")
    assert record["config"]["recipe"] == "scalr-plus" and "classif.0.weight" in record["recipe_source"]
    assert record["head"] == {"kind": "mlp", "hidden": HIDDEN, "out": OUT}
    batch = random_batch()
    state = released_plus_segmenter()
    expected = reference_backbone(state, batch["feats"], batch["cells"], batch["neighbours"], (6, 6, 4))
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(batch), expected, rtol=1e-5, atol=1e-5)


def test_a_scalr_plus_file_taken_as_cvpr_is_refused_naming_the_tensor(plus_file, kitti_root, tmp_path):
    state = read_student_checkpoint(plus_file, "cvpr")  # the file shows its recipe; the caller checks
    assert state["config"]["config"]["recipe"] == "scalr-plus"
    why = "made with the scalr-plus recipe (classif.0.weight, classif.2.weight: an MLP distillation head"
    result = CliRunner().invoke(main, ["convert", str(plus_file), str(tmp_path / "x.pt"), "--recipe", "cvpr"])
    assert result.exit_code != 0 and why in result.output
    data = ["--dataset", "semantickitti", "--root", str(kitti_root), "--checkpoint", str(plus_file)]
    result = CliRunner().invoke(main, ["embed", *data, "--out", str(tmp_path / "e.zarr"), "--recipe", "cvpr"])
    assert result.exit_code != 0 and why in result.output and "this evaluation follows cvpr" in result.output
    assert not (tmp_path / "e.zarr").exists()


def test_contradicting_signs_are_refused(tmp_path):
    state = released_plus_segmenter()
    state.update(batch_norm("waffleiron.channel_mix.0.norm", WIDTH, torch.Generator().manual_seed(0)))
    path = tmp_path / "odd.pth"
    torch.save({"model_point": state}, path)
    with pytest.raises(CheckpointError, match=r"shows both recipes: waffleiron.channel_mix.0.norm.running_mean"):
        read_student_checkpoint(path)


def test_convert_round_trips_the_released_file_bitwise(plus_file, tmp_path):
    ours, back = tmp_path / "ours.pt", tmp_path / "back.pth"
    assert CliRunner().invoke(main, ["convert", str(plus_file), str(ours)]).exit_code == 0
    assert CliRunner().invoke(main, ["convert", str(ours), str(back)]).exit_code == 0
    original = torch.load(plus_file, weights_only=True)["model_point"]
    again = torch.load(back, weights_only=True)
    assert list(again) == ["model_point"] and list(again["model_point"]) == list(original)
    assert all(torch.equal(again["model_point"][k], v) for k, v in original.items())
    record = torch.load(ours, weights_only=True)["config"]
    assert record["config"]["model"]["activation"] == "gelu" and record["config"]["recipe"] == "scalr-plus"


def test_the_released_checkpoint_runs_in_every_command(plus_file, kitti_root, tmp_path):
    """probe, finetune (then evaluate), plot-features and embed take the released file as it is,
    with ScaLR+'s settings (its recipe shown by the file)."""
    data = ["--dataset", "semantickitti", "--root", str(kitti_root)]
    quick = ["--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--precision", "fp32"]
    quick += ["--set", "sample.grid.cell=4.0"]
    for mode in ("probe", "finetune"):
        out = tmp_path / mode
        result = CliRunner().invoke(main, [mode, *data, "--checkpoint", str(plus_file), "--out", str(out), *quick])
        assert result.exit_code == 0, result.output
        record = json.loads((out / "config.json").read_text())
        assert record["config"]["recipe"] == "scalr-plus" and record["config"]["model"]["activation"] == "gelu"
        evaluated = CliRunner().invoke(
            main, ["evaluate", *data, "--checkpoint", str(out / "checkpoints/last.pt"), "--max-scans", "1"]
        )
        assert evaluated.exit_code == 0 and "mIoU" in evaluated.output, evaluated.output
        (result,) = out.glob("eval-*.json")
        scored = json.loads(result.read_text())
        assert scored["recipe"] == "scalr-plus" and scored["precision"] == "bf16"  # as its released evaluation
    assert json.loads((tmp_path / "finetune/config.json").read_text())["config"]["optim"]["lr"] == 1e-4
    pictures = CliRunner().invoke(
        main,
        [
            "plot-features",
            *data,
            "--scan",
            "00/000000",
            "--checkpoint",
            str(plus_file),
            "--out",
            str(tmp_path / "pics"),
        ],
    )
    assert pictures.exit_code == 0 and pictures.output.count("plot:") == 2, pictures.output
    args = ["embed", *data, "--split", "val", "--checkpoint", str(plus_file), "--out", str(tmp_path / "e.zarr")]
    result = CliRunner().invoke(main, [*args, "--dtype", "float32", "--recipe", "scalr-plus", "--max-scans", "1"])
    assert result.exit_code == 0, result.output


def test_a_released_segmenter_that_does_not_show_its_recipe_takes_it_from_the_caller(kitti_root, tmp_path):
    """finetune.py's `net` file without its schedule: GELU only when told (--recipe scalr-plus);
    otherwise cvpr, recorded as assumed."""
    path = tmp_path / "net.pth"
    torch.save({"net": released_plus_segmenter("segmentation")}, path)
    told = read_student_checkpoint(path, "scalr-plus")["config"]
    assumed = read_student_checkpoint(path)["config"]
    assert told["config"]["model"]["activation"] == "gelu" and told["recipe_source"].startswith("--recipe")
    assert assumed["config"]["model"]["activation"] == "relu" and assumed["recipe_source"].startswith("assumed")
    torch.save({"net": released_plus_segmenter("segmentation"), "scheduler": {"lr_lambdas": [{"max_it": 9}]}}, path)
    assert read_student_checkpoint(path)["config"]["config"]["recipe"] == "scalr-plus"
    data = ["--dataset", "semantickitti", "--root", str(kitti_root), "--max-scans", "1"]
    result = CliRunner().invoke(main, ["evaluate", *data, "--checkpoint", str(path), "--recipe", "cvpr"])
    assert result.exit_code != 0 and "made with the scalr-plus recipe (scheduler.lr_lambdas[0].max_it" in result.output
