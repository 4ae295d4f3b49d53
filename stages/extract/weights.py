"""A teacher's weights: where they come from (a local file, a folder of documented file names, or by
name from the standard Hugging Face cache), their provenance computed once, and strict loading.

`resolve_weights` finds the file and hashes it once; the `TeacherWeights` it returns travels with
the extraction (to the store's attributes, to every rank and dask worker), so a ViT-g file is
hashed once per extraction, not once per reader. Random initialisation is explicit and recorded.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import timm
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from timm.models import load_state_dict
from torch import nn

from pipeline.errors import ScalrError
from stages.extract.registry import TeacherSpec
from storage.checkpoint import load_problem

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold, preferred first


class WeightsError(ScalrError):
    """A missing or unusable weights file; the message names it and where such weights come from."""


@dataclass(frozen=True)
class TeacherWeights:
    """A teacher's weights, resolved and hashed once: a file, or an explicit random initialisation."""

    path: Path | None  # None: random initialisation
    seed: int = 0  # of the random initialisation
    sha256: str | None = None  # of the file
    hub: dict | None = None  # {repo, revision, file} when the file lies in a Hugging Face cache snapshot

    @property
    def random_init(self) -> bool:
        return self.path is None

    @property
    def label(self) -> str:
        """What a store records as the teacher's weights: the file's SHA-256 or the random-init seed."""
        return f"random-init seed {self.seed}" if self.path is None else self.sha256


def resolve_weights(
    spec: TeacherSpec, weights: Path | None, weights_dir: Path | None, random_init: bool, seed: int = 0
) -> TeacherWeights:
    """The weights to load: the given file, the documented file in `weights_dir`, by name from the
    Hugging Face cache, or (`random_init`) none."""
    if random_init:
        if weights or weights_dir:
            raise WeightsError("--random-init and --weights/--weights-dir exclude each other")
        return TeacherWeights(None, seed)
    if spec.random_init_only:
        raise WeightsError(f"teacher {spec.name} has no pretrained weights: pass --random-init")
    if weights is None and weights_dir is None:
        path = hub_weights(spec)
    else:
        path = Path(weights) if weights else Path(weights_dir) / spec.weights_file
        if not path.is_file():
            raise WeightsError(
                f"{path}: weights file for teacher {spec.name} is missing; such weights: {spec.weights_source}"
            )
    return TeacherWeights(path, sha256=sha256_file(path), hub=hub_provenance(path))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hub_weights(spec: TeacherSpec) -> Path:
    """The teacher's pretrained weights from the standard Hugging Face cache (timm's repository of
    its architecture), downloaded into the cache first when online. Offline and absent: one line
    naming the repository and file and the two ways to provide them."""
    cfg = timm.get_pretrained_cfg(spec.timm_name)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise WeightsError(
            f"teacher {spec.name} has no Hugging Face repository in timm's registry: pass --weights FILE or "
            f"--weights-dir DIR (holding {spec.weights_file}); such weights: {spec.weights_source}"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
    files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else HUB_FILES
    for filename in files:
        try:
            cache = os.environ.get("HF_HUB_CACHE") or None
            return Path(hf_hub_download(repo, filename, cache_dir=cache, local_files_only=offline))
        except (LocalEntryNotFoundError, EntryNotFoundError):
            continue
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise WeightsError(
                f"teacher {spec.name}: cannot fetch {repo}/{filename} from the Hugging Face Hub "
                f"({str(err).splitlines()[0][:200]}); pass --weights FILE or --weights-dir DIR"
            ) from None
    where = "not in the Hugging Face cache (offline: HF_HUB_OFFLINE=1)" if offline else "not on the Hugging Face Hub"
    raise WeightsError(
        f"teacher {spec.name}: weights {where}: repository {repo}, file {files[0]}. Provide them either in the cache "
        f"(online once: huggingface-cli download {repo} {files[0]}) or as a local file (--weights FILE, or "
        f"--weights-dir DIR holding {spec.weights_file}; {spec.weights_source})"
    )


def hub_provenance(path: Path | None) -> dict | None:
    """{repo, revision, file} when `path` lies in a Hugging Face cache snapshot, else None."""
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]+)/(.+)$", str(path)) if path else None
    return {"repo": f"{m[1]}/{m[2]}", "revision": m[3], "file": m[4]} if m else None


def load_weights(model: nn.Module, spec: TeacherSpec, path: Path) -> None:
    """Load a local checkpoint through timm's converters (original DINO/DINOv2/MAE/CLIP releases
    or timm state dicts; position embeddings resized to the model's grid), strictly: only the
    classifier, unused for dense features, may be absent or extra. Files are read as safetensors or
    with torch's weights-only unpickler (tensors, containers and numbers): a file that would need
    any other object is refused, so no code in a weights file ever runs."""
    failures = (RuntimeError, KeyError, ValueError, OSError, EOFError, AttributeError, pickle.UnpicklingError)
    # the converter of the model's own timm module (vision_transformer.py, eva.py for DINOv3)
    checkpoint_filter_fn = importlib.import_module(type(model).__module__).checkpoint_filter_fn
    try:
        state = checkpoint_filter_fn(load_state_dict(str(path), weights_only=True), model)
        result = model.load_state_dict(state, strict=False)
    except failures as err:
        raise WeightsError(f"{path}: cannot load as {spec.name} ({spec.timm_name}): {load_problem(err)}") from None

    def unused(key: str) -> bool:  # classifier parts; MaskCLIP needs its head (the visual projection)
        return key.startswith("fc_norm.") or (key.startswith("head.") and spec.dense != "maskclip-value")

    missing = [k for k in result.missing_keys if not unused(k)]
    unexpected = [k for k in result.unexpected_keys if not unused(k)]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: not {spec.name} weights ({spec.timm_name}): {len(missing)} missing tensors {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}; such weights: {spec.weights_source}"
        )
