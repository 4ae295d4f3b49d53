"""Stage 1's writes run on one background thread, in order, overlapping the teacher: it does not
wait for a part's chunks to be compressed and written."""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor


def lower_priority(*_) -> None:
    """Let helpers (loader workers, the writer thread) yield to the teacher's compute threads:
    on a machine with few cores an OpenMP team slowed by one preempted thread costs more than
    the helper's own work. Linux applies this per thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class BackgroundWriter:
    """One thread running writes in submission order; at most `depth` pending, errors re-raised."""

    def __init__(self, depth: int = 8):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalr-writer", initializer=lower_priority)
        self.pending: deque = deque()
        self.depth = depth

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self.pending:
                    self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)
