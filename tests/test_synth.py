import hashlib

import numpy as np
import pytest

from pipeline.datasets import open_dataset
from pipeline.datasets.base import load_image
from pipeline.synth import SynthConfig, generate, nuscenes_format, pandaset_format, semantickitti_format
from pipeline.synth.world import PALETTE

RIGS = {
    "nuscenes": ("mini_train", nuscenes_format.RAW_INDEX),
    "semantickitti": ("train", semantickitti_format.RAW_LABEL),
    "pandar64": ("train", pandaset_format.RAW_CLASS),
    "pandargt": ("train", pandaset_format.RAW_CLASS),
}
ROOTS = {
    "nuscenes": "nuscenes_root",
    "semantickitti": "kitti_root",
    "pandar64": "pandaset_root",
    "pandargt": "pandaset_root",
}


def chromaticity(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb / np.maximum(rgb.sum(axis=-1, keepdims=True), 1e-6)


@pytest.mark.parametrize("name", sorted(RIGS))
def test_points_land_on_pixels_of_their_class_colour(name, request):
    """Shading and texture only scale a colour: the nearest palette chromaticity of the pixel a
    point projects to must be a colour of the point's own class (up to edges and parallax)."""
    root = request.getfixturevalue(ROOTS[name])
    split, raw_of = RIGS[name]
    colours = [(cls, c) for cls, options in PALETTE.items() for c in options]
    table = chromaticity([c for _, c in colours])
    ds = open_dataset(name, root, split)
    agree = total = 0
    for scan in (ds[i] for i in range(len(ds))):
        for camera in scan.cameras:
            proj = ds.project(scan, camera.name)
            image = load_image(camera.image_path)
            pixel = image[proj.uv[:, 1].astype(int), proj.uv[:, 0].astype(int)]
            bright = pixel.sum(axis=1) > 60  # very dark pixels have no reliable colour
            nearest = np.argmin(((chromaticity(pixel[bright])[:, None] - table[None]) ** 2).sum(-1), axis=1)
            pixel_raw = np.array([raw_of[colours[j][0]] for j in nearest])
            agree += int((pixel_raw == scan.raw_labels[proj.point_index][bright]).sum())
            total += int(bright.sum())
    assert total > 1000
    print(f"{name}: {agree / total:.1%} of {total} points")
    assert agree / total > 0.85, f"only {agree / total:.1%} of points land on their class's colour"


def test_ground_classes_share_one_height(nuscenes_root):
    """Road, sidewalk and terrain lie at the same height: only appearance tells them apart."""
    ds = open_dataset("nuscenes", nuscenes_root, "mini_train")
    scan = ds[0]
    names = ds.meta.class_names
    heights = [
        np.median(scan.points[scan.labels == names.index(c), 2]) for c in ("driveable_surface", "sidewalk", "terrain")
    ]
    assert max(heights) - min(heights) < 0.05
    assert {"car", "truck", "pedestrian", "vegetation", "manmade"} <= {
        names[c] for c in np.unique(scan.labels) if c < 16
    }


def test_kitti_rig_has_lane_markings_as_a_raw_class(kitti_root):
    scan = open_dataset("semantickitti", kitti_root, "train")[0]
    assert (scan.raw_labels == 60).any() and (scan.raw_labels == 40).any()  # lane-marking and road
    assert scan.num_points > 10_000


def test_same_seed_same_bytes(tmp_path):
    cfg = SynthConfig(seed=3, scenes=1, frames=1, azimuth_steps=256, image_scale=0.2)

    def digest(root):
        h = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(root)).encode() + path.read_bytes())
        return h.hexdigest()

    for fmt in ("nuscenes", "semantickitti", "pandaset"):
        a, b = tmp_path / f"{fmt}-a", tmp_path / f"{fmt}-b"
        generate(fmt, a, cfg)
        generate(fmt, b, cfg)
        assert digest(a) == digest(b)
    c = tmp_path / "other-seed"
    generate("semantickitti", c, SynthConfig(seed=4, scenes=1, frames=1, azimuth_steps=256, image_scale=0.2))
    assert digest(c) != digest(tmp_path / "semantickitti-a")


def test_beams_are_configurable(tmp_path):
    generate("semantickitti", tmp_path, SynthConfig(scenes=1, frames=1, beams=16, azimuth_steps=128, image_scale=0.1))
    pts = np.fromfile(tmp_path / "sequences/00/velodyne/000000.bin", dtype=np.float32).reshape(-1, 4)
    elevation = np.degrees(np.arctan2(pts[:, 2], np.linalg.norm(pts[:, :2], axis=1)))
    assert len(np.unique(np.round(elevation, 0))) <= 2 * 16  # 16 beams (rounded angles, with noise)
    assert elevation.max() < 2.5 and elevation.min() > -25.5
