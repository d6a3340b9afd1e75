"""Shared test helpers, importable from tests, fixtures and runners (``from helpers import ...``).

* :func:`wait_until`: poll a predicate with a deadline, for states that cannot be awaited
  (a process exiting, a file a runner writes, a pool's stats settling);
* process checks on Linux ``/proc`` (psutil is not a dependency): :func:`pid_alive`,
  :func:`runner_pids` (live ``flame runner`` processes below this one, or below a
  platform's node agent registered in :data:`RUNNER_ROOTS`),
  :func:`assert_pids_gone`.

Nothing here imports flame or starts threads, so a runner that imports it pays nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.01


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    *,
    interval: float = POLL_INTERVAL,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it returns something true and return that value.

    Raises ``AssertionError`` (naming ``message`` or the predicate) if it is still false
    after ``timeout`` seconds. The predicate is evaluated one last time at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"condition not met within {timeout:g}s: {what}")
        time.sleep(interval)


# -- processes ---------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie (exited, not yet reaped) counts as gone."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _is_runner(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    # `python -m flame runner` or the console script `flame runner`
    return any(
        a == b"runner" and i > 0 and argv[i - 1].endswith(b"flame") for i, a in enumerate(argv)
    )


#: other processes whose runners are this test run's: a real platform's node agent (the
#: stand-in kubelet of the real Kubernetes plane) starts runners that are not our children
RUNNER_ROOTS: set[int] = set()


def runner_pids(root: int | None = None) -> set[int]:
    """Pids of live ``flame runner`` processes descending from ``root`` (default: us, and
    the processes in :data:`RUNNER_ROOTS`)."""
    roots = [os.getpid(), *RUNNER_ROOTS] if root is None else [root]
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is None or fields[0] in ("Z", "X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    stack = [child for r in roots for child in children.get(r, ())]
    while stack:
        pid = stack.pop()
        if _is_runner(pid):
            found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


def assert_pids_gone(pids: Iterable[int], timeout: float = 10.0, what: str = "runner") -> None:
    """Wait until none of ``pids`` is alive; fail naming the survivors."""
    pids = set(pids)
    try:
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout)
    except AssertionError:
        alive = sorted(p for p in pids if pid_alive(p))
        raise AssertionError(f"{what} processes {alive} still alive after {timeout:g}s") from None


def describe(value: Any) -> str:
    """A short type description used by runner-side helpers (``module.qualname``)."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


__all__ = ["RUNNER_ROOTS", "assert_pids_gone", "describe", "pid_alive", "runner_pids", "wait_until"]
