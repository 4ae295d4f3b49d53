"""Total parsing of the datasets' index files: every value is read through a checker that names
the file, the record and the field, so a malformed file is a DatasetError, never a KeyError,
TypeError or crash deep in a reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.errors import DatasetError
from pipeline.files import read_regular

_MISSING = object()


def read_text(path: Path, what: str = "file") -> str:
    try:
        return read_regular(path, DatasetError).decode()
    except FileNotFoundError:
        raise DatasetError(path, f"{what} is missing") from None
    except UnicodeDecodeError:
        raise DatasetError(path, f"{what} is not text (binary or another encoding)") from None
    except OSError as err:
        raise DatasetError(path, f"{what} is unreadable ({err.strerror})") from None


def read_json(path: Path, what: str = "file"):
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise DatasetError(path, f"not valid JSON ({err})") from None


class Record:
    """One JSON object of a file; each accessor checks the field's presence and type."""

    def __init__(self, path: Path, what: str, value):
        self.path, self.what = Path(path), what
        if not isinstance(value, dict):
            raise DatasetError(path, f"{what} is a {type(value).__name__}, not a record (JSON object)")
        self.value = value

    def _get(self, key: str, default):
        if key in self.value:
            return self.value[key]
        if default is _MISSING:
            raise DatasetError(self.path, f"{self.what} has no field {key!r}")
        return default

    def _bad(self, key: str, value, expected: str) -> DatasetError:
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        return DatasetError(self.path, f"{self.what}: field {key!r} is {shown}, not {expected}")

    def str(self, key: str, default=_MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) and value is not default:
            raise self._bad(key, value, "a string")
        return value

    def int(self, key: str, default=_MISSING) -> int:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise self._bad(key, value, "an integer")
        return int(value)

    def number(self, key: str, default=_MISSING) -> float:
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(key, value, "a finite number")
        return float(value)

    def bool(self, key: str, default=_MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool) and value is not default:
            raise self._bad(key, value, "true or false")
        return value

    def array(self, key: str, shape: tuple[int, ...], default=_MISSING) -> np.ndarray:
        """A nested list of finite numbers of exactly `shape`, as float64."""
        value = self._get(key, default)
        if value is default:
            return value
        try:
            out = np.array(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise self._bad(key, value, f"numbers of shape {shape}") from None
        if out.shape != shape or not np.isfinite(out).all():
            raise self._bad(key, value, f"finite numbers of shape {shape}")
        return out

    def record(self, key: str) -> Record:
        return Record(self.path, f"{self.what}, field {key!r},", self._get(key, _MISSING))


def records(path: Path, value, what: str) -> list[Record]:
    """A JSON list of objects (a nuScenes table, a PandaSet poses.json) as checked records."""
    if not isinstance(value, list):
        raise DatasetError(path, f"{what} is a {type(value).__name__}, not a list of records")
    return [Record(path, f"{what} record {i}", row) for i, row in enumerate(value)]
