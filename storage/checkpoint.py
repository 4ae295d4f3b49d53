"""Checkpoints and run records: written atomically, read strictly.

A checkpoint is a dict with at least `model` (a state dict of tensors) and `config` (the run
record: stage, resolved config, dataset ...). Anything else, a truncated file, or weights that
do not fit the recorded model is a `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PathError
from storage.atomic import write_atomically


class CheckpointError(PathError, ValueError):
    """An unusable checkpoint file; `str()` reads "<path>: <problem>"."""


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename (storage/atomic.py): a crash never leaves half a
    checkpoint, and a full disk is one line."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through Python's file: a full disk is an OSError, not torch's stream error
            torch.save(state, f)

    write_atomically(Path(path), write)


def read_checkpoint_file(path: Path) -> dict:
    """The dict a checkpoint file holds, whatever wrote it; CheckpointError for anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "checkpoint file is missing")
    if not path.is_file():
        raise CheckpointError(path, "is not a file (give the checkpoint file, e.g. RUN/checkpoints/last.pt)")
    try:
        # weights_only: tensors, dicts, lists and plain values only; never runs a pickled object
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(path, f"not a readable checkpoint ({load_problem(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_problem(err: Exception) -> str:
    """What torch.load(weights_only=True) found wrong with a file, in one line: objects it refuses
    to build (a file that would run code, or hold more than tensors, containers and numbers), or
    a truncated, corrupt or foreign file."""
    text = str(err)
    if "Weights only load failed" in text or "weights_only=True blocked" in text:  # torch's, timm's words
        found = re.search(r"GLOBAL ([\w.]+)|Unsupported globals: ([\w.]+)|(Unsupported operand \d+)", text)
        what = next((g for g in found.groups() if g), "") if found else ""
        what = f"the object {what}" if "." in what else what or "objects other than tensors, containers and numbers"
        return f"refused: it needs {what} to load; scalr loads tensors only and never runs code from a file"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"truncated, corrupt or not written by torch.save: {first[:200]}"


def load_checkpoint(path: Path, state: dict | None = None) -> dict:
    """The checkpoint dict (read from `path` unless given), checked to hold a state dict of
    tensors and a run record."""
    state = read_checkpoint_file(path) if state is None else state
    model, record = state.get("model"), state.get("config")
    if not isinstance(model, dict) or not model or not all(torch.is_tensor(v) for v in model.values()):
        raise CheckpointError(path, "has no 'model' state dict of tensors; not a scalr checkpoint")
    if not isinstance(record, dict):
        raise CheckpointError(path, "has no run record ('config'); not a scalr checkpoint")
    return state


def load_weights(path: Path, module: nn.Module, weights: dict, what: str) -> None:
    """Strict load; a mismatch names the file and the first offending tensor."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        if wrong:
            first = f"{wrong[0]} is {tuple(weights[wrong[0]].shape)}, the model's is {tuple(expected[wrong[0]].shape)}"
        elif missing:
            first = f"{missing[0]} is missing"
        else:
            first = f"{unexpected[0]} is not in the model"
        counts = f"{len(wrong)} of another shape, {len(missing)} missing, {len(unexpected)} unexpected"
        raise CheckpointError(path, f"weights do not fit {what} ({counts}; first: {first})")
    module.load_state_dict(weights, strict=True)


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str) + "\n"
    write_atomically(Path(path), lambda tmp: tmp.write_text(text))
