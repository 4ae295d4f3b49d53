"""The live viewer (`scalr view`): what the page shows for every dataset, layout and feature source
(driven as the page drives it), and a real click in headless Chromium checked on a screenshot."""

import io
import os
import shutil
import socket
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains

from pipeline.errors import DatasetError
from pipeline.transforms import Grid
from stages.cli import main
from stages.downstream.embed import EmbedConfig, embed
from stages.extract.extract import ExtractConfig, extract
from stages.student.pretrain import PretrainConfig, pretrain
from stages.student.samples import SampleConfig
from stages.student.train import OptimConfig, TrainConfig
from stages.student.waffleiron import WaffleIronConfig
from stages.tools.colours import similarity_rgb, to_uint8
from stages.tools.scan_features import StoreScans, pick_query
from stages.tools.view import FeatureViewer, ViewConfig, nearest_on_ray

COOLWARM = matplotlib.colormaps["coolwarm"](np.linspace(0, 1, 256))[:, :3] * 255.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stores(nuscenes_root, kitti_root, pandaset_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("view")
    common = {"teacher": "test-vit", "random_init": True, "num_workers": 0}
    return {
        "nuscenes-grid": extract(
            ExtractConfig("nuscenes", nuscenes_root, "mini_train", out=out / "n.zarr", image_size=(112, 224), **common)
        ),
        "semantickitti-points": extract(
            ExtractConfig(
                "semantickitti",
                kitti_root,
                "train",
                out=out / "k.zarr",
                image_size=(64, 224),
                layout="points",
                **common,
            )
        ),
        "pandar64-grid-int8": extract(
            ExtractConfig(
                "pandar64", pandaset_root, "train", out=out / "p.zarr", image_size=(64, 128), quantize="int8", **common
            )
        ),
    }


@pytest.fixture(scope="module")
def untrained(stores, tmp_path_factory):
    grid = Grid(cell=4.0)
    cfg = PretrainConfig(
        stores=(stores["semantickitti-points"].path,),
        out=tmp_path_factory.mktemp("run") / "untrained",
        model=WaffleIronConfig(depth=2, width=16, grid_shape=grid.shape),
        sample=SampleConfig(max_points=3000, grid=grid),
        optim=OptimConfig(warmup_iters=1),
        train=TrainConfig(batch_size=2, epochs=1, max_steps=0, num_workers=0),
    )
    return pretrain(cfg)["checkpoint"]


def test_first_point_on_the_click_ray():
    xyz = np.array([[10.0, 0.0, 0.0], [5.0, 0.05, 0.0], [5.0, 1.0, 0.0], [-3.0, 0.0, 0.0]])
    assert nearest_on_ray(xyz, (0, 0, 0), (1, 0, 0), radius=0.1) == 1  # the nearer of the two on the ray
    assert nearest_on_ray(xyz, (0, 0, 0), (2, 0, 0), radius=0.01) == 0  # within the radius only
    assert nearest_on_ray(xyz, (0, 0, 0), (-1, 0, 0), radius=0.1) == 3  # in front of the origin only
    assert nearest_on_ray(xyz, (0, 0, 0), (0, 0, 1), radius=0.1) is None


def click_from_above(viewer: FeatureViewer, row: int) -> int:
    return viewer.click(tuple(viewer.scan.xyz[row] + np.array([0.0, 0.0, 30.0])), (0.0, 0.0, -1.0))


@pytest.mark.parametrize("name", ["nuscenes-grid", "semantickitti-points", "pandar64-grid-int8"])
def test_viewer_on_every_dataset_and_layout(stores, name):
    store = stores[name]
    viewer = FeatureViewer(ViewConfig(store.path, port=free_port()))
    try:
        scans = StoreScans(store)
        assert viewer.scan_ids == scans.scan_ids and viewer.scan.scan_id == scans.scan_ids[0]
        scan = viewer.scan
        assert np.array_equal(viewer.colours, to_uint8(scans.pca().rgb(scan.features)))  # PCA fitted once on the store
        assert viewer.image is not None and viewer.image.shape[1] == viewer.cfg.image_width
        target = pick_query(scan)
        row = click_from_above(viewer, target)
        above = np.linalg.norm(scan.xyz[:, :2] - scan.xyz[target, :2], axis=1) <= viewer.cfg.point_size
        assert row == np.flatnonzero(above)[np.argmax(scan.xyz[above, 2])]  # the highest point under the click
        assert viewer.query == row and "query: point" in viewer.info.content
        assert np.array_equal(
            viewer.colours[row], to_uint8(similarity_rgb(np.array([1.0])))[0]
        )  # the point itself: +1, red
        camera = next(c for c in scan.cameras if c.name == viewer.camera_box.value)
        assert np.any(camera.rows == row)  # the image shown is one that sees the query, marked in black
        assert (viewer.image.reshape(-1, 3) == 0).all(axis=1).sum() >= 100
        viewer.show(len(viewer.scan_ids) - 1)
        assert viewer.query is None and viewer.scan.scan_id == scans.scan_ids[-1]
        assert viewer.click((0.0, 0.0, 500.0), (0.0, 1.0, 0.0)) is None and "no point" in viewer.info.content
    finally:
        viewer.close()


def test_view_command_names_bad_input(stores, tmp_path):

    result = CliRunner().invoke(
        main, ["view", str(stores["nuscenes-grid"].path), "--scan", "nope", "--port", str(free_port())]
    )
    assert result.exit_code == 1 and "no stored point for scan 'nope'" in result.output, result.output
    result = CliRunner().invoke(main, ["view", str(tmp_path / "absent.zarr")])
    assert result.exit_code == 2 and "no such store" in result.output


def test_viewer_with_a_student_and_on_a_student_store(stores, untrained, kitti_root, tmp_path):
    store = stores["semantickitti-points"]
    viewer = FeatureViewer(ViewConfig(store.path, checkpoint=untrained, port=free_port()))
    try:
        viewer.show(0, "student")
        scan = viewer.scan
        assert viewer.source_box.value == "student"  # the menu says what is shown
        assert (
            scan.source.startswith("student")
            and scan.features.shape[1] == 16
            and len(scan.xyz) > len(viewer.load("teacher", scan.scan_id).xyz)
        )
        assert np.array_equal(viewer.colours, to_uint8(viewer.sources["student"].pca().rgb(scan.features)))
        row = click_from_above(viewer, pick_query(scan))
        assert row is not None and viewer.colours[row].tolist() == to_uint8(similarity_rgb(np.array([1.0])))[0].tolist()
        assert viewer.image is not None
        shown = viewer.scan

        def unreadable(scan_id):
            raise DatasetError(f"/data/{scan_id}.bin", "size 17 is not a multiple of the 16-byte record")

        viewer.sources["student"].load = unreadable  # a damaged raw scan: said on the page, the last scan stays
        viewer.show(1)
        assert (
            viewer.scan is shown
            and "cannot show scan" in viewer.info.content
            and "16-byte record" in viewer.info.content
        )
    finally:
        viewer.close()
    embedded = embed(EmbedConfig(untrained, "semantickitti", kitti_root, tmp_path / "e.zarr", split="train"))
    viewer = FeatureViewer(ViewConfig(embedded.path, port=free_port()))
    try:  # a student store has no image: 3D only
        assert viewer.image is None and [c.name for c in viewer.scan.cameras] == ["lidar"]
        assert click_from_above(viewer, pick_query(viewer.scan)) is not None
    finally:
        viewer.close()


# ---- a real browser ------------------------------------------------------------------------
def coolwarm_fraction(png: bytes) -> tuple[float, int]:
    """(fraction of the saturated pixels lying on the coolwarm colour map, their count)."""

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float).reshape(-1, 3)
    saturated = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 60]
    if not len(saturated):
        return 0.0, 0
    distance = np.sqrt(((saturated[:, None, :] - COOLWARM[None]) ** 2).sum(axis=-1)).min(axis=1)
    return float((distance < 20).mean()), len(saturated)


