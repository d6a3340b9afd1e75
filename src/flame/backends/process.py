"""``ProcessBackend``: each runner is a Python process of its own on this machine.

Like multiprocessing's spawn, a runner starts with the parent's working directory,
``sys.path`` and environment (plus ``env``), so whatever the parent imports, the runner can.
Runners are forked from a fork server (``flame.backends._zygote``) that has imported flame
and the backend's ``preload`` modules once, so a boot costs milliseconds, not an import of
flame; where forking is not possible or not safe, each runner is spawned afresh
(``python -m flame runner``). Either way a runner starts clean: the fork server has run
no application code (only the modules named in ``preload``) and no thread.

By default a runner sends its output through its connection, and what it also writes to
its own stdout and stderr (before it connects, after it lost its parent) goes to a pipe
whose last lines make the error message when a runner fails to boot; with
``Pool(forward_output=False)`` its stdout and stderr are the parent's.
Runners are put in their own session, so a Ctrl-C in the parent's terminal reaches the
parent only; they end when the parent goes away because their connection does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .. import _lifecycle
from .._errors import BootError
from .._exits import describe_exit
from . import _zygote
from ._base import Backend, RunnerHandle, RunnerLaunch
from ._zygote import ForkedProcess

logger = logging.getLogger("flame")

_TAIL_LINES = 40


class ProcessHandle(RunnerHandle):
    """One runner process: spawned (``proc`` is a ``subprocess.Popen``) or forked by the fork
    server (a :class:`~flame.backends._zygote.ForkedProcess`).

    Its exit is watched without tying up a thread: a spawned runner's through a pidfd
    (Linux 5.3+) on the event loop, or, where there is none, a daemon thread that waits for
    it; a forked runner's exit status comes from the fork server that reaped it. Nothing of
    it can hold up the interpreter's exit. The exit is reported once the process is gone
    and its stderr has been read to the end (or a second later), so the error messages
    carry its last lines."""

    def __init__(
        self, proc: subprocess.Popen[bytes] | ForkedProcess, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.proc = proc
        self._loop = loop
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._exited: asyncio.Future[str] = loop.create_future()
        self._code: int | None = None
        self._gone = False
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
        proc = self.proc
        if isinstance(proc, ForkedProcess):
            proc.on_exit(lambda code: _soon(self._loop, self._process_done, code))
            return
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
            self._process_done(proc.wait())

        self._loop.add_reader(fd, reaped)

    def _process_done(self, code: int | None) -> None:
        """The process is gone, with that exit code (``None``: unknown)."""
        self._code, self._gone = code, True
        self._loop.call_later(1.0, self._report)  # stderr may stay open in a grandchild
        if self._pumped:
            self._report()

    def _pump_done(self) -> None:
        self._pumped = True
        if self._gone:
            self._report()

    def _report(self) -> None:
        if self._gone and not self._exited.done():
            text = (
                describe_exit(self._code)
                if self._code is not None
                else "exited (its exit status was lost: the fork server that started it died)"
            )
            self._exited.set_result(text)

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
        if isinstance(self.proc, ForkedProcess):
            self.proc.forsake()


def _soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(fn, *args)


class ProcessBackend(Backend):
    """Boots each runner as a Python process of its own on this machine.

    Runners are forked from a fork server: a process started (on the first boot, then
    shared by every pool of this process that has the same interpreter, environment,
    working directory and ``preload``) with the runners' interpreter, environment and
    working directory, which has imported flame and the ``preload`` modules once. A runner
    is spawned afresh instead (``python -m flame runner``, as with ``fork_server=False``)
    where forking is not available or not safe: not on Linux 5.3+ (macOS, Windows), with
    a ``python`` other than this interpreter (it may be a wrapper that does things per
    runner), when the fork server could not start or import ``preload``, or has threads
    (a preloaded module started one: forking a process with threads is not safe).

    Args:
        python: the interpreter to run (default: ``sys.executable``).
        env: extra environment variables for runners, on top of the parent's.
        cwd: the runners' working directory (default: the parent's).
        app: what runners import as the application: a module name or a script path
            (default: the parent's main module).
        preload: modules the fork server imports once, for every runner (beyond flame's
            own): libraries the app imports (``"numpy"``, ``"pandas"``, ``"django"``), or
            modules of the app itself when importing them is safe to share: when it
            does not depend on being a runner (``flame.parent()`` is ``None`` in the fork
            server), starts no thread, opens no connection, file or socket that every
            runner would then share, and does not call a pool. Each runner still imports
            the app itself (its main module, or ``app``), so everything its import does
            happens in each runner as before.
        fork_server: ``False`` spawns every runner afresh, as ``python -m flame runner``.
    """

    name = "process"

    def __init__(
        self,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        app: str | None = None,
        *,
        preload: Iterable[str] = (),
        fork_server: bool = True,
    ) -> None:
        if env is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("env must map str to str")
        if isinstance(preload, str):
            raise ValueError(f"preload must be a list of module names, not the string {preload!r}")
        names = tuple(preload)
        bad = [n for n in names if not _module_name(n)]
        if bad:
            raise ValueError(
                f"preload must name importable modules ('numpy', 'myapp.models'); "
                f"{bad[0]!r} is not one"
            )
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.cwd = cwd
        self.app = app
        self.preload = names
        self.fork_server = fork_server
        self._forks = fork_server and python in (None, sys.executable) and _zygote.supported()

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
        cwd = self.cwd or os.getcwd()
        proc: subprocess.Popen[bytes] | ForkedProcess | None = None
        if self._forks and tuple(launch.argv) == _RUNNER_ARGV:
            proc = await self._fork(env, launch, cwd)
        if proc is None:
            proc = await self._spawn(launch, env, cwd)
        handle = ProcessHandle(proc, asyncio.get_running_loop())
        handle.start()
        return handle

    async def _fork(
        self, env: Mapping[str, str], launch: RunnerLaunch, cwd: str
    ) -> ForkedProcess | None:
        """A runner from the fork server, or ``None`` if it cannot make one (then spawn).
        The server is the one for what every runner of this backend gets; what this runner
        alone gets (``launch.env``: ``FLAME_PARENT``) travels with the request."""
        base = {k: v for k, v in env.items() if k not in launch.env}
        server = _zygote.server_for(self.python, base, cwd, sys.path, self.preload)
        if server is None:
            return None
        try:
            return await server.fork(launch.env, launch.forward_output)
        except _zygote.Unavailable as exc:
            logger.debug("flame: spawning a runner, not forking it: %s", exc)
            return None

    async def _spawn(
        self, launch: RunnerLaunch, env: dict[str, str], cwd: str
    ) -> subprocess.Popen[bytes]:
        argv = (
            [self.python, *launch.argv[1:]] if launch.argv[:1] == ("python",) else list(launch.argv)
        )
        try:
            return await asyncio.to_thread(
                subprocess.Popen,
                argv,
                env=env,
                cwd=cwd,
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


_RUNNER_ARGV = ("python", "-m", "flame", "runner")


def _module_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name != "__main__"
        and all(part.isidentifier() for part in name.split("."))
    )
