"""Work that runs *on runners* in the pool, cast, child and map tests.

Functions and classes pickled by reference (a ProcessBackend runner imports this module
through the parent's ``sys.path``); they talk back to the test through files in a temporary
directory, since a runner is another process, and every wait in them is a short-sleep poll
so that a cancel (an exception raised in the worker thread) interrupts them promptly.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import flame


# -- work that runs on runners ---------------------------------------------------------------------
def mark(path: str, text: str) -> None:
    """Write a marker file atomically: whoever sees it exist also sees its content."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


_active_lock = threading.Lock()
_active = 0


def whoami() -> tuple[int, str | None]:
    """(pid, runner id) of the process running this."""
    p = flame.parent()
    return os.getpid(), (p.runner_id if p is not None else None)


def pid() -> int:
    return os.getpid()


def hold(seconds: float) -> tuple[int, int]:
    """Occupy a slot for ``seconds``; return (pid, calls running in this process at entry)."""
    global _active
    with _active_lock:
        _active += 1
        at_entry = _active
    try:
        _sleep(seconds)
    finally:
        with _active_lock:
            _active -= 1
    return os.getpid(), at_entry


def _sleep(seconds: float) -> None:
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.01))


def stamp(token: str, seconds: float = 0.0) -> tuple[str, float, int]:
    """Record when a call started (monotonic clock, shared by all processes on Linux)."""
    started = time.monotonic()
    _sleep(seconds)
    return token, started, os.getpid()


def gated(entered: str, gate: str, limit: float = 30.0) -> int:
    """Write our pid to ``entered``, then wait until the file ``gate`` exists."""
    mark(entered, str(os.getpid()))
    deadline = time.monotonic() + limit
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.01)
    return os.getpid()


def write_after(path: str, seconds: float, started: str | None = None) -> None:
    """(Optionally mark ``started``), wait ``seconds``, then write ``path``."""
    if started is not None:
        mark(started, str(os.getpid()))
    _sleep(seconds)
    mark(path, str(os.getpid()))


def fail(message: str) -> None:
    raise ValueError(message)


def square_slowly(x: int) -> tuple[int, int]:
    """x*x, later for smaller x, so completion order differs from input order."""
    _sleep(0.01 * (10 - x % 10))
    return x * x, os.getpid()


def square_or_fail(x: Any) -> int:
    if x == "bad":
        raise KeyError("bad item")
    _sleep(0.005 * (x % 3))
    return int(x) * int(x)


async def async_square(x: int) -> int:
    await asyncio.sleep(0.01 * (5 - x % 5))
    return x * x


# -- placed children -------------------------------------------------------------------------------
class Counter:
    """A child without run(): it lives until stopped."""

    def __init__(self, start: int, closed_marker: str | None = None) -> None:
        self.n = start
        self.closed_marker = closed_marker

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def pid(self) -> int:
        return os.getpid()

    def boom(self) -> None:
        raise ValueError("child method failed")

    async def aincr(self, k: int = 1) -> int:
        await asyncio.sleep(0.001)
        self.n += k
        return self.n

    def close(self) -> None:
        if self.closed_marker is not None:
            mark(self.closed_marker, "closed")


class Worker:
    """A child with a sync run(): works until a gate file appears or close() is called."""

    def __init__(self, gate: str, result: Any = "finished", closed_marker: str | None = None):
        self.gate = gate
        self.result = result
        self.closed_marker = closed_marker
        self.stopping = threading.Event()
        self.ticks = 0

    def run(self) -> Any:
        while not os.path.exists(self.gate):
            if self.stopping.is_set():
                return "closed"
            self.ticks += 1
            time.sleep(0.01)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def started(self) -> bool:
        return self.ticks > 0

    def close(self) -> None:
        self.stopping.set()
        if self.closed_marker is not None:
            mark(self.closed_marker, "closed")


class AsyncWorker:
    """A child with an async run()."""

    def __init__(self, gate: str, result: Any = "async finished") -> None:
        self.gate = gate
        self.result = result
        self.running = False

    async def run(self) -> Any:
        self.running = True
        while not os.path.exists(self.gate):  # noqa: ASYNC110 - polls a file
            await asyncio.sleep(0.01)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def is_running(self) -> bool:
        return self.running


class Sleeper:
    """A child whose run() never ends on its own (to be killed with its runner)."""

    def __init__(self, entered: str) -> None:
        mark(entered, str(os.getpid()))

    def run(self) -> None:
        while True:
            time.sleep(0.01)


class Writer:
    """A placed child whose run() writes ``done`` after ``seconds`` (like ``write_after``)."""

    def __init__(self, done: str, seconds: float, started: str) -> None:
        self.args = (done, seconds, started)

    def run(self) -> str:
        write_after(*self.args)
        return "written"
