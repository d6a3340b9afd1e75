"""``ProcessBackend``: each runner is a fresh Python process on this machine.

Like multiprocessing's spawn, a runner starts with the parent's working directory,
``sys.path`` and environment (plus ``env``), so whatever the parent imports, the runner can.
By default it sends its output through its connection, and what it also writes to its
own stdout and stderr (before it connects, after it lost its parent) goes to a pipe whose
last lines make the error message when a runner fails to boot; with
``Pool(forward_output=False)`` its stdout and stderr are the parent's.
Runners are put in their own session, so a Ctrl-C in the parent's terminal reaches the
parent only; they end when the parent goes away because their connection does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import _lifecycle
from .._errors import BootError
from .._exits import describe_exit
from ._base import Backend, RunnerHandle, RunnerLaunch

_TAIL_LINES = 40


class ProcessHandle(RunnerHandle):
    """One runner process.

    Its exit is watched without tying up a thread: a pidfd (Linux 5.3+) on the event loop,
    or, where there is none, a daemon thread that waits for it; nothing of it can hold up
    the interpreter's exit. The exit is reported once the process is gone and its stderr
    has been read to the end (or a second later), so the error messages carry its last
    lines."""

    def __init__(self, proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.proc = proc
        self._loop = loop
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._exited: asyncio.Future[str] = loop.create_future()
        self._code: int | None = None
        self._pumped = proc.stdout is None
        self._watching = False

    @property
    def id(self) -> str:
        return f"pid {self.proc.pid}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        """Keep the last lines of the runner's own output, and watch for its exit (loop
        thread)."""
        stream = self.proc.stdout
        if stream is not None:

            def pump() -> None:
                try:
                    with stream:
                        for raw in iter(stream.readline, b""):
                            self._tail.append(raw.decode(errors="replace").rstrip("\n"))
                finally:
                    _soon(self._loop, self._pump_done)

            threading.Thread(target=pump, name=f"flame-output-{self.pid}", daemon=True).start()
        self._watch()

    def _watch(self) -> None:
        try:
            fd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # no pidfd here: a daemon thread waits instead
            threading.Thread(
                target=lambda: _soon(self._loop, self._process_done, self.proc.wait()),
                name=f"flame-wait-{self.pid}",
                daemon=True,
            ).start()
            return

        def reaped() -> None:
            self._loop.remove_reader(fd)
            os.close(fd)
            self._process_done(self.proc.wait())

        self._loop.add_reader(fd, reaped)

    def _process_done(self, code: int) -> None:
        self._code = code
        self._loop.call_later(1.0, self._report)  # stderr may stay open in a grandchild
        if self._pumped:
            self._report()

    def _pump_done(self) -> None:
        self._pumped = True
        if self._code is not None:
            self._report()

    def _report(self) -> None:
        if self._code is not None and not self._exited.done():
            self._exited.set_result(describe_exit(self._code))

    async def wait(self) -> str:
        return await asyncio.shield(self._exited)

    async def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.wait()

    def diagnostics(self) -> str:
        return "\n".join(self._tail)

    def forsake(self) -> None:
        if self.proc.stdout is not None:  # the pipe's read end: the parent's pump reads it
            _lifecycle.close_fd(self.proc.stdout.fileno())


def _soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(fn, *args)


class ProcessBackend(Backend):
    """Boots each runner as a new Python process on this machine.

    Args:
        python: the interpreter to run (default: ``sys.executable``).
        env: extra environment variables for runners, on top of the parent's.
        cwd: the runners' working directory (default: the parent's).
        app: what runners import as the application: a module name or a script path
            (default: the parent's main module).
    """

    name = "process"

    def __init__(
        self,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        app: str | None = None,
    ) -> None:
        if env is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("env must map str to str")
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.cwd = cwd
        self.app = app

    def __repr__(self) -> str:
        return f"ProcessBackend(python={self.python!r}, app={self.app!r})"

    def runner_sys_path(self) -> Sequence[str] | None:
        return list(sys.path)

    def runner_cwd(self) -> str | None:
        return self.cwd or os.getcwd()

    def runner_app(self) -> Mapping[str, str] | None:
        if self.app is None:
            return None
        if self.app.endswith(".py") or os.sep in self.app:
            return {"path": os.path.abspath(self.app)}
        return {"module": self.app}

    async def boot(self, launch: RunnerLaunch) -> RunnerHandle:
        env = dict(os.environ)
        env.update(self.env)
        env.update(launch.env)
        # make sure `-m flame` resolves to this flame, installed or not
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        argv = (
            [self.python, *launch.argv[1:]] if launch.argv[:1] == ("python",) else list(launch.argv)
        )
        try:
            proc = await asyncio.to_thread(
                subprocess.Popen,
                argv,
                env=env,
                cwd=self.cwd or os.getcwd(),
                stdin=subprocess.DEVNULL,
                # a forwarding runner sends its output through its connection; what it also
                # writes here (before it connects, after it lost its parent) is kept for the
                # error messages, not shown twice. Otherwise it shares our terminal.
                stdout=subprocess.PIPE if launch.forward_output else None,
                stderr=subprocess.STDOUT if launch.forward_output else None,
                start_new_session=True,
            )
        except OSError as exc:
            raise BootError(
                f"could not start the runner process {self.python!r}: {exc.strerror or exc}"
            ) from exc
        handle = ProcessHandle(proc, asyncio.get_running_loop())
        handle.start()
        return handle