def wait_for(condition, seconds: float = 60.0, every: float = 0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    return condition()


def chrome():
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "headless Chromium test: no chromium / chromedriver on PATH (Debian: apt-get install chromium "
            "chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--window-size=1400,900",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_click_in_headless_chromium_colours_the_scan_by_similarity(stores, tmp_path):
    """The page loads in a real browser, shows PCA colours, and a click on a point (the browser's
    own click on its canvas, sent back to the server as a ray) turns the scan into the similarity
    colours, checked on a screenshot of the 3D view. SCALR_VIEWER_SCREENSHOT=path keeps the
    screenshot (the README's picture)."""
    browser = chrome()
    viewer = FeatureViewer(ViewConfig(stores["nuscenes-grid"].path, port=free_port()))
    try:
        browser.get(viewer.url())
        assert wait_for(lambda: viewer.server.get_clients()), "the page never connected to the viewer"
        canvas = wait_for(
            lambda: max(
                browser.find_elements("css selector", "canvas"),
                key=lambda c: c.size["width"] * c.size["height"],
                default=None,
            )
        )
        assert canvas is not None and canvas.size["width"] > 600
        before = wait_for(lambda: (lambda f: f if f[1] > 2000 else None)(coolwarm_fraction(canvas.screenshot_as_png)))
        assert before and before[0] < 0.3, f"PCA colours expected before the click, got {before}"

        target = pick_query(viewer.scan, class_name="car")
        viewer.look_at(target)
        time.sleep(2.0)  # the browser moves its camera
        ActionChains(browser).move_to_element(canvas).click().perform()  # the centre: where the camera looks
        assert wait_for(lambda: viewer.query is not None), "the click never reached the viewer"
        assert np.linalg.norm(viewer.scan.xyz[viewer.query] - viewer.scan.xyz[target]) < 1.5  # the aimed-at car
        after = wait_for(
            lambda: (lambda f: f if f[0] > 0.9 and f[1] > 2000 else None)(coolwarm_fraction(canvas.screenshot_as_png))
        )
        assert after, f"similarity colours expected after the click, got {coolwarm_fraction(canvas.screenshot_as_png)}"
        browser.execute_script(
            "document.querySelectorAll('[role=alert]').forEach(e => e.remove())"
        )  # the software-WebGL notice
        shot = tmp_path / "viewer.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("SCALR_VIEWER_SCREENSHOT"):
            Path(os.environ["SCALR_VIEWER_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, os.environ["SCALR_VIEWER_SCREENSHOT"])
    finally:
        browser.quit()
        viewer.close()
