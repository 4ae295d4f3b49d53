"""Files written whole or not at all, and a disk that refuses said in one line.

A file is written under a temporary name beside it (`.NAME.tmp-HOST-PID`), then renamed over it: a
reader sees the old file or the new one, never half of one. A writer killed mid-write leaves its
temporary behind; the next writer of the same name removes the temporaries of processes of this
host that are gone. A full, read-only or forbidden disk is a PathError naming the path, never a
traceback, and nothing is committed half: rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.errors import PathError

HOST = socket.gethostname()
DISK_PROBLEMS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (the file system's or this process's limit)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a disk's refusal while writing under `path` into one line naming the file."""
    try:
        yield
    except Exception as failure:  # an OSError, or another error raised while handling one (torch.save's)
        err = disk_error_in(failure)
        if err is None:
            raise
        where = err.filename if isinstance(err.filename, str) else path
        raise PathError(
            where,
            f"{DISK_PROBLEMS[err.errno]}; nothing was committed half: rerun the same command once it can be written",
        ) from None


def disk_error_in(failure: BaseException | None) -> OSError | None:
    """The disk's refusal behind `failure` (itself, or the error it was raised while handling)."""
    while failure is not None:
        if isinstance(failure, OSError) and failure.errno in DISK_PROBLEMS:
            return failure
        failure = failure.__cause__ or failure.__context__
    return None


def temporary(path: Path) -> Path:
    """This process's temporary name for `path`."""
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of `path` left by processes of this host that no longer run (also those
    of scalr 0.2.0 and before, named `.NAME.tmp-PID`)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        owner = tmp.name[len(f".{path.name}.tmp-") :]
        host, _, pid = owner.rpartition("-")
        if (host or HOST) != HOST or not pid.isdigit() or alive(int(pid)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomically(path: Path, write: Callable[[Path], None], sync: bool = False) -> None:
    """`write(tmp)` then rename `tmp` over `path` (after an fsync with `sync`); a failure leaves
    `path` as it was and no temporary of this process."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = temporary(path)
        try:
            write(tmp)
            if sync:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
