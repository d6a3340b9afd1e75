"""``LocalBackend``: runners in this very process, through the same pool rules.

For development and tests. ``boot`` starts an in-process runner (``flame._child._inprocess``):
the same executor and terminator as a runner process, so concurrency limits, queueing,
timeouts, idle shutdown, single use and drain behave as they do with real runners, but no
process is started. With ``serialize=True`` every function, argument and result makes the
same pickle round trip as it would to a real runner, so serialization bugs show up without
one.
"""

from __future__ import annotations

import asyncio

from .._child._inprocess import InProcessRunner
from .._parent import LaunchInfo
from ._base import Backend, RunnerHandle, RunnerLaunch


class LocalBackend(Backend):
    """Runs calls in the calling process (no runner processes).

    Args:
        serialize: pickle every function, argument and result as a runner process would
            (default: hand the objects over as they are).
    """

    name = "local"

    def __init__(self, serialize: bool = False) -> None:
        self.serialize = bool(serialize)

    def __repr__(self) -> str:
        return f"LocalBackend(serialize={self.serialize})"

    @property
    def pickles_calls(self) -> bool:
        return self.serialize

    async def boot(self, launch: RunnerLaunch) -> RunnerHandle:
        info = LaunchInfo.decode(launch.env["FLAME_PARENT"])
        return InProcessHandle(InProcessRunner.dial(info, serialize=self.serialize))


class InProcessHandle(RunnerHandle):
    """The grip on one in-process runner."""

    def __init__(self, runner: InProcessRunner) -> None:
        self.runner = runner

    @property
    def id(self) -> str:
        return "in-process"

    async def wait(self) -> str:
        code = await asyncio.shield(self.runner.exited)
        return f"ended: {code.describe()}"

    async def stop(self) -> None:
        self.runner.kill()
