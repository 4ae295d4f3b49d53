"""The built-in synthetic driving datasets, written in the real datasets' on-disk formats."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.synth import nuscenes_format, pandaset_format, semantickitti_format, semanticposs_format
from pipeline.synth.rig import SynthConfig

FORMATS = {
    "nuscenes": nuscenes_format,
    "semantickitti": semantickitti_format,
    "pandaset": pandaset_format,
    "semanticposs": semanticposs_format,
}


def resolve(fmt: str, cfg: SynthConfig) -> SynthConfig:
    """`cfg` with every unset (None) field taken from the format's defaults."""
    defaults = FORMATS[fmt].DEFAULTS
    return dataclasses.replace(
        cfg, **{f.name: getattr(defaults, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is None}
    )


def generate(fmt: str, out: str | Path, cfg: SynthConfig | None = None, progress=None) -> dict:
    """Write a synthetic dataset in format `fmt` under `out`; returns a summary of what was written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown synthetic format {fmt!r}; one of {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return FORMATS[fmt].write(out, resolve(fmt, cfg or SynthConfig()), progress)


__all__ = ["FORMATS", "SynthConfig", "generate", "resolve"]
