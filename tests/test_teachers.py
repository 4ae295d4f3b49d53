import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F

from stages.extract.registry import TEACHERS
from stages.extract.teachers import Teacher, build_teacher, load_teacher
from stages.extract.weights import WeightsError, resolve_weights
from stages.runtime import seeded
from storage.targets import sample_grid

SMALL = ["test-vit", "dino-vits8", "dinov2-vits14", "dinov2-vits14-reg4", "mae-vitb16", "maskclip-vitb16"]


@pytest.mark.parametrize("name", sorted(n for n, spec in TEACHERS.items() if spec.timm_name != "-"))
def test_registry_entry_matches_its_architecture(name):
    """Every entry's dim and patch are those of the timm architecture (built on the meta device)."""
    spec = TEACHERS[name]
    with torch.device("meta"):
        model = timm.create_model(spec.timm_name, pretrained=False, img_size=(224, 448))
    assert model.patch_embed.patch_size == (spec.patch, spec.patch)
    width = model.head.out_features if spec.dense == "maskclip-value" else model.embed_dim
    assert width == spec.dim
    assert spec.random_init_only or spec.weights_file


@pytest.mark.parametrize("name", SMALL)
def test_teacher_gives_a_token_grid(name):
    spec = TEACHERS[name]
    h, w = 2 * spec.patch, 4 * spec.patch
    teacher = load_teacher(name, (h, w), random_init=True, seed=1)
    images = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    grid = teacher(images)
    assert grid.shape == (2, spec.dim, 2, 4) and grid.dtype == torch.float32
    assert torch.isfinite(grid).all()
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.model.training
    assert teacher.provenance["random_init"] and teacher.provenance["weights"] == "random-init seed 1"


PREFIX_TOKENS = {"dinov3": 5, "siglip2": 0, "reg4": 5, "dinov2": 1, "dino-": 1, "mae": 1, "maskclip": 1}


@pytest.mark.parametrize("name", sorted(n for n, spec in TEACHERS.items() if spec.timm_name not in ("-", "test_vit")))
def test_every_teacher_gives_its_token_grid_with_tiny_shapes(name):
    """Every registered architecture, one block deep, on a 2 x 4 patch image: its true number of
    prefix tokens removed, a (dim, 2, 4) grid of the block before the final norm, normalised with
    the mean and std of timm's pretrained config (the satellite DINOv3's own)."""
    spec = TEACHERS[name]
    h, w = 2 * spec.patch, 4 * spec.patch
    extra = {"num_classes": spec.dim} if spec.dense == "maskclip-value" else {"num_classes": 0}
    with seeded(0):
        model = timm.create_model(spec.timm_name, pretrained=False, img_size=(h, w), depth=1, **extra)
    assert model.num_prefix_tokens == next(v for k, v in PREFIX_TOKENS.items() if k in name)
    teacher = Teacher(spec, model, "timm", {})
    cfg = timm.get_pretrained_cfg(spec.timm_name)
    assert teacher.provenance["mean"] == list(cfg.mean) and teacher.provenance["std"] == list(cfg.std)
    grid = teacher(torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8))
    assert grid.shape == (1, spec.dim, 2, 4) and torch.isfinite(grid).all()
    if spec.dense != "maskclip-value":  # timm's whole forward with the final norm taken out
        images = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)
        x = (images.float() / 255 - teacher.mean) / teacher.std
        model.norm = torch.nn.Identity()
        tokens = model.forward_features(x)[:, model.num_prefix_tokens :]
        expected = tokens.reshape(1, 2, 4, spec.dim).permute(0, 3, 1, 2)
        torch.testing.assert_close(teacher(images), expected, rtol=1e-5, atol=1e-5)


def test_last_block_before_norm_without_prefix_tokens():
    teacher = load_teacher("dinov2-vits14-reg4", (28, 56), random_init=True)
    x = (torch.randint(0, 256, (1, 3, 28, 56)).float() - teacher.mean) / teacher.std
    m = teacher.model
    tokens = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    for block in m.blocks:
        tokens = block(tokens)
    assert m.num_prefix_tokens == 5  # class token + 4 registers
    expected = tokens[:, 5:].transpose(1, 2).reshape(1, 384, 2, 4)
    assert torch.allclose(teacher(x * teacher.std + teacher.mean), expected, atol=1e-4)


def test_sampling_equals_full_upsampling():
    """Per-point targets read from the token grid equal upsample-everything-then-read-the-pixel."""
    rng = torch.Generator().manual_seed(0)
    grid = torch.randn(8, 16, 32, generator=rng)
    h, w = 224, 448
    full = F.interpolate(grid[None], size=(h, w), mode="bilinear", align_corners=True)[0]
    cols = torch.cat([torch.randint(0, w, (500,), generator=rng), torch.tensor([0, w - 1, 0, w - 1])])
    rows = torch.cat([torch.randint(0, h, (500,), generator=rng), torch.tensor([0, 0, h - 1, h - 1])])
    got = sample_grid(grid, torch.stack([cols, rows], 1).float(), (h, w))
    assert torch.allclose(got, full[:, rows, cols].T, atol=1e-5)
    assert sample_grid(grid, torch.zeros(0, 2), (h, w)).shape == (0, 8)


