"""The ``Backend`` interface: how a runner is started, watched and stopped.

A backend does three things and nothing else:

1. **Start** one runner (:meth:`Backend.boot`) whose environment holds the variables in
   ``RunnerLaunch.env`` (at least ``FLAME_PARENT``), running ``RunnerLaunch.argv``
   (``python -m flame runner`` by default). It returns as soon as the runner is on its way; it
   does not wait for the runner to dial in: the pool does that, bounded by ``boot_timeout``.
2. **Notice its death** (:meth:`RunnerHandle.wait`): resolve with a short description
   ("exited with code 5", "machine destroyed") when the runner is known to be gone. A backend
   that cannot tell may leave the default, which never resolves: heartbeats still notice.
3. **Stop it** (:meth:`RunnerHandle.stop`): terminate it forcefully and release everything the
   backend created for it (process, machine, pod, secret). Idempotent, and safe to call on a
   runner that already exited. The pool calls it after every runner's end, graceful or not,
   and after every failed boot, so that nothing is ever left running.

The runner always dials the parent. :meth:`Backend.listen_host` is the address the parent's
listener binds, :meth:`Backend.advertise_hosts` the addresses runners are told to dial.

Errors: ``boot`` raises :class:`flame.BootError` for anything that went wrong, with a message
that says what (never a token or the runner secret), chained with ``from`` to the cause.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Backend", "RunnerHandle", "RunnerLaunch"]


@dataclass(frozen=True)
class RunnerLaunch:
    """What a backend needs to start one runner.

    ``env`` holds the runner's secret inside ``FLAME_PARENT``: never log it, never put it on a
    command line, and hand it to the runner only through its environment (or something at
    least as private, such as a Kubernetes Secret).
    """

    runner_id: str
    pool: str
    env: Mapping[str, str] = field(repr=False)
    argv: Sequence[str] = ("python", "-m", "flame", "runner")
    #: the runner sends its stdout and stderr to the parent through its connection
    #: (``Pool(forward_output=True)``); a backend that shows a runner's output itself (the
    #: inherited terminal, a platform's logs) need not copy it anywhere else then
    forward_output: bool = True

    def __repr__(self) -> str:
        return f"RunnerLaunch(runner_id={self.runner_id!r}, pool={self.pool!r})"


class RunnerHandle(abc.ABC):
    """The backend's grip on one started runner."""

    @property
    @abc.abstractmethod
    def id(self) -> str:
        """The backend's name for the runner (a pid, a machine id, a pod name)."""

    async def wait(self) -> str:
        """Resolve, with a short description, once the runner is known to be gone.

        The default never resolves: a backend that cannot observe its runners leaves death
        detection to the heartbeats.
        """
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    @abc.abstractmethod
    async def stop(self) -> None:
        """Terminate the runner forcefully and release what was created for it. Idempotent."""

    def diagnostics(self) -> str:
        """Extra detail for error messages, such as the tail of the runner's stderr."""
        return ""

    def forsake(self) -> None:  # noqa: B027 - optional hook
        """Called in a child forked from the parent (``os.fork()``): close this process's
        copies of what the handle holds (pipes, sockets), without touching the runner, which
        is still the parent's. Must not take a lock a parent thread may have held."""


class Backend(abc.ABC):
    """Starts runners. Subclass it to run flame on a platform of your own.

    Check a new backend with :func:`flame.testing.check_backend`.
    """

    #: The name given to runners in ``flame.parent().backend``.
    name: str = "custom"

    @property
    def pickles_calls(self) -> bool:
        """Whether calls, arguments and results are pickled on their way to a runner: true
        for every runner in another process. Only ``LocalBackend()`` (without ``serialize``),
        whose runners live in the caller's own process, hands the objects over as they are."""
        return True

    def listen_host(self) -> str:
        """The address the parent's listener binds for this backend's runners."""
        return "127.0.0.1"

    def advertise_hosts(self) -> Sequence[str]:
        """The addresses this backend's runners dial to reach the parent, tried in order."""
        return [self.listen_host()]

    def runner_sys_path(self) -> Sequence[str] | None:
        """``sys.path`` the runner should adopt (spawn-like backends), or ``None``."""
        return None

    def runner_cwd(self) -> str | None:
        """The working directory the runner should move to, or ``None``."""
        return None

    def runner_app(self) -> Mapping[str, str] | None:
        """Override the app the runner imports: ``{"module": name}`` or ``{"path": file}``.

        ``None`` (the default) means the parent's main module.
        """
        return None

    @abc.abstractmethod
    async def boot(self, launch: RunnerLaunch) -> RunnerHandle:
        """Start one runner and return its handle without waiting for it to dial in."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (HTTP clients...). Called when its pool stops."""

    def forked(self) -> None:  # noqa: B027 - optional hook
        """Called in a child forked from the parent (``os.fork()``), whose pools start afresh:
        forget what belongs to the parent's event loop or threads (HTTP clients, watches,
        rate limiters), so that the child makes its own on first use. Must not take a lock
        a parent thread may have held."""
