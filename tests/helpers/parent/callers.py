"""Parent-side helpers of the pool, cast, child and map tests: ``holds_for`` (a predicate
stays true for a while) and ``Caller`` (a call in a thread, keeping its result or error).
``wait_until`` and the process checks are the shared ones from ``helpers``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def holds_for(predicate: Callable[[], Any], duration: float) -> bool:
    """True if ``predicate`` stays true for the whole of ``duration`` (polled): for checking
    that something does *not* happen (no boot, no shutdown) within a bounded window."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.02)
    return bool(predicate())


# -- callers in threads ---------------------------------------------------------------
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
