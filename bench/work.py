"""The work the benchmarks send to runners and workers: small top-level functions.

They live in an importable module of their own so that every system under test (flame's
runners, ProcessPoolExecutor, loky, Ray and Dask workers) pickles them by reference and
imports this module on the other side. Importing it is cheap: NumPy is imported only by
the functions that build or measure arrays.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def noop() -> int:
    return 1


def noop_arg(x: int) -> int:
    return x


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def make_payload(kind: str, size: int) -> Any:
    """A payload of ``size`` bytes: ``bytes``, or a float64 NumPy array (``size // 8`` items)."""
    if kind == "bytes":
        return b"\x5a" * size
    if kind == "ndarray":
        import numpy as np

        return np.full(size // 8, 1.5, dtype=np.float64)
    raise ValueError(f"unknown payload kind {kind!r}")


def payload_size(payload: Any) -> int:
    """The size in bytes of a payload made by :func:`make_payload` (``len`` or ``nbytes``)."""
    if isinstance(payload, bytes | bytearray):
        return len(payload)
    return int(payload.nbytes)


def pid_after(seconds: float) -> int:
    """Sleep, then return this process's pid: calls of it made together land on distinct
    runners (the least busy one takes each), so a caller can learn every runner's pid."""
    time.sleep(seconds)
    return os.getpid()


_counted = 0
_count_lock = threading.Lock()


def count_one() -> None:
    """Count one call in this process (see :func:`counted_after`)."""
    global _counted
    with _count_lock:
        _counted += 1


def counted_after(seconds: float) -> tuple[int, int]:
    """Sleep, then return this process's pid and how many :func:`count_one` calls it ran."""
    time.sleep(seconds)
    with _count_lock:
        return os.getpid(), _counted


_released = threading.Event()


def hold_until_released(limit: float = 300.0) -> bool:
    """Block until :func:`release_held` is called in this process (in-process runners
    only: a ``LocalBackend`` pool shares this module's event with its caller)."""
    return _released.wait(limit)


def release_held() -> None:
    _released.set()
