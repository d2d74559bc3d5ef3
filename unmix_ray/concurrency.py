"""Per-node coordination for data work: an exclusive file lock between processes, and a thread pool
that runs a function over items and re-raises the first error."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@contextmanager
def file_lock(path: Path, timeout_s: float | None = None, what: str = "") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed); wait for it, logging once. A process
    that dies releases it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not logged:
                    log.info("waiting for another process on this node (%s; lock %s)", what or "busy", path)
                    logged = True
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"waited {timeout_s:.0f} s for the lock {path}") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def run_parallel(fn: Callable[[T], None], items: Iterable[T], workers: int) -> None:
    """``fn(item)`` for every item on ``workers`` threads (in this thread when there is one worker or
    one item); the first exception is raised once all have run."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(fn, it) for it in items]:
            f.result()
