"""Helpers for the pool, cast, child and map tests.

Two kinds of things live here:

* functions and classes that run *on runners* (they are pickled by reference, so a
  ProcessBackend runner imports this module through the parent's ``sys.path``); they talk
  back to the test through files in a temporary directory, since a runner is another
  process, and every wait in them is a short-sleep poll so that a cancel (an exception raised
  in the worker thread) interrupts them promptly;
* parent-side utilities: ``holds_for`` (a predicate stays true for a while) and ``Caller``
  (a call in a thread, keeping its result or error); ``wait_until`` and the process checks
  are the shared ones from ``helpers``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flame


def holds_for(predicate: Callable[[], Any], duration: float) -> bool:
    """True if ``predicate`` stays true for the whole of ``duration`` (polled): for checking
    that something does *not* happen (no boot, no shutdown) within a bounded window."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.02)
    return bool(predicate())


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


# -- parent side: callers in threads ---------------------------------------------------------------
class Caller(threading.Thread):
    """Runs ``fn(*args, **kwargs)`` in a thread and keeps its result or exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result: Any = None
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.elapsed = -1.0
        self.start()

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            self.error = exc
        finally:
            self.elapsed = time.monotonic() - self.started_at

    def outcome(self, timeout: float = 20.0) -> Any:
        """The result (or raise the error) once the call ends; fail if it does not."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.fn} did not return within {timeout:g}s"
        if self.error is not None:
            raise self.error
        return self.result

    def failure(self, timeout: float = 20.0) -> BaseException:
        """The exception the call ended with; fail if it returned."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.fn} did not return within {timeout:g}s"
        assert self.error is not None, f"expected an error, got {self.result!r}"
        return self.error


# -- a parent process to kill (link tests) ---------------------------------------------------------
class Writer:
    """A placed child whose run() writes ``done`` after ``seconds`` (like ``write_after``)."""

    def __init__(self, done: str, seconds: float, started: str) -> None:
        self.args = (done, seconds, started)

    def run(self) -> str:
        write_after(*self.args)
        return "written"


LINK_WORK = ("unlinked-cast", "linked-cast", "unlinked-child", "linked-child")


def link_parent_main(workdir: str, seconds: float) -> None:
    """Run as a separate parent process, to be SIGKILLed by the test.

    Starts, on one runner, a cast and a placed child with ``link=False`` and the same with
    ``link=True``; each writes ``<name>.started`` at once and ``<name>.done`` after
    ``seconds``. Also places a linked child without ``run()`` (a ``Counter``) whose
    ``close()`` writes ``linked-counter.closed``. Once all have started, writes the runner's
    pid to ``ready`` and waits. A long cancel grace makes a runner that waits for it stand out.
    """
    d = Path(workdir)
    flame.configure(cancel_grace=30.0)
    pool = flame.Pool(
        "link-parent",
        max=1,
        max_concurrency=5,
        backend=flame.ProcessBackend(),
        shutdown_timeout=10,
        idle_shutdown_after=None,
    )
    pool.start()

    def paths(name: str) -> tuple[str, str]:
        return str(d / f"{name}.done"), str(d / f"{name}.started")

    done, started = paths("unlinked-cast")
    pool.cast(write_after, done, seconds, started, link=False)
    done, started = paths("linked-cast")
    pool.cast(write_after, done, seconds, started, link=True)
    done, started = paths("unlinked-child")
    pool.place_child(Writer, done, seconds, started, link=False)
    done, started = paths("linked-child")
    pool.place_child(Writer, done, seconds, started, link=True)
    pool.place_child(Counter, 0, str(d / "linked-counter.closed"), link=True)
    deadline = time.monotonic() + 30
    while not all((d / f"{name}.started").exists() for name in LINK_WORK):
        if time.monotonic() > deadline:
            raise SystemExit("the work never started")
        time.sleep(0.01)
    pids = {(d / f"{name}.started").read_text() for name in LINK_WORK}
    assert len(pids) == 1, pids
    mark(str(d / "ready"), pids.pop())
    while True:  # until the test kills us
        time.sleep(1)
