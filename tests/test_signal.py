"""The whole path carries image semantics to points, or this test fails.

On a small synthetic nuScenes-format set, a student distilled from the oracle teacher (it sees
each pixel's class) is linearly probed against the same student untrained: distillation must add
10+ mIoU points (13.3 measured, the same under 1, 2 and 4 threads). Then every stored pixel is
moved three patches down (a broken projection, done here on a copy of the store): a student
distilled from those targets must keep less than half of the gain (it keeps none: -24 % measured).
A pixel off by a row, a store read at the wrong entry or a loss on the wrong pairs gives the second
result, not the first.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import reseal, tiny_store

from pipeline.synth import SynthConfig, generate
from pipeline.transforms import Grid
from stages.downstream.evaluate import EvaluateConfig, evaluate
from stages.downstream.segment import SegmentConfig, train_segmentation
from stages.student.pretrain import PretrainConfig, pretrain
from stages.student.samples import SampleConfig
from stages.student.train import OptimConfig, TrainConfig
from stages.student.waffleiron import WaffleIronConfig
from storage.feature_store import FeatureStore

GRID = Grid(cell=1.0)
SHIFT_ROWS = 42  # three patches of the oracle (14 px) at 224 x 448


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signal") / "nuscenes"
    generate("nuscenes", root, SynthConfig(seed=7, scenes=4, frames=4, azimuth_steps=512, image_scale=0.25))
    return root


def student(store: FeatureStore, run: Path, max_steps: int | None = None) -> Path:
    cfg = PretrainConfig(
        (store.path,),
        run,
        "WI-12-64",
        model=WaffleIronConfig(depth=6, width=64, grid_shape=GRID.shape),
        sample=SampleConfig(max_points=8000, grid=GRID),
        optim=OptimConfig(warmup_iters=5),
        train=TrainConfig(batch_size=2, epochs=30, num_workers=0, log_every=10, max_steps=max_steps),
    )
    return Path(pretrain(cfg)["checkpoint"])


def probed_miou(rig: Path, checkpoint: Path, run: Path) -> float:
    seg = SegmentConfig.for_mode(
        "probe", dataset="nuscenes", root=rig, split="mini_train", out=run, checkpoint=checkpoint
    )
    sample = dataclasses.replace(seg.sample, grid=GRID, max_points=8000)
    train = dataclasses.replace(seg.train, epochs=8, batch_size=2, num_workers=0, log_every=10)
    probe = train_segmentation(dataclasses.replace(seg, sample=sample, train=train, warmup_epochs=1))["checkpoint"]
    return evaluate(EvaluateConfig("nuscenes", rig, Path(probe), split="mini_val"))["miou"]


def shifted_copy(store: FeatureStore, out: Path, rows: int) -> FeatureStore:
    """The store with every point's pixel `rows` lower (clamped to the image), resealed."""
    copy = Path(shutil.copytree(store.path, out))
    height = store.attrs["image_size"][0]
    for part in store.committed_parts():
        pixel = zarr.open_array(str(copy / f"parts/part-{part:06d}/pixel"), mode="r+")
        moved = pixel[:]
        moved[:, 1] = np.clip(moved[:, 1] + rows, 0, height - 1)
        pixel[:] = moved
        reseal(copy, part, keep_sha256=False)
    return FeatureStore(copy)


def test_distilling_the_oracle_carries_classes_to_points_and_a_shifted_projection_does_not(rig, tmp_path):
    oracle = tiny_store(
        rig, tmp_path / "oracle.zarr", "nuscenes", "mini_train", teacher="oracle", image_size=(224, 448)
    )
    untrained = probed_miou(rig, student(oracle, tmp_path / "untrained", max_steps=0), tmp_path / "untrained-probe")
    distilled = probed_miou(rig, student(oracle, tmp_path / "oracle"), tmp_path / "oracle-probe")
    gain = distilled - untrained
    assert gain >= 0.10, f"oracle-distilled {distilled:.3f} vs untrained {untrained:.3f}"
    shifted = shifted_copy(oracle, tmp_path / "shifted.zarr", SHIFT_ROWS)
    broken = probed_miou(rig, student(shifted, tmp_path / "shifted"), tmp_path / "shifted-probe")
    assert broken - untrained < 0.5 * gain, f"shifted {broken:.3f}, oracle {distilled:.3f}, untrained {untrained:.3f}"
