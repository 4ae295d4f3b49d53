"""The one error type for bad input: it always names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class DatasetError(Exception):
    """Bad or missing input data. `str()` reads "<path>: <problem>"."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
