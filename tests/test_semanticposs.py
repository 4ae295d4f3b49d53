"""SemanticPOSS in its SemanticKITTI-like layout, and domain generalisation onto it."""

import shutil

import numpy as np
import pytest

from pipeline.class_maps import TO_SEMANTICPOSS, find_class_map
from pipeline.datasets import open_dataset
from pipeline.datasets.nuscenes import CLASSES as NUS
from pipeline.datasets.semantickitti import CLASSES as KITTI
from pipeline.datasets.semanticposs import CLASSES as POSS
from pipeline.errors import DatasetError
from pipeline.synth import SynthConfig, generate
from pipeline.transforms import Grid
from stages.downstream.evaluate import EvaluateConfig, evaluate
from stages.downstream.segment import SegmentConfig, train_segmentation
from stages.student.samples import SampleConfig
from stages.student.train import TrainConfig


@pytest.fixture(scope="module")
def poss_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("poss")
    generate("semanticposs", root, SynthConfig(seed=3, scenes=2, frames=2, azimuth_steps=384))
    return root


def test_reader(poss_root):
    ds = open_dataset("semanticposs", poss_root, "val")
    assert ds.scan_ids == ["02/000000", "02/000001"] and open_dataset("semanticposs", poss_root, "train").scan_ids == [
        "00/000000",
        "00/000001",
    ]
    scan = ds[0]
    assert scan.cameras == () and scan.points.shape[1] == 4
    names = ds.meta.class_names
    assert {"ground", "building", "car", "plants"} <= {names[c] for c in np.unique(scan.labels) if c < len(names)}


def test_unknown_label_id(poss_root, tmp_path):

    root = shutil.copytree(poss_root, tmp_path / "poss")
    raw = np.fromfile(root / "sequences/02/labels/000000.label", dtype=np.uint32)
    raw[0] = 3  # an id semantic-poss.yaml does not define
    raw.tofile(root / "sequences/02/labels/000000.label")
    with pytest.raises(DatasetError, match=r"\[3\] are not in the semanticposs learning map"):
        open_dataset("semanticposs", root, "val")[0]


def test_six_class_map_covers_every_class():

    for name, classes in (("nuscenes", NUS), ("semantickitti", KITTI), ("semanticposs", POSS)):
        lut = TO_SEMANTICPOSS.lookup(name, classes)
        assert set(lut[: len(classes)]) <= set(range(6)) | {255}
    assert find_class_map("semantickitti", "semanticposs") is TO_SEMANTICPOSS
    assert find_class_map("semantickitti", "nuscenes").name == "nuscenes-semantickitti-10"


def test_a_kitti_model_scored_on_semanticposs(kitti_root, poss_root, tmp_path):

    cfg = SegmentConfig.for_mode(
        "scratch",
        dataset="semantickitti",
        root=kitti_root,
        out=tmp_path / "run",
        student="WI-12-64",
        sample=SampleConfig(max_points=10**9, grid=Grid(cell=4.0)),
    )
    cfg = cfg.__class__(**{**cfg.__dict__, "train": TrainConfig(epochs=1, batch_size=2, num_workers=0)})
    ckpt = train_segmentation(cfg)["checkpoint"]
    result = evaluate(EvaluateConfig("semanticposs", poss_root, ckpt, split="val"))
    assert list(result["per_class_iou"]) == ["person", "bicycle", "car", "ground", "vegetation", "manmade"]
    assert result["class_map"] == "to-semanticposs-6" and 0 <= result["miou"] <= 1
