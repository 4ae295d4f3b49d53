"""Shared fixtures: tiny synthetic datasets in the real on-disk formats, made once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network

from pipeline.synth import SynthConfig, generate  # noqa: E402

TINY_NUSCENES = SynthConfig(seed=7, scenes=2, frames=2, azimuth_steps=512, image_scale=0.25)
TINY_KITTI = SynthConfig(seed=7, scenes=2, frames=2, azimuth_steps=512, image_scale=0.4)


@pytest.fixture(scope="session")
def nuscenes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth-nuscenes")
    generate("nuscenes", root, TINY_NUSCENES)
    return root


@pytest.fixture(scope="session")
def kitti_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth-kitti")
    generate("semantickitti", root, TINY_KITTI)
    return root


@pytest.fixture(scope="session")
def pandaset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth-pandaset")
    generate("pandaset", root, SynthConfig(seed=7, scenes=2, frames=2, azimuth_steps=512, image_scale=0.2))
    return root


@pytest.fixture
def nuscenes_copy(nuscenes_root, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(nuscenes_root, tmp_path / "nuscenes"))


@pytest.fixture
def kitti_copy(kitti_root, tmp_path) -> Path:
    return Path(shutil.copytree(kitti_root, tmp_path / "kitti"))


@pytest.fixture
def one_thread():
    """Bitwise comparisons of float results run the kernels with one thread: multi-threaded CPU
    kernels split reductions by thread count, and some split them differently from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
