"""Reading a file that must be a regular file: a pipe, a device or a folder under a data file's name
would block a reader forever or read garbage, so it is refused, checked on the open descriptor."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pipeline.errors import PathError


def read_regular(path: str | Path, error: type[PathError] = PathError) -> bytes:
    """The bytes of `path`; FileNotFoundError when absent, `error` when it is not a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a pipe opens at once instead of waiting for a writer
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(path, "not a regular file (a pipe, device or folder): refused")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def check_regular(path: str | Path, error: type[PathError] = PathError) -> None:
    """Refuse `path` unless it is a regular file (or absent: the reader says so), for readers that
    open it themselves (images: only their header is read)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISREG(mode):
        raise error(path, "not a regular file (a pipe, device or folder): refused")
