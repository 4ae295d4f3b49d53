"""The one reader of student checkpoints: scalr's own (a state dict and its run record) or the
released ScaLR code's (converted in memory, see released.py), the student configuration its record
holds (refused when it was trained on other inputs), its backbone on a given grid, and conversion
between the two formats (`scalr convert`).

Every command that takes a `--checkpoint` comes here: probe, finetune, evaluate, embed, the
pictures and the viewer; training resumes check the same inputs version.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import ConfigError
from stages.student.released import (
    architecture,
    from_released,
    released_key,
    released_recipe,
    released_record,
    to_released,
)
from stages.student.waffleiron import STUDENT_INPUTS, WaffleIron, WaffleIronConfig
from storage.checkpoint import CheckpointError, load_checkpoint, load_weights, read_checkpoint_file, save_checkpoint

log = logging.getLogger(__name__)

SEGMENTER_STAGES = ("probe", "finetune", "scratch", "released-segmenter")  # run records of segmentation models


def read_student_checkpoint(path: Path, recipe: str | None = None) -> dict:
    """A scalr checkpoint dict (`model`, `config`) from a scalr or a released-format file. A
    released one is converted in memory, with the architecture its tensors show and the activation
    of the recipe that made it (what the file shows, else `recipe`, else cvpr); its record says so
    ("stage": "released-...", "recipe_source"). Whether that recipe is the one asked for is the
    caller's check (`check_recipe_of`)."""
    path = Path(path)
    state = read_checkpoint_file(path)
    key = released_key(state)
    if key is None:
        return load_checkpoint(path, state)
    raw = {_unprefixed(k): v for k, v in state[key].items()}
    made = released_recipe(raw, state, path, recipe)
    weights = from_released(raw, path)
    cfg, head = architecture(weights, path, made[0])
    log.info(
        "%s: released ScaLR checkpoint of the %s recipe (%s), WaffleIron depth %d, width %d, %s norm, %s, head %s",
        path,
        made[0],
        made[1],
        cfg.depth,
        cfg.width,
        cfg.norm,
        cfg.activation,
        head["kind"],
    )
    return {"model": weights, "config": released_record(cfg, head, path, state, made)}


def recipe_of(record: dict) -> str:
    """The recipe a run record (or a released file's record) was made with; cvpr before recipes."""
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    return config.get("recipe") or "cvpr"


def checkpoint_recipe(path: Path) -> str:
    """The recipe the checkpoint at `path` was made with (see `recipe_of`)."""
    return recipe_of(read_student_checkpoint(path)["config"])


def check_recipe_of(path: Path, record: dict, recipe: str, mixed: bool = False, what: str = "this run") -> None:
    """Refuse a checkpoint made with another recipe than `recipe` unless `mixed` (the caller
    records it): its student would be used with the other recipe's settings."""
    made = recipe_of(record)
    if made == recipe or mixed:
        return
    why = record.get("recipe_source") or "its run record"
    raise CheckpointError(
        path,
        f"made with the {made} recipe ({why}), but {what} follows {recipe}: leave --recipe out (the checkpoint's is "
        f"used) or pass --recipe {made}" + (", or --mixed-recipes on purpose" if what.endswith(" run") else ""),
    )


def read_checkpoint_for(path: Path, recipe: str | None, what: str, mixed: bool = False) -> dict:
    """`read_student_checkpoint` for `what` (e.g. "this evaluation"), which follows `recipe` (None:
    the checkpoint's own): a file made with another recipe is refused unless `mixed`."""
    state = read_student_checkpoint(path, recipe)
    if recipe is not None:
        check_recipe_of(path, state["config"], recipe, mixed, what)
    return state


