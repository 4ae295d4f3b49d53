"""The built-in synthetic driving datasets, written in the real datasets' on-disk formats."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from pipeline.errors import ConfigError, PathError
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


MARKER = ".scalr-synth.json"  # in every synthetic root: what wrote it, so --overwrite knows it is scalr's


def generate(fmt: str, out: str | Path, cfg: SynthConfig | None = None, progress=None, overwrite: bool = False) -> dict:
    """Write a synthetic dataset in format `fmt` into the new or empty folder `out`; returns a
    summary of what was written. `overwrite` first removes an earlier synthetic dataset there (one
    that scalr wrote, never other files): a root is never a mix of two runs."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown synthetic format {fmt!r}; one of {', '.join(FORMATS)}")
    cfg = resolve(fmt, cfg or SynthConfig())
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise PathError(out, "is not empty and not a scalr synthetic dataset; write into a new or empty folder")
        if not overwrite:
            raise PathError(
                out, "holds a synthetic dataset already; pass --overwrite to replace it, or use another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    try:  # created exclusively: of two runs started into one empty folder, the second is refused
        with open(out / MARKER, "x") as marker:
            marker.write(json.dumps({"format": fmt, "config": dataclasses.asdict(cfg)}, indent=2))
    except FileExistsError:
        raise PathError(out, "another scalr synth is writing here; use another --out") from None
    return FORMATS[fmt].write(out, cfg, progress)


__all__ = ["FORMATS", "MARKER", "SynthConfig", "generate", "resolve"]
