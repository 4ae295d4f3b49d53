"""The student's inputs and model details pinned to the released ScaLR code (valeoai/ScaLR,
datasets/pc_dataset.py, datasets/*_for_scalr.py, waffleiron/*.py), on hand-computed examples."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.datasets import READERS
from pipeline.transforms import Augment, knn, student_features
from stages.downstream.segment import SegmentConfig
from stages.extract.images import load_resized
from stages.extract.teachers import dinov2_cvpr_pos_embed, load_teacher
from stages.runtime import seeded
from stages.student.checkpoints import load_backbone
from stages.student.waffleiron import STUDENT_INPUTS, WaffleIron, WaffleIronConfig, make_head
from storage.checkpoint import CheckpointError, save_checkpoint


def test_neighbours_exclude_the_point_itself():
    """Released: kdtree.query(k = 16 + 1), the embedding drops column 0 (the point)."""
    xyz = np.array([[0, 0, 0], [1, 0, 0], [3, 0, 0], [7, 0, 0], [15, 0, 0]], dtype=np.float32)
    assert knn(xyz, 2).tolist() == [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]]
    assert knn(xyz, 4)[0].tolist() == [1, 2, 3, 4]
    assert knn(xyz, 6)[0].tolist() == [1, 2, 3, 4, 4, 4]  # fewer points than k: the farthest repeats
    assert knn(xyz[:1], 3).tolist() == [[0, 0, 0]]  # a lone point is its own neighbour
    assert knn(xyz[:0], 3).shape == (0, 3)


def test_radius_is_three_dimensional_and_intensity_standardised():
    xyz = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, -2.0]], dtype=np.float32)
    mean, std = READERS["nuscenes"].meta.intensity_norm
    feats = student_features(xyz, np.array([mean + std, mean], dtype=np.float32), (mean, std))
    assert feats.tolist() == [[pytest.approx(1.0), 3.0, 4.0, 12.0, 13.0], [0.0, 0.0, 0.0, -2.0, 2.0]]


@pytest.mark.parametrize(
    "name, mean, std",
    [
        ("nuscenes", 18.742355, 22.04632),
        ("semantickitti", 0.28613698, 0.14090556),
        ("pandar64", 18.23640649, 25.86983417),
        ("pandargt", 23.06113565, 16.76273235),
    ],
)
def test_intensity_statistics_are_the_released_ones(name, mean, std):
    assert READERS[name].meta.intensity_norm == (mean, std)


def test_model_details_follow_the_released_model():
    """Embedding biases where the released one has them (point branch, final mix; none in the
    neighbour branch), and ReLU in the multi-teacher MLP head."""
    net = WaffleIron(WaffleIronConfig(depth=1, width=8))
    emb = net.embedding
    assert emb.point.bias is not None and emb.final.bias is not None
    assert all(m.bias is None for m in emb.neighbour if isinstance(m, nn.Linear))
    head = make_head(8, 4, "mlp", hidden=16)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]


def test_embedding_pools_over_the_given_neighbours_only():
    """The released embedding: point branch on the normalised input; neighbour branch on
    (neighbour - centre) of the given neighbours (no zero difference of the point with itself),
    max-pooled; then one linear mix with bias."""
    with seeded(0):
        emb = WaffleIron(WaffleIronConfig(depth=1, width=8)).embedding.eval()
    feats = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    far = torch.tensor([[1, 1], [0, 0], [0, 0]])
    out = emb(feats, far)
    x = emb.norm(feats)
    diff = emb.neighbour_norm((x[far] - x[:, None]).reshape(6, 5))
    expected = emb.final(torch.cat([emb.point(x), emb.neighbour(diff).view(3, 2, -1).amax(1)], 1))
    torch.testing.assert_close(out, expected)


def test_checkpoints_with_the_old_inputs_are_refused(tmp_path):
    cfg = WaffleIronConfig(depth=1, width=8)
    net = WaffleIron(cfg)
    model = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    fields = {k: v for k, v in vars(cfg).items() if k != "inputs"}
    old = tmp_path / "old.pt"
    save_checkpoint(old, {"model": model, "config": {"stage": "pretrain", "config": {"model": fields}}})
    with pytest.raises(CheckpointError, match="student inputs version 1 .* pretrain again"):
        load_backbone(old)
    new = tmp_path / "new.pt"
    save_checkpoint(
        new,
        {"model": model, "config": {"stage": "pretrain", "config": {"model": {**fields, "inputs": STUDENT_INPUTS}}}},
    )
    backbone, _ = load_backbone(new)
    assert backbone.cfg.inputs == STUDENT_INPUTS


def test_image_resize_is_the_released_float_bilinear(tmp_path):
    """torchvision's resize of a float tensor in [0, 1], no antialias (the CVPR environment):
    halving a 4 x 8 image averages each 2 x 2 block exactly; with antialias (ScaLR+) it blurs more."""

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "i.png")
    out = load_resized(tmp_path / "i.png", (4, 8), (2, 4))
    blocks = (pixels / 255.0).reshape(2, 2, 4, 2, 3).mean(axis=(1, 3))
    assert out.dtype == np.float32 and np.allclose(out, blocks, atol=1e-6)
    assert not np.allclose(load_resized(tmp_path / "i.png", (4, 8), (2, 4), antialias=True), blocks, atol=1e-3)


def test_dinov2_position_embeddings_follow_the_cvpr_code():
    """CVPR recipe: the 37 x 37 table of 518 px, bicubic at scale factors (h + 0.1) / 37 and
    (w + 0.1) / 37 at every forward, no antialias; scalr-plus: timm's table resized at load."""

    cvpr = load_teacher("dinov2-vits14", (224, 448), random_init=True, pos_embed="dinov2-cvpr").model
    table = cvpr.pos_embed.detach()
    assert table.shape == (1, 1 + 37 * 37, 384)
    tokens = torch.zeros(1, 16, 32, 384)
    got = dinov2_cvpr_pos_embed(cvpr, tokens)
    grid = table[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    expected = (
        torch.nn.functional.interpolate(grid, scale_factor=(16.1 / 37, 32.1 / 37), mode="bicubic")
        .permute(0, 2, 3, 1)
        .reshape(1, 512, 384)
    )
    torch.testing.assert_close(got[:, 1:], expected, rtol=0, atol=0)
    torch.testing.assert_close(got[:, :1], cvpr.cls_token + table[:, :1], rtol=0, atol=0)
    by_size = (
        torch.nn.functional.interpolate(grid, size=(16, 32), mode="bicubic", antialias=True)
        .permute(0, 2, 3, 1)
        .reshape(1, 512, 384)
    )
    assert (expected - by_size).abs().max() > 1e-3  # the two rules do differ
    plus = load_teacher("dinov2-vits14", (224, 448), random_init=True, pos_embed="timm").model
    assert plus.pos_embed.shape == (1, 1 + 512, 384)
    assert (
        load_teacher("test-vit", (32, 64), random_init=True, pos_embed="dinov2-cvpr")
        .provenance["pos_embed"]
        .startswith("timm")
    )


def test_downstream_augmentation_treats_inputs_apart():
    """Released finetune.py: coordinates rotated and flipped, not scaled; inputs from the original
    points, x and y rotated by their own angle, x, y, z and radius scaled, never flipped."""

    rng = np.random.default_rng(0)
    xyz = rng.uniform(-20, 20, (200, 3)).astype(np.float32)
    feats = student_features(xyz, rng.uniform(0, 255, 200).astype(np.float32), (18.742355, 22.04632))
    for seed in range(6):
        coords, inputs = Augment(separate_features=True).apart(xyz, feats, np.random.default_rng(seed))
        np.testing.assert_allclose(
            np.linalg.norm(coords[:, :2], axis=1), np.linalg.norm(xyz[:, :2], axis=1), rtol=1e-5
        )  # rotation, flip: no scale
        assert np.array_equal(coords[:, 2], xyz[:, 2]) and np.array_equal(inputs[:, 0], feats[:, 0])
        s = inputs[:, 4] / feats[:, 4]
        assert np.allclose(s, s[0]) and 0.9 <= s[0] <= 1.1  # one scale on the radius ...
        np.testing.assert_allclose(inputs[:, 3], feats[:, 3] * s[0], rtol=1e-5)  # ... and on z
        np.testing.assert_allclose(
            np.linalg.norm(inputs[:, 1:3], axis=1), s[0] * np.linalg.norm(feats[:, 1:3], axis=1), rtol=1e-5
        )
        rot_inputs = inputs[:, 1:3] / s[0]  # a pure rotation of the inputs' x, y (determinant +1: never flipped)
        m = np.linalg.lstsq(feats[:, 1:3], rot_inputs, rcond=None)[0]
        assert np.isclose(np.linalg.det(m), 1.0, atol=1e-4)


@pytest.mark.parametrize(
    "mode, dataset, fraction, epochs, warmup, min_lr",
    [
        ("probe", "nuscenes", 1.0, 20, 2, 1e-5),
        ("probe", "pandar64", 1.0, 50, 2, 1e-5),
        ("finetune", "nuscenes", 1.0, 25, 2, 0.0),
        ("finetune", "semantickitti", 1.0, 10, 1, 0.0),
        ("finetune", "nuscenes", 0.01, 45, 4, 0.0),
        ("finetune", "semantickitti", 0.1, 45, 4, 0.0),
        ("finetune", "pandargt", 1.0, 25, 2, 0.0),
    ],
)
def test_downstream_schedules_are_the_released_configs(mode, dataset, fraction, epochs, warmup, min_lr, tmp_path):

    cfg = SegmentConfig.for_mode(mode, dataset=dataset, root=tmp_path, out=tmp_path, labels_fraction=fraction)
    assert (cfg.train.epochs, cfg.warmup_epochs, cfg.optim.min_lr) == (epochs, warmup, min_lr)
    lo, hi = cfg.sample.grid.lo, cfg.sample.grid.hi
    expected = {"pandar64": 128.0, "pandargt": 96.0 if mode == "finetune" else 128.0}.get(dataset, 64.0)
    assert (lo[0], hi[0], cfg.sample.grid.cell, cfg.sample.max_points) == (-expected, expected, 0.5, 20000)
