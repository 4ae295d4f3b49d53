"""Training samples for the student, read from feature stores only (no teacher, no images, no raw
dataset): a scan, one of its cameras at random (each epoch anew), that entry's points and
targets, then voxelisation, crop, augmentation and the student's inputs.

Stores of the same dataset and split (one per teacher) are joined on (scan, camera) and their
targets concatenated; stores of different datasets are concatenated into one training set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.datasets import READERS
from pipeline.errors import ConfigError
from pipeline.transforms import Augment, Grid, crop_nearest, knn, student_features, voxel_downsample
from storage.feature_store import FeatureStore
from storage.layout import JOIN_KEYS, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleConfig:
    voxel: float = 0.1  # metres; one random point per voxel
    max_points: int = 20000  # the nearest to a random point
    augment: Augment = field(default_factory=Augment)
    grid: Grid = field(default_factory=Grid)
    neighbours: int = 16


@dataclass(frozen=True)
class _Scan:
    group: int  # index of the dataset group
    scan_id: str
    entries: tuple[
        tuple[str, tuple[tuple[int, int, int, int], ...]], ...
    ]  # (camera, ((part, offset, count, grid) per store))


class StoreGroup:
    """The stores of one dataset split, one per teacher, joined on (scan, camera)."""

    def __init__(self, stores: list[FeatureStore]):
        first = stores[0]
        for other in stores[1:]:
            for key in JOIN_KEYS:
                if first.attrs.get(key) != other.attrs.get(key):
                    raise StoreError(
                        f"{other.path}: cannot be joined with {first.path}: {key} differs ({other.attrs.get(key)} "
                        f"vs {first.attrs.get(key)})"
                    )
        self.stores = stores
        self.dataset = first.attrs["dataset"]
        self.teachers = [s.attrs["teacher"]["name"] for s in stores]
        for a, b in zip(stores, stores[1:]):  # sorted by teacher name: a repeated teacher is adjacent
            if a.attrs["teacher"]["name"] == b.attrs["teacher"]["name"]:
                same = (
                    "the same weights"
                    if a.attrs["teacher"]["weights"] == b.attrs["teacher"]["weights"]
                    else "other weights"
                )
                raise StoreError(
                    f"{b.path}: teacher {b.attrs['teacher']['name']} of {a.path} again ({same}) for the same data; "
                    "a joined target has each teacher once"
                )
        self.dims = [s.attrs["teacher"]["dim"] for s in stores]
        self.intensity_norm = intensity_norm(first)
        manifests = [s.manifest().to_pylist() for s in stores]
        keys = [[(r["scan_id"], r["camera"], r["count"], r["status"]) for r in m] for m in manifests]
        for store, k in zip(stores[1:], keys[1:]):
            if k != keys[0]:
                raise StoreError(
                    f"{store.path}: its entries (scans, cameras, point counts) differ from {first.path}; stores "
                    "to join must be extracted from the same data"
                )
        self.by_scan: dict[str, list[tuple[str, tuple]]] = {}
        for rows in zip(*manifests):
            r = rows[0]
            if r["status"] == "ok" and r["count"] > 0:
                self.by_scan.setdefault(r["scan_id"], []).append(
                    (r["camera"], tuple((x["part"], x["offset"], x["count"], x["grid"]) for x in rows))
                )
        rows = manifests[0]
        scans = {r["scan_id"] for r in rows}
        empty = sorted({r["scan_id"] for r in rows if r["status"] == "ok" and r["scan_points"] == 0})
        skipped = sorted({r["scan_id"] for r in rows if r["status"] == "skipped"} - set(self.by_scan) - set(empty))
        unseen = len(scans - set(self.by_scan) - set(empty) - set(skipped))
        for count, what, ids in (
            (len(empty), "have zero points", empty),
            (len(skipped), "were skipped at extraction (see `scalr inspect`)", skipped),
            (unseen, "have no point visible in any camera", []),
        ):
            if count:
                log.warning(
                    "%s: %d of %d scans %s and are not trained on%s",
                    first.path,
                    count,
                    len(scans),
                    what,
                    f" ({', '.join(ids[:5])}{' ...' if count > 5 else ''})" if ids else "",
                )

    @property
    def name(self) -> str:
        return f"{self.dataset['name']}/{self.dataset['split']}"

    def read_points(self, entry: str, locations: tuple) -> dict[str, np.ndarray]:
        """The per-point arrays of one (scan, camera) `entry` from the first store, checked to be
        the same points in every store of the group."""
        first = self.stores[0].read_points(*locations[0][:3])
        for store, loc in zip(self.stores[1:], locations[1:]):
            if not np.array_equal(
                store.read_points(*loc[:3], names=("point_index",))["point_index"], first["point_index"]
            ):
                raise StoreError(f"{store.path}: points of {entry} differ from {self.stores[0].path}")
        return first

    def read_targets(self, locations: tuple, rows: np.ndarray, pixel: np.ndarray) -> np.ndarray:
        """The joined target (every store's, concatenated) of some `rows` of one entry whose pixels
        are `pixel`; a grid-layout store samples just those rows."""
        return np.concatenate(
            [s.read_targets(*loc, rows, pixel[rows]) for s, loc in zip(self.stores, locations)], axis=1
        )


def intensity_norm(store: FeatureStore) -> tuple[float, float]:
    """(mean, std) standardising the store's raw intensities for the student, as recorded in it.
    Stores of scalr 0.2.0 and before record the range only: their dataset's released statistics."""
    recorded = store.attrs.get("intensity")
    if recorded is not None:
        return recorded["mean"], recorded["std"]
    return READERS[store.attrs["dataset"]["name"]].meta.intensity_norm


def group_stores(paths: list[Path]) -> list[StoreGroup]:
    """Stores grouped by dataset split (same scan ids); groups must have the same teachers. A store
    given twice, or two stores of one teacher for the same data, is refused."""
    seen: dict[Path, Path] = {}
    for p in paths:
        if Path(p).resolve() in seen:
            raise StoreError(f"{p}: given twice (as {seen[Path(p).resolve()]} too); give each store once")
        seen[Path(p).resolve()] = p
    stores = [FeatureStore(p) for p in paths]
    by_data: dict[str, list[FeatureStore]] = {}
    for s in stores:  # name, split and scan ids: PandaSet's two lidars share scan ids, not names
        by_data.setdefault(json.dumps(s.attrs["dataset"], sort_keys=True), []).append(s)
    groups = [StoreGroup(sorted(g, key=lambda s: s.attrs["teacher"]["name"])) for g in by_data.values()]
    for g in groups[1:]:
        if g.teachers != groups[0].teachers or g.dims != groups[0].dims:
            raise StoreError(
                f"{g.stores[0].path}: dataset {g.name} has teachers {g.teachers}, but {groups[0].name} has "
                f"{groups[0].teachers}; every dataset needs the same teachers"
            )
    return groups


class DistillationData(torch.utils.data.Dataset):
    """Items are keyed by (scan index, sample seed): the sample is a pure function of both."""

    def __init__(self, store_paths: list[Path], cfg: SampleConfig):
        self.cfg = cfg
        self.groups = group_stores([Path(p) for p in store_paths])
        self.scans = [
            _Scan(g, scan_id, tuple(entries))
            for g, group in enumerate(self.groups)
            for scan_id, entries in group.by_scan.items()
        ]
        if not self.scans:
            raise StoreError(f"{store_paths[0]}: no scan with visible points to train on")
        self.sizes = [sum(s.group == g for s in self.scans) for g in range(len(self.groups))]
        self.target_dim = sum(self.groups[0].dims)

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        scan = self.scans[index]
        group = self.groups[scan.group]
        rng = np.random.default_rng(seed)
        camera, locations = scan.entries[rng.integers(len(scan.entries))]
        first = group.read_points(f"{scan.scan_id}/{camera}", locations)
        keep, inputs = student_inputs(first["points"], group.intensity_norm, self.cfg, rng, train=True)
        return {
            **inputs,
            "targets": group.read_targets(locations, keep, first["pixel"]),
            "point_index": first["point_index"][keep],
            "scan_id": scan.scan_id,
            "camera": camera,
            "dataset": group.name,
        }


def student_inputs(
    points: np.ndarray, intensity_norm: tuple[float, float], cfg: SampleConfig, rng: np.random.Generator, train: bool
) -> tuple[np.ndarray, dict]:
    """(kept point indices, student inputs) of a cloud: voxelise; when training, also crop to the
    nearest `max_points` and augment; keep the field of view; 5 input channels (intensity
    standardised with `intensity_norm` = (mean, std)), cells, k-NN."""
    keep = voxel_downsample(
        points[:, :3], cfg.voxel, rng if train else None
    )  # evaluation: the first point of each voxel
    if train:
        keep = keep[crop_nearest(points[keep, :3], cfg.max_points, rng)]
    if train and cfg.augment.separate_features:  # downstream: inputs of the original points, augmented apart
        xyz, feats = cfg.augment.apart(
            points[keep, :3], student_features(points[keep, :3], points[keep, 3], intensity_norm), rng
        )
    else:
        xyz = cfg.augment(points[keep, :3], rng) if train else points[keep, :3]
        feats = student_features(xyz, points[keep, 3], intensity_norm)
    inside = cfg.grid.inside(xyz)
    keep, xyz, feats = keep[inside], xyz[inside], feats[inside]
    return keep, {
        "feats": feats.astype(np.float32),  # the network's inputs: float32, as the released collate
        "cells": cfg.grid.cells(xyz),
        "neighbours": knn(xyz, cfg.neighbours),
    }


def collate(samples: list[dict]) -> dict:
    """Pack samples into one batch: points concatenated, neighbour indices offset, sample ids;
    per-point `targets` (distillation) or `labels` (segmentation) concatenated when present."""
    offsets = np.cumsum([0] + [len(s["feats"]) for s in samples])
    batch = {
        "feats": torch.from_numpy(np.concatenate([s["feats"] for s in samples])),
        "cells": torch.from_numpy(np.concatenate([s["cells"] for s in samples])),
        "neighbours": torch.from_numpy(np.concatenate([s["neighbours"] + o for s, o in zip(samples, offsets)])),
        "batch": torch.from_numpy(np.repeat(np.arange(len(samples)), np.diff(offsets))),
        "batch_size": len(samples),
        "scan_ids": [s["scan_id"] for s in samples],
    }
    for key in ("targets", "labels"):
        if key in samples[0]:
            batch[key] = torch.from_numpy(np.concatenate([s[key] for s in samples]))
    return batch


class EpochSampler:
    """Deterministic batches of (index, sample seed) for each epoch, sharded over ranks.

    Epoch e shuffles all scans uniformly (datasets sampled in proportion to their size), or, when
    `balanced`, draws each sample's dataset uniformly. A global batch of `batch_size` is split
    across `world` ranks. `start(epoch, batch)` resumes mid-epoch exactly."""

    def __init__(
        self, sizes: list[int], batch_size: int, seed: int, rank: int = 0, world: int = 1, balanced: bool = False
    ):
        if batch_size % world:
            raise ConfigError(f"global batch size {batch_size} is not divisible by {world} ranks")
        total = sum(sizes)
        if total < batch_size:
            raise ConfigError(f"{total} training scans cannot fill one batch of {batch_size}")
        self.sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.rank, self.world, self.balanced = rank, world, balanced
        self.epoch, self.first_batch = 0, 0

    def __len__(self) -> int:
        return sum(self.sizes) // self.batch_size

    def start(self, epoch: int, first_batch: int = 0) -> EpochSampler:
        self.epoch, self.first_batch = epoch, first_batch
        return self

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if not self.balanced:
            return rng.permutation(sum(self.sizes))
        starts = np.cumsum([0] + self.sizes[:-1])
        groups = rng.integers(len(self.sizes), size=sum(self.sizes))
        return np.array([starts[g] + rng.integers(self.sizes[g]) for g in groups])

    def __iter__(self):
        order = self.order(self.epoch)
        for b in range(self.first_batch, len(self)):  # this rank's share of global batch b
            positions = range(b * self.batch_size + self.rank, (b + 1) * self.batch_size, self.world)
            yield [(int(order[p]), _seed(self.seed, self.epoch, p)) for p in positions]


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")