def _unprefixed(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def inputs_problem(record: dict) -> str | None:
    """Why a run record's student does not fit this scalr's student inputs, or None."""
    model = record.get("config", {}).get("model") if isinstance(record.get("config"), dict) else None
    made = model.get("inputs", 1) if isinstance(model, dict) else 1
    if made == STUDENT_INPUTS:
        return None
    return (
        f"made with student inputs version {made} (16 neighbours including the point, 2-D radius, intensity / max); "
        f"this scalr gives the student inputs version {STUDENT_INPUTS} (the released ScaLR code's), so its "
        "weights would "
        "see inputs they were not trained on: pretrain again (feature stores hold raw points and are reused as "
        "they are)"
    )


def recorded_student(path: Path, record: dict, **overrides) -> WaffleIronConfig:
    """The student configuration a run record holds, with `overrides`; CheckpointError if there is
    none usable or it was trained on other inputs."""
    model_cfg = record.get("config", {}).get("model") if isinstance(record.get("config"), dict) else None
    if not isinstance(model_cfg, dict):
        raise CheckpointError(path, "no student configuration recorded; not a scalr checkpoint")
    if problem := inputs_problem(record):
        raise CheckpointError(path, problem)
    try:
        return WaffleIronConfig(**{**model_cfg, "grid_shape": tuple(model_cfg["grid_shape"]), **overrides})
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(path, f"recorded student configuration is unusable ({err})") from None


def build_backbone(
    path: Path, state: dict, grid_shape: tuple[int, int, int] | None = None, drop_path: float = 0.0
) -> WaffleIron:
    """The backbone of a checkpoint's `state` on `grid_shape` (its weights do not depend on the
    grid; None: the recorded one), loaded strictly."""
    overrides = (
        {"drop_path": drop_path} if grid_shape is None else {"drop_path": drop_path, "grid_shape": tuple(grid_shape)}
    )
    cfg = recorded_student(path, state["config"], **overrides)
    backbone = WaffleIron(cfg)
    weights = {k[len("backbone.") :]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    load_weights(path, backbone, weights, f"the recorded student (depth {cfg.depth}, width {cfg.width})")
    return backbone


def load_backbone(
    path: Path, grid_shape: tuple[int, int, int] | None = None, drop_path: float = 0.0, recipe: str | None = None
) -> tuple[WaffleIron, dict]:
    """(the backbone of the checkpoint at `path`, see `build_backbone`; its run record). `recipe`:
    what made a released file that does not show it (see `read_student_checkpoint`)."""
    state = read_student_checkpoint(path, recipe)
    return build_backbone(path, state, grid_shape, drop_path), state["config"]


def convert_checkpoint(src: Path, dst: Path, to: str = "auto", recipe: str | None = None) -> str:
    """Write `src` in the other format (or the one `to` names): a released checkpoint becomes a
    scalr checkpoint, a scalr one a released one (`model_points`, or `net` for a segmenter; the
    key and "module." prefix it came with). Returns the format written."""
    src, dst = Path(src), Path(dst)
    state = read_checkpoint_file(src)
    is_released = released_key(state) is not None
    target = ("scalr" if is_released else "released") if to == "auto" else to
    if target not in ("scalr", "released"):
        raise ConfigError(f"--to {to!r}: scalr, released or auto")
    if target == "scalr":
        if not is_released:
            raise CheckpointError(src, "is already a scalr checkpoint")
        save_checkpoint(dst, read_checkpoint_for(src, recipe, "this conversion"))
        return target
    if is_released:
        raise CheckpointError(src, "is already a released-format checkpoint")
    state = load_checkpoint(src, state)
    if inputs_problem(state["config"]):
        raise CheckpointError(
            src, "was trained on scalr's old student inputs; the released code would feed it other ones"
        )
    layout = state["config"].get("released_layout") or {}
    key = layout.get("key") or ("net" if state["config"].get("stage") in SEGMENTER_STAGES else "model_points")
    weights = to_released(state["model"], src)
    if layout.get("module_prefix"):
        weights = {f"module.{k}": v for k, v in weights.items()}
    save_checkpoint(dst, {key: weights})
    return target
