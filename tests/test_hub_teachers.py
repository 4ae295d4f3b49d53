"""Teachers by name from a real Hugging Face cache layout in a temporary folder, offline."""

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from helpers import tiny_config
from safetensors.torch import save_file

from stages.extract.extract import extract
from stages.extract.teachers import load_teacher
from stages.extract.weights import WeightsError
from stages.runtime import seeded

REPO = "timm/vit_small_patch14_dinov2.lvd142m"  # the hub repository timm names for dinov2-vits14
COMMIT = hashlib.sha1(b"scalr test snapshot").hexdigest()


def hub_cache(root, state: dict, name: str = REPO):
    """The hub cache layout: models--ORG--NAME/{blobs, refs/main, snapshots/COMMIT/FILE -> blob}."""
    repo = root / f"models--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(COMMIT)
    blob = repo / "blobs" / "weights"
    blob.parent.mkdir()
    save_file(state, str(blob))
    snapshot = repo / "snapshots" / COMMIT / "model.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    return snapshot


@pytest.fixture(scope="module")
def weights():
    with seeded(1):
        model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_teacher_by_name_from_the_offline_cache(tmp_path, monkeypatch, weights):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = hub_cache(tmp_path / "hub", weights)
    teacher = load_teacher("dinov2-vits14", (28, 56), pos_embed="dinov2-cvpr")
    assert teacher.provenance["hub"] == {"repo": REPO, "revision": COMMIT, "file": "model.safetensors"}
    assert teacher.provenance["weights_sha256"] == hashlib.sha256(snapshot.read_bytes()).hexdigest()
    assert torch.equal(teacher.model.blocks[3].attn.qkv.weight, weights["blocks.3.attn.qkv.weight"])
    assert torch.equal(teacher.model.pos_embed, weights["pos_embed"])  # the 518-px table, as saved


def test_missing_weights_offline_say_which_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsError) as err:
        load_teacher("dinov2-vits14", (28, 56))
    message = str(err.value)
    assert "\n" not in message and f"repository {REPO}, file model.safetensors" in message
    assert "HF_HUB_OFFLINE=1" in message and "huggingface-cli download" in message and "--weights FILE" in message


def test_hub_weights_must_cover_every_parameter(tmp_path, monkeypatch, weights):
    """timm's own pretrained path loads non-strictly; scalr checks coverage itself."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_cache(tmp_path / "hub", {k: v for k, v in weights.items() if k != "blocks.5.mlp.fc2.weight"})
    with pytest.raises(WeightsError, match=r"1 missing tensors \['blocks.5.mlp.fc2.weight'\]"):
        load_teacher("dinov2-vits14", (28, 56))


@pytest.mark.parametrize(
    "teacher, architecture, dim, mean",
    [
        ("dinov3-vits16", "vit_small_patch16_dinov3.lvd1689m", 384, [0.485, 0.456, 0.406]),
        ("siglip2-vitb16", "vit_base_patch16_siglip_224.v2_webli", 768, [0.5, 0.5, 0.5]),
    ],
)
def test_new_teachers_extract_on_a_synthetic_rig_from_the_offline_cache(
    teacher, architecture, dim, mean, nuscenes_root, tmp_path, monkeypatch
):
    """DINOv3 (eva.py: RoPE, class + 4 registers) and SigLIP 2 (no prefix token) by name from a
    Hugging Face cache holding their timm repository (random weights here), offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with seeded(2):
        model = timm.create_model(architecture, pretrained=False, num_classes=0)
    hub_cache(tmp_path / "hub", {k: v.contiguous() for k, v in model.state_dict().items()}, f"timm/{architecture}")
    del model
    cfg = tiny_config(nuscenes_root, tmp_path / "s.zarr", "nuscenes", "mini_train", teacher=teacher, max_scans=1)
    store = extract(replace(cfg, random_init=False))
    attrs = store.attrs["teacher"]
    assert (attrs["name"], attrs["dim"], attrs["random_init"], attrs["mean"]) == (teacher, dim, False, mean)
    assert attrs["hub"] == {"repo": f"timm/{architecture}", "revision": COMMIT, "file": "model.safetensors"}
    assert store.attrs["grid_size"] == [2, 4]  # 32 x 64 pixels in 16-pixel patches, prefix tokens removed
    row = store.manifest().to_pylist()[0]
    targets = store.read(row["part"], row["offset"], row["count"], row["grid"])["features"]
    assert targets.shape == (row["count"], dim) and np.isfinite(targets).all() and targets.astype(np.float32).std() > 0
