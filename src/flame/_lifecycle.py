"""What flame does when its process forks or ends (SPEC "The application's life cycle").

**Fork.** After ``os.fork()`` the child has one thread, and flame's state belongs to the
parent: its loop thread, listeners, connections, runner processes, and locks that a parent
thread may have held at the instant of the fork. Each module that holds such state
registers a reset with :func:`on_fork`; the resets run in the child only. What a reset takes
out of use is handed to :func:`bury`: kept referenced for the child's whole life, so that no
finalizer ever runs on it there (a finalizer could wait for a lock held by a thread that
does not exist in the child, or close a file descriptor number that is by then reused).

**Exit.** :func:`on_exit` callbacks run from ``atexit``, after the program's own threads
were joined (so a thread still calling a pool finishes first) and with the background loop
still running.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import Any

_graveyard: list[Any] = []


def bury(*objects: Any) -> None:
    """Keep ``objects`` alive, untouched, for the rest of this (forked) process."""
    _graveyard.extend(objects)


def on_fork(reset: Callable[[], None]) -> None:
    """Run ``reset`` in every child forked from this process, right after the fork."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=reset)


def on_exit(callback: Callable[[], None]) -> None:
    """Run ``callback`` at interpreter exit (after the program's threads were joined)."""
    atexit.register(callback)


def close_fd(fd: int) -> None:
    """Close this process's copy of a descriptor it inherited (the parent keeps its own)."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
