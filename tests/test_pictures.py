"""Pictures are produced and are not blank; the demo's table; an untrained checkpoint baseline."""

import numpy as np
import pytest
from PIL import Image

from pipeline.transforms import Grid
from stages.demo import DemoConfig, table
from stages.extract import ExtractConfig, extract
from stages.inspect import plot_entry, plot_student
from stages.plots import cosine_to, pca_rgb
from stages.pretrain import PretrainConfig, pretrain
from stages.student_data import SampleConfig
from stages.train import OptimConfig, TrainConfig
from stages.waffleiron import WaffleIronConfig
from storage.checkpoint import load_checkpoint

GRID = Grid(cell=4.0)


def not_blank(path):
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
    assert pixels.std() > 25 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


@pytest.fixture(scope="module")
def store(nuscenes_root, tmp_path_factory):
    return extract(ExtractConfig("nuscenes", nuscenes_root, "mini_train", "test-vit", tmp_path_factory.mktemp("s") / "s.zarr", random_init=True, image_size=(64, 128), num_workers=0))


def test_store_entry_pictures(store, tmp_path):
    row = store.manifest().to_pylist()[0]
    paths = plot_entry(store, row["scan_id"], row["camera"], tmp_path, class_name="driveable_surface")
    assert [p.name.split("-")[-1] for p in paths] == ["correlation.png", "pca.png"]
    for p in paths:
        not_blank(p)


def test_untrained_run_and_student_pictures(store, nuscenes_root, tmp_path):
    cfg = PretrainConfig(
        stores=(store.path,), out=tmp_path / "untrained", model=WaffleIronConfig(depth=2, width=16, grid_shape=GRID.shape),
        sample=SampleConfig(max_points=3000, grid=GRID), optim=OptimConfig(warmup_iters=1), train=TrainConfig(batch_size=2, epochs=1, max_steps=0, num_workers=0),
    )  # fmt: skip
    summary = pretrain(cfg)
    assert summary["steps"] == 0 and load_checkpoint(tmp_path / "untrained/checkpoints/last.pt")["step"] == 0
    scan_id = store.manifest().to_pylist()[0]["scan_id"]
    for p in plot_student(tmp_path / "untrained/checkpoints/last.pt", "nuscenes", nuscenes_root, "mini_train", scan_id, "CAM_BACK", tmp_path / "fig"):
        not_blank(p)


def test_feature_colourings():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 8)) + 5.0  # a large shared component
    sim = cosine_to(f, 3)
    assert sim[3] == pytest.approx(1.0) and sim.min() < 0  # centring reveals the structure
    assert cosine_to(f, 3, centre=False).min() > 0.8
    rgb = pca_rgb(f)
    assert rgb.shape == (500, 3) and rgb.min() >= 0 and rgb.max() <= 1 and rgb.std() > 0.2


def test_demo_table_in_the_paper_style():
    lines = table({"nuscenes": {"random-init": 0.1, "distilled": 0.25, "scratch": 0.3}}, DemoConfig())
    assert "random-init" in lines[1] and "gap" in lines[1]
    assert lines[2].split()[-4:] == ["10.0", "25.0", "+15.0", "30.0"]
