"""scalr's user errors: what the user gave (a file, an option, a name) cannot be used as asked.

The command line prints a `ScalrError` as one line naming the file or option and the problem and
exits with 1; any other exception is a bug in scalr and keeps its traceback. Every error type keeps
its constructor's arguments in `args`, so it pickles: an error raised in a DataLoader worker reaches
the main process as itself (stages/runtime.Loader), never as text to be parsed.
"""

from __future__ import annotations

from pathlib import Path


class ScalrError(Exception):
    """Base of every user error."""


class PathError(ScalrError):
    """A file or folder that cannot be used; `str()` reads "<path>: <problem>"."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(str(path), problem)
        self.path, self.problem = str(path), problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class DatasetError(PathError):
    """Bad or missing input data."""


class ConfigError(ScalrError, ValueError):
    """An option or config value that cannot be used: unknown name, out of range, in conflict."""


class NotFoundError(ScalrError, KeyError):
    """A thing named by the user (scan, camera, entry, point, class, run) that is not there."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""
