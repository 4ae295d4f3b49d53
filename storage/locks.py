"""Exclusive locks that die with their holder: one writer per part of a store, one trainer per run.

A lock is an open file with an exclusive `flock`: the kernel releases it when the process ends,
however it ends (kill -9 included), so a dead writer's lock is free at once and nothing stale is
left to clean. The file says who holds it (host, pid, since when) for the messages of whoever
waits. On NFS, Linux maps flock to the server's byte-range locks (NFSv4), so writers on several
machines exclude each other too.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path


class Lock:
    """A held lock; `release()` (or the process's end) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_lock(path: Path, wait: bool = False) -> Lock | None:
    """The lock on `path` (created if absent), or None when another process holds it; `wait`
    blocks until it is free instead."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return Lock(path, fd)


def holder(path: Path) -> str:
    """Who holds (or last held) the lock on `path`: "HOST pid PID since TIME"."""
    try:
        return Path(path).read_text().strip() or "another process"
    except OSError:
        return "another process"
