"""Typed configs: dataclass defaults, presets, a user TOML file, then `--set key=value`.

`apply(cfg, {"optim.lr": 1e-3})` returns a new config; unknown keys are errors, values are
converted to the field's type. `to_dict(cfg)` is what gets written beside every output.
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
import typing
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.files import read_regular


def to_dict(cfg) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def parse_sets(items: list[str]) -> dict:
    """["a.b=3", "c=[1, 2]"] -> {"a.b": 3, "c": [1, 2]} (Python literals; bare words stay strings)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = text.strip()
    return out


def load_toml(path: Path) -> dict:
    """A TOML file's tables flattened to dotted keys."""
    try:
        data = tomllib.loads(read_regular(path).decode())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config ({err})") from None

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    return dict(flat(data))


def layered(cfg, config_file: Path | None, sets: list[str], flags: dict):
    """Defaults/preset `cfg`, then a TOML file, then --set items, then explicit CLI flags (None = unset)."""
    cfg = apply(cfg, load_toml(config_file) if config_file else {})
    cfg = apply(cfg, parse_sets(list(sets)))
    return apply(cfg, {k: v for k, v in flags.items() if v is not None})


def apply(cfg, overrides: dict):
    """A copy of dataclass `cfg` with dotted-key overrides applied (type-checked, converted)."""
    for key, value in overrides.items():
        cfg = _set(cfg, key.split("."), value, key)
    return cfg


def _set(obj, path: list[str], value, full_key: str):
    names = {f.name: f for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise ConfigError(f"unknown config key {full_key!r} (known here: {', '.join(names)})")
    field = names[path[0]]
    current = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full_key!r}: {path[0]} has no sub-keys")
        return dataclasses.replace(obj, **{path[0]: _set(current, path[1:], value, full_key)})
    hints = typing.get_type_hints(type(obj))
    return dataclasses.replace(obj, **{path[0]: _convert(value, hints.get(field.name), full_key)})


def _convert(value, hint, key):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is None or hint is typing.Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except (ValueError, TypeError):
                continue
        raise ConfigError(f"config key {key!r}: {value!r} does not fit {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key) for v in value)
        return tuple(_convert(v, a, key) for v, a in zip(value, args))
    if hint is Path:
        return Path(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"config key {key!r}: expected {hint.__name__}, got {value!r}")
    return value
