"""What the teacher sees of a scan: each camera's image, decoded, checked against its calibration and
resized as the released code does, with the points visible in it and their pixels in the resized
image. `ScanImages` runs in DataLoader workers; bad input comes back as an error record, never as a
lost entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pipeline.datasets import LidarDataset
from pipeline.errors import DatasetError
from pipeline.files import check_regular
from pipeline.geometry import resize_pixels
from pipeline.scan import Camera
from pipeline.synth.pixel_classes import class_map_path, load_class_map

UNIT_FLOAT = (np.arange(256) / 255.0).astype(np.float32)  # uint8 -> float32(x / 255 in float64), as the released code


def load_resized(
    path: Path, calibrated_hw: tuple[int, int], size_hw: tuple[int, int], antialias: bool = False
) -> np.ndarray:
    """Decode an image, check it has the calibrated size, and resize it as the released code:
    float in [0, 1] (uint8 / 255 in float64, then float32, by lookup), bilinear with
    align_corners=False, `antialias` as the torchvision of the recipe. Returns (H, W, 3) float32."""
    check_regular(path, DatasetError)
    try:
        with Image.open(path) as img:
            if img.size != (calibrated_hw[1], calibrated_hw[0]):
                calibrated = f"{calibrated_hw[1]}x{calibrated_hw[0]}"
                raise DatasetError(
                    path, f"image is {img.size[0]}x{img.size[1]} but its calibration is for {calibrated}"
                )
            pixels = np.asarray(img.convert("RGB"))
        image = torch.from_numpy(UNIT_FLOAT[pixels]).permute(2, 0, 1)[None]
        resized = F.interpolate(image, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=antialias)
        return resized[0].permute(1, 2, 0).numpy()
    except FileNotFoundError:
        raise DatasetError(path, "image file is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(path, f"corrupt or unreadable image ({err})") from None


def load_class_map_resized(root: Path, camera: Camera, size_hw: tuple[int, int]) -> torch.Tensor:
    """A camera's class map (synthetic rigs), nearest-resized to `size_hw`: (1, H, W) uint8."""
    classes = load_class_map(root, camera.image_path)
    if classes.shape != tuple(camera.image_size):
        raise DatasetError(
            class_map_path(root, camera.image_path), f"class map is {classes.shape}, its image {camera.image_size}"
        )
    resized = F.interpolate(torch.from_numpy(classes)[None, None].float(), size=tuple(size_hw), mode="nearest")
    return resized[0].to(torch.uint8)


class ScanImages(torch.utils.data.Dataset):
    """One item per scan: its points, and per camera the resized image and the visible points'
    indices and pixels; an unreadable scan or image is an `error` (path, problem) in the item."""

    def __init__(
        self,
        ds: LidarDataset,
        indices: list[int],
        image_size: tuple[int, int],
        antialias: bool = False,
        inputs: str = "image",
        projection: str = "released",
    ):
        self.ds, self.indices, self.image_size, self.antialias = ds, indices, image_size, antialias
        self.inputs = inputs  # "image", or "class-map" (the oracle teacher: the synthetic rigs' class maps)
        self.float64 = projection == "float64"  # else rounded as the released code (nuScenes: float32 steps)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        item = {"scan_index": index, "scan_id": self.ds.scan_ids[index], "cameras": []}
        try:
            scan = self.ds[index]
        except DatasetError as err:
            return {**item, "error": (err.path, err.problem)}
        item.update(points=scan.points, scan_points=scan.num_points, inputs=self.ds.fingerprint(scan))
        for camera in scan.cameras:
            entry = {"camera": camera.name, "image_size": camera.image_size}
            try:
                image = self.teacher_input(camera)
            except DatasetError as err:
                item["cameras"].append({**entry, "error": (err.path, err.problem)})
                continue
            proj = self.ds.project(scan, camera.name, self.float64)
            entry["image"] = image
            entry["point_index"] = proj.point_index.astype(np.int32)
            entry["pixel"] = resize_pixels(proj.uv, camera.image_size, self.image_size)
            item["cameras"].append(entry)
        return item

    def teacher_input(self, camera: Camera) -> torch.Tensor:
        """What the teacher sees of a camera: its resized image (3, H, W), or its class map (1, H, W)."""
        if self.inputs == "class-map":
            return load_class_map_resized(self.ds.root, camera, self.image_size)
        image = load_resized(camera.image_path, camera.image_size, self.image_size, self.antialias)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous()