@pytest.fixture
def file_teacher(monkeypatch):
    """A registry entry with a weights file, on the tiny test architecture."""
    spec = dataclasses.replace(
        TEACHERS["test-vit"],
        name="test-vit-file",
        weights_file="test_vit.pth",
        weights_source="made by the test",
        random_init_only=False,
    )
    monkeypatch.setitem(TEACHERS, spec.name, spec)
    return spec


def test_weights_from_a_local_file(tmp_path, file_teacher):
    with seeded(3):
        source = timm.create_model("test_vit", pretrained=False, img_size=(32, 64), num_classes=0)
    torch.save(source.state_dict(), tmp_path / "test_vit.pth")
    teacher = load_teacher("test-vit-file", (32, 64), weights_dir=tmp_path)
    assert teacher.provenance["random_init"] is False and len(teacher.provenance["weights_sha256"]) == 64
    for name, tensor in source.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[name], tensor), name


def test_bad_weights_fail_at_once_naming_the_file(tmp_path, file_teacher, monkeypatch):
    with pytest.raises(
        WeightsError,
        match="test_vit.pth: weights file for teacher test-vit-file is missing; such weights: made by the test",
    ):
        load_teacher("test-vit-file", (32, 64), weights_dir=tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # by name, offline, not cached
    with pytest.raises(
        WeightsError,
        match="teacher test-vit-file: weights not in the Hugging Face cache .* or as a local file \\(--weights FILE",
    ):
        load_teacher("test-vit-file", (32, 64))
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("test_vit2", pretrained=False, num_classes=0).state_dict(), wrong)
    with pytest.raises(WeightsError, match=f"{wrong}: not test-vit-file weights .* unexpected"):
        load_teacher("test-vit-file", (32, 64), weights=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth: cannot load"):
        load_teacher("test-vit-file", (32, 64), weights=garbage)
    with pytest.raises(WeightsError, match="has no pretrained weights: pass --random-init"):
        load_teacher("test-vit", (32, 64), weights=wrong)


def test_image_size_must_fit_the_patch():
    with pytest.raises(ValueError, match="not a multiple of dinov2-vits14's patch size 14"):
        load_teacher("dinov2-vits14", (225, 448), random_init=True)


def test_original_dinov2_checkpoint_layout_is_converted(tmp_path):
    """The release checkpoints are trained at 518 px (37 x 37 positions) and carry a mask token;
    timm's converter drops it and resizes the positions to the 224 x 448 grid (16 x 32)."""
    with seeded(0):
        original = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0
        ).state_dict()
    original["mask_token"] = torch.zeros(1, 384)
    assert original["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(original, tmp_path / "dinov2_vits14_pretrain.pth")
    teacher = load_teacher("dinov2-vits14", (224, 448), weights_dir=tmp_path)
    assert teacher.model.pos_embed.shape == (1, 1 + 16 * 32, 384)
    assert torch.equal(teacher.model.blocks[3].attn.qkv.weight, original["blocks.3.attn.qkv.weight"])


def test_the_oracle_gives_the_mean_class_embedding_of_each_patch():
    teacher = load_teacher("oracle", (28, 42), random_init=True, seed=5)
    classes = torch.full((1, 1, 28, 42), 255, dtype=torch.uint8)  # sky
    classes[..., :14, :14] = 7  # a patch of cars
    classes[..., 14:, 14:21] = 0  # half a patch of road, half sky
    grid = teacher(classes)
    e = teacher.embeddings  # 16 fixed rows: classes 0-13, "other", sky
    assert grid.shape == (1, 64, 2, 3)
    torch.testing.assert_close(grid[0, :, 0, 0], e[7])
    torch.testing.assert_close(grid[0, :, 1, 1], (e[0] + e[15]) / 2)
    torch.testing.assert_close(grid[0, :, 0, 2], e[15])
    again = load_teacher("oracle", (28, 42), random_init=True, seed=5)
    assert torch.equal(again(classes), grid) and not torch.equal(
        load_teacher("oracle", (28, 42), random_init=True, seed=6)(classes), grid
    )
    noisy = build_teacher(
        TEACHERS["oracle"], (28, 42), resolve_weights(TEACHERS["oracle"], None, None, True, 5), noise=0.5
    )
    a, b = noisy(classes), noisy(classes)
    assert (
        torch.equal(a, b) and 0.3 < (a - grid).std() < 0.7
    )  # seeded by the class map: the same noise for the same map
