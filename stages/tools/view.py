"""view: a live feature viewer in the browser, the paper's Fig. 1 on any scan of any store.

`scalr view STORE [--checkpoint CKPT]` serves a local web page (viser) showing one scan at a time:
its points in 3D coloured by the PCA of the cached features (fitted once per store, so colours
mean the same on every scan), or of a student's features when a checkpoint is given. Clicking a
point colours the whole scan by the cosine similarity of every feature to the clicked point's
(blue -1, grey 0, red +1), in 3D and on the camera image beside it.

Why viser: its page talks back to Python (clicks arrive as rays in the scene, GUI controls as
callbacks), so the similarity is computed here from the store, on demand, for any scan; rerun's
viewer displays what is logged to it but does not send clicks back to the logging process.

What the page shows, anyone who reaches the port can see: viser (1.1) has no login and accepts
WebSocket connections from any origin, so while the viewer runs, other processes of the machine
and web pages open in its browsers (browsers let a page open a WebSocket to localhost) can connect.
scalr binds 127.0.0.1 by default and warns when told to bind beyond this machine.

The store is opened without the integrity gate (one stat per chunk file: minutes on a terabyte
store); every chunk read is still checked by its CRC-32C, and `scalr verify` checks everything.
Only the shown scan's chunks are read (stages/scan_features.py).
"""

from __future__ import annotations

import ipaddress
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import viser
from PIL import Image

from pipeline.errors import NotFoundError, ScalrError
from stages.tools.colours import cosine_to, similarity_rgb, to_uint8
from stages.tools.scan_features import ScanFeatures, StoreScans, StudentScans
from storage.feature_store import FeatureStore

CACHED_SCANS = 4  # scans kept in memory (per source), for going back and forth


@dataclass(frozen=True)
class ViewConfig:
    store: Path
    checkpoint: Path | None = None  # a student checkpoint: its features on the store's raw scans
    recipe: str | None = None  # the recipe that made the checkpoint (None: its record's, or what a released file shows)
    host: str = "127.0.0.1"
    port: int = 8080
    scan: str | None = None  # the scan shown first (default: the store's first)
    point_size: float = 0.12  # metres
    image_width: int = 720  # the camera image is sent this wide (the panel shows it about half as wide)


def nearest_on_ray(xyz: np.ndarray, origin, direction, radius: float) -> int | None:
    """The first point a click's ray meets: among the points within `radius` of the ray, in front
    of its origin, the nearest along it. None when the ray passes no point."""
    d = np.asarray(direction, np.float64)
    d = d / np.linalg.norm(d)
    v = xyz.astype(np.float64) - np.asarray(origin, np.float64)
    along = v @ d
    off = np.linalg.norm(v - along[:, None] * d, axis=1)
    hit = np.flatnonzero((off <= radius) & (along > 0))
    return int(hit[np.argmin(along[hit])]) if len(hit) else None


def splat(image: np.ndarray, pixels: np.ndarray, colours: np.ndarray, width: int, radius: int = 3) -> np.ndarray:
    """The image scaled to `width` columns with a (2r+1)-pixel square of colour at each point's
    pixel (column, row): what the browser shows beside the 3D view."""
    h, w = image.shape[:2]
    scale = width / w
    out = np.asarray(
        Image.fromarray(to_uint8(image)).resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    ).copy()
    cols = np.clip(np.floor(pixels[:, 0] * scale).astype(int), 0, out.shape[1] - 1)
    rows = np.clip(np.floor(pixels[:, 1] * scale).astype(int), 0, out.shape[0] - 1)
    rgb = to_uint8(colours)
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            out[np.clip(rows + dr, 0, out.shape[0] - 1), np.clip(cols + dc, 0, out.shape[1] - 1)] = rgb
    return out


def mark(image: np.ndarray, pixel: np.ndarray, scale: float, radius: int = 10) -> np.ndarray:
    """A black square with a white border at the query's pixel."""
    r, c = int(pixel[1] * scale), int(pixel[0] * scale)
    h, w = image.shape[:2]
    image[max(r - radius - 2, 0) : min(r + radius + 3, h), max(c - radius - 2, 0) : min(c + radius + 3, w)] = 255
    image[max(r - radius, 0) : min(r + radius + 1, h), max(c - radius, 0) : min(c + radius + 1, w)] = 0
    return image


