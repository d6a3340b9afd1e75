"""``LocalBackend``: calls run in this process, through the same pool rules.

For development and tests: concurrency limits, queueing, timeouts and idle shutdown behave
as with real runners, but no process is started. With ``serialize=True`` every function,
argument and result makes the same pickle round trip as it would to a real runner, so
serialization bugs show up without one.
"""

from __future__ import annotations

from ._base import Backend, RunnerHandle, RunnerLaunch


class LocalBackend(Backend):
    """Runs calls in the calling process (no runner processes)."""

    name = "local"
    in_process = True

    def __init__(self, serialize: bool = False) -> None:
        self.serialize = bool(serialize)

    def __repr__(self) -> str:
        return f"LocalBackend(serialize={self.serialize})"

    async def boot(self, launch: RunnerLaunch) -> RunnerHandle:
        raise NotImplementedError("LocalBackend runs calls in-process and boots nothing")
