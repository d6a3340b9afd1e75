"""Clean-ups a cloud backend must see through: removals that outlive the task asking.

A backend removes what a runner left (a container, a machine) in a task of its own, so the
removal completes even when the caller is cancelled, and its ``aclose`` waits, within a
bound, for the removals still under way. :class:`CleanupTasks` is that set of tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["CleanupTasks"]


class CleanupTasks:
    """The clean-up tasks of one backend."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in its own task, kept until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, grace: float, logger: logging.Logger, what: str) -> None:
        """Wait up to ``grace`` seconds for the tasks under way; cancel (and log, as
        ``what`` "did not finish before close") the ones still running then."""
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return
        _done, late = await asyncio.wait(pending, timeout=grace)
        for task in late:
            logger.warning("%s did not finish before close", what)
            task.cancel()