class FeatureViewer:
    """The viewer's state and page; `scalr view` serves it until interrupted. The methods the page
    calls (`show`, `select`, `click`) are also what the tests drive."""

    def __init__(self, cfg: ViewConfig):
        self.cfg = cfg
        self.store = FeatureStore(cfg.store, check=False)
        teacher = StoreScans(self.store)
        if not teacher.scan_ids:
            raise NotFoundError(f"{cfg.store}: no stored point to show")
        self.sources: dict[str, StoreScans | StudentScans] = {"teacher": teacher}
        if cfg.checkpoint is not None:
            a = self.store.attrs
            self.sources["student"] = StudentScans(
                cfg.checkpoint, a["dataset"]["name"], Path(a["dataset_root"]), a["dataset"]["split"], cfg.recipe
            )
        self.scan_ids = teacher.scan_ids
        if cfg.scan is not None and cfg.scan not in self.scan_ids:
            raise NotFoundError(
                f"{cfg.store}: no stored point for scan {cfg.scan!r} (`scalr inspect {cfg.store}` lists the entries)"
            )
        self._cache: OrderedDict[tuple[str, str], ScanFeatures] = OrderedDict()
        self._lock = threading.RLock()
        self._quiet = False  # set while this code changes the page's controls
        self.scan: ScanFeatures | None = None
        self.source = "teacher"
        self.query: int | None = None
        self.colours: np.ndarray | None = None  # (N, 3) uint8, what the 3D view shows
        self.image: np.ndarray | None = None  # what the image panel shows
        self.cloud = None  # the scan's point cloud in the 3D view

        self.server = viser.ViserServer(host=cfg.host, port=cfg.port, label="scalr view", verbose=False)
        self.server.scene.set_up_direction("+z")
        self.server.gui.configure_theme(control_width="large", show_share_button=False)
        self.server.gui.main_panel.dock_right()  # beside the 3D view, never over it
        self.server.initial_camera.position = (-24.0, 0.0, 18.0)
        self.server.initial_camera.look_at = (6.0, 0.0, 0.0)
        self._build_gui()
        self.server.scene.on_click()(lambda event: self.click(event.ray_origin, event.ray_direction))
        self.show(self.scan_ids.index(cfg.scan) if cfg.scan else 0)

    # ---- the page ------------------------------------------------------------------------
    def _build_gui(self) -> None:
        gui = self.server.gui
        a = self.store.attrs
        t = a["teacher"]
        gui.add_markdown(
            f"**{self.store.path.name}**  \n{self.sources['teacher'].source}, {a['layout']} layout, "
            f"{a['dataset']['name']} {a['dataset']['split']}: {len(self.scan_ids):,} scans with points"
            + ("  \n*random-init teacher: colours show a random network*" if t["random_init"] else "")
        )
        self.scan_number = gui.add_number("scan #", 0, min=0, max=len(self.scan_ids) - 1, step=1)
        self.scan_id_box = gui.add_text("scan id", self.scan_ids[0])
        buttons = gui.add_button_group("", ("previous", "next"))
        self.source_box = gui.add_dropdown("features", tuple(self.sources), initial_value="teacher")
        self.camera_box = gui.add_dropdown("camera image", ("-",))
        reset = gui.add_button("PCA colours (forget the clicked point)")
        self.info = gui.add_markdown("click a point to see how similar every feature is to its feature")
        self.image_panel = gui.add_image(np.zeros((8, 8, 3), np.uint8), label="camera", format="jpeg", jpeg_quality=85)

        self.scan_number.on_update(self._from_page(lambda _: self.show(int(self.scan_number.value))))
        self.scan_id_box.on_update(self._from_page(lambda _: self._go_to_scan_id(self.scan_id_box.value)))
        buttons.on_click(
            self._from_page(lambda event: self.show(self._index() + (1 if event.target.value == "next" else -1)))
        )
        self.source_box.on_update(self._from_page(lambda _: self.show(self._index(), self.source_box.value)))
        self.camera_box.on_update(self._from_page(lambda _: self._draw_image()))
        reset.on_click(self._from_page(lambda _: self.select(None)))

    def _from_page(self, callback):
        """A GUI callback that runs only for the user's changes: viser also calls it when this code
        sets a control's value (`_set`)."""
        return lambda event: None if self._quiet else callback(event)

    def _set(self, handle, **values) -> None:
        self._quiet = True
        try:
            for name, value in values.items():
                setattr(handle, name, value)
        finally:
            self._quiet = False

    def _index(self) -> int:
        return self.scan_ids.index(self.scan.scan_id) if self.scan else 0

    def _go_to_scan_id(self, scan_id: str) -> None:
        if scan_id in self.scan_ids and (self.scan is None or scan_id != self.scan.scan_id):
            self.show(self.scan_ids.index(scan_id))
        elif scan_id not in self.scan_ids:
            self.info.content = f"no scan {scan_id!r} in this store"

    # ---- what is shown -------------------------------------------------------------------
    def load(self, source: str, scan_id: str) -> ScanFeatures:
        key = (source, scan_id)
        if key not in self._cache:
            self._cache[key] = self.sources[source].load(scan_id)
            while len(self._cache) > CACHED_SCANS * len(self.sources):
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def show(self, index: int, source: str | None = None) -> None:
        """Show scan `index` (of the store's scans) with the features of `source`, PCA colours."""
        with self._lock:
            index = int(np.clip(index, 0, len(self.scan_ids) - 1))
            self.source = source or self.source
            try:
                self.scan = self.load(self.source, self.scan_ids[index])
            except (ScalrError, OSError) as err:  # a damaged chunk or raw file, a scan the student does not see
                self.info.content = f"**cannot show scan {self.scan_ids[index]}** ({self.source}): {err}"
                return
            with_images = tuple(c.name for c in self.scan.cameras if c.image is not None) or ("-",)
            self._set(self.scan_number, value=index)
            self._set(self.scan_id_box, value=self.scan.scan_id)
            self._set(self.source_box, value=self.source)
            self._set(self.camera_box, options=with_images, value=with_images[0])
            self.cloud = self.server.scene.add_point_cloud(
                "/scan",
                self.scan.xyz.astype(np.float32),
                np.zeros((len(self.scan.xyz), 3), np.uint8),
                point_size=self.cfg.point_size,
                point_shape="circle",
                point_shading="flat",
            )
            self.select(None)

    def select(self, row: int | None) -> None:
        """Colour by the similarity to `row` (or by PCA when None) in 3D and on the image."""
        with self._lock:
            scan = self.scan
            self.query = row
            if row is None:
                self.colours = to_uint8(self.sources[self.source].pca().rgb(scan.features))
                self.server.scene.add_icosphere(
                    "/query", radius=self.cfg.point_size * 2, color=(0, 0, 0), visible=False
                )
                self.info.content = (
                    f"**{scan.scan_id}**: {len(scan.xyz):,} points, {scan.source}, PCA colours. Click a point."
                    + (f"  \n*{scan.note}*" if scan.note else "")
                )
            else:
                similarity = cosine_to(scan.features, row)
                self.colours = to_uint8(similarity_rgb(similarity))
                self.server.scene.add_icosphere(
                    "/query", radius=self.cfg.point_size * 2, color=(0, 0, 0), position=tuple(scan.xyz[row].tolist())
                )
                camera = scan.camera_of(row)
                if (
                    camera is not None
                    and camera.image is not None
                    and self.camera_box.value not in self._cameras_seeing(row)
                ):
                    self._set(self.camera_box, value=camera.name)
                self.info.content = (
                    f"**{scan.scan_id}**, {scan.source}  \nquery: {scan.describe(row)}  \n"
                    f"cosine similarity to its feature (centred): blue -1, grey 0, red +1; "
                    f"{np.mean(similarity > 0.5):.1%} of the points above 0.5"
                )
            self.cloud.colors = self.colours
            self._draw_image()

    def _cameras_seeing(self, row: int) -> list[str]:
        return [c.name for c in self.scan.cameras if np.any(c.rows == row)]

    def _draw_image(self) -> None:
        with self._lock:
            camera = next(
                (c for c in self.scan.cameras if c.name == self.camera_box.value and c.image is not None), None
            )
            self.image_panel.visible = camera is not None
            if camera is None:
                self.image = None
                return
            self.image = splat(camera.image, camera.pixels, self.colours[camera.rows], self.cfg.image_width)
            if self.query is not None and np.any(camera.rows == self.query):
                scale = self.image.shape[1] / camera.image.shape[1]
                mark(self.image, camera.pixels[np.flatnonzero(camera.rows == self.query)[0]], scale)
            self.image_panel.image = self.image
            self.image_panel.label = f"{camera.name}: {len(camera.rows):,} points"

    def click(self, origin, direction) -> int | None:
        """A click in the 3D view: select the first point its ray meets."""
        with self._lock:
            row = nearest_on_ray(self.scan.xyz, origin, direction, self.cfg.point_size)
            if row is None:
                self.info.content = "no point under the click; click a point"
            else:
                self.select(row)
            return row

    def look_at(self, row: int, height: float = 14.0) -> None:
        """Point every browser's camera at a row from above (what a test aims a click with)."""
        target = self.scan.xyz[row].astype(float)
        for client in self.server.get_clients().values():
            with client.atomic():
                client.camera.position = tuple(target + np.array([-0.5, 0.0, height]))
                client.camera.look_at = tuple(target)

    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.server.get_port()}"

    def close(self) -> None:
        self.server.stop()


def exposure_warning(host: str) -> str | None:
    """What binding to `host` exposes, when it is more than this machine."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        loopback = False
    if loopback:
        return None
    return (
        f"WARNING: serving on {host}: anyone who can reach this machine's port can see the store's features and "
        "images (the viewer has no login). Prefer the default 127.0.0.1 and an ssh tunnel (ssh -L)."
    )


def serve(cfg: ViewConfig) -> None:
    """Serve until interrupted (Ctrl-C)."""
    if warning := exposure_warning(cfg.host):
        print(warning, file=sys.stderr, flush=True)
    viewer = FeatureViewer(cfg)
    print(
        f"scalr view: {viewer.url()} (open it in a browser; from another machine: ssh -L "
        f"{cfg.port}:localhost:{cfg.port} <this host>). Ctrl-C stops.",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        viewer.close()
