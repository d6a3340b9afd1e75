"""The parent side of one runner: boot it through its backend, hold its link, track its work.

A :class:`Runner` is made by its pool for each runner the scaling core decides to boot. It
starts the runner through the backend (bounded by ``boot_timeout``, racing the backend's
report of an early death against the runner dialling in), then keeps the calls and placed
children in flight on it, turns what the runner says into the owner's events (a slot freed,
an idle request, the runner gone), and fails what is in flight when the runner is lost. It
knows its pool only through the narrow :class:`RunnerOwner` protocol, and what to tell the
runner through one frozen :class:`RunnerSpec`. The same class serves every backend: how the
runner is reached (a TCP connection, or ``LocalBackend``'s in-process runner) is its link's
business (``flame._link``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import _output, _redact, _serialize
from ._errors import BootError, RunnerLost
from ._exits import ExitCode, describe_exit
from ._link import Link, Section
from ._listener import Listener
from ._parent import LaunchInfo, runner_app
from ._record import Form, Pending, Status, Wakes
from ._wire import RunnerConfig
from .backends._base import Backend, RunnerHandle, RunnerLaunch


class RunnerOwner(Protocol):
    """What a runner needs of its pool."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The background loop the pool runs on."""

    def release(self, runner: Runner) -> None:
        """A call (or a placed child) on ``runner`` ended: its slot is free (any thread)."""

    def idle_request(self, runner: Runner) -> None:
        """``runner`` has been idle long enough and asks to shut down (loop thread)."""

    async def runner_gone(self, runner: Runner, message: str) -> None:
        """``runner`` is gone (it exited, died, or was lost), for this reason (loop thread)."""

    def log_error(self, message: str) -> None: ...


@dataclass(frozen=True)
class RunnerSpec:
    """Everything a runner is booted with, fixed when its pool decides to boot it."""

    pool: str
    backend: Backend
    boot_timeout: float
    tls: bool
    failsafe: float
    config: RunnerConfig
    #: run on the runner before it asks to go idle
    idle_check: Callable[[], Any] | None = None
    #: the runner's stdout and stderr come to this process, prefixed with the runner's id
    forward_output: bool = True


class Runner:
    """The parent side of one runner (see the module's docstring)."""

    def __init__(self, owner: RunnerOwner, rid: int, spec: RunnerSpec) -> None:
        self.owner = owner
        self.rid = rid
        self.spec = spec
        self.backend = spec.backend
        self.runner_id = f"{spec.pool}-{rid}-{secrets.token_hex(3)}"
        self.pending: dict[int, Pending] = {}
        self.children: dict[int, Any] = {}  # child id -> flame.Child
        self.gone = False
        self.handle: RunnerHandle | None = None
        self.link: Link | None = None
        self.goodbye_code: int | None = None
        self.exit_text: str | None = None
        self._handle_wait: asyncio.Task[str] | None = None
        self._ids = 0
        self._ids_lock = threading.Lock()

    def next_id(self) -> int:
        with self._ids_lock:
            self._ids += 1
            return self._ids

    def describe(self) -> str:
        extra = f" ({self.handle.id})" if self.handle is not None else ""
        return f"runner {self.runner_id!r}{extra}"

    # -- booting ---------------------------------------------------------------------------
    async def boot(self) -> None:
        """Start the runner and wait until it has dialled in and authenticated."""
        spec = self.spec
        backend = spec.backend
        listener = Listener.get(backend.listen_host(), spec.tls)
        secret = os.urandom(32)
        info = LaunchInfo(
            runner_id=self.runner_id,
            secret=secret,
            addresses=tuple((h, listener.port) for h in backend.advertise_hosts()),
            pool=spec.pool,
            backend=backend.name,
            app=app_spec(backend),
            sys_path=_opt_tuple(backend.runner_sys_path()),
            cwd=backend.runner_cwd(),
            failsafe=spec.failsafe,
            tls_fingerprint=listener.tls[1] if listener.tls is not None else None,
            forward_output=spec.forward_output,
        )
        extra, _ = _serialize.dumps({"idle_check": spec.idle_check})
        connected = listener.expect(self.runner_id, secret, spec.config, spec.idle_check, extra)
        encoded = info.encode()
        # never shown, even if a platform echoes the request in an error (Kubernetes keeps
        # Secret data base64-encoded once more)
        _redact.hide(self, encoded, base64.b64encode(encoded.encode()).decode(), secret.hex())
        launch = RunnerLaunch(
            runner_id=self.runner_id,
            pool=spec.pool,
            env={"FLAME_PARENT": encoded},
            argv=("python", "-m", "flame", "runner"),
            forward_output=spec.forward_output,
        )
        timeout = spec.boot_timeout
        deadline = time.monotonic() + timeout
        try:
            try:
                async with asyncio.timeout(timeout):
                    self.handle = await backend.boot(launch)
            except TimeoutError:
                raise BootError(
                    f"backend {backend.name!r} did not start a runner within "
                    f"boot_timeout={timeout:g}s"
                ) from None
            except BootError:
                raise
            except Exception as exc:
                raise BootError(
                    f"backend {backend.name!r} failed to start a runner: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self._handle_wait = asyncio.ensure_future(self.handle.wait())
            remaining = max(0.0, deadline - time.monotonic())
            racers: set[asyncio.Future[Any]] = {connected, self._handle_wait}
            done, _ = await asyncio.wait(
                racers, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if connected in done:
                link: Link = connected.result()  # raises BootError on a version mismatch
            elif self._handle_wait in done:
                text = self._handle_wait.result()
                if ExitCode.NO_MAIN_GUARD.describe() in text:
                    raise BootError(_no_main_guard(info.app))
                raise BootError(
                    f"{self.describe()} {text} before connecting to its parent" + _diag(self.handle)
                )
            else:
                raise BootError(
                    f"{self.describe()} did not connect within boot_timeout={timeout:g}s"
                    + _diag(self.handle)
                )
        except BaseException:
            listener.forget(self.runner_id)
            if not connected.done():
                connected.cancel()
            await self.kill()
            raise
        self.link = link
        link.start(self, spec.config, str(self.rid))

    # -- what the runner says (flame._link.Peer) -----------------------------------------------
    def result(
        self, call_id: int, form: Form, status: Status, payload: Any, wakes: Wakes | None = None
    ) -> None:
        p = self.pending.pop(call_id, None)
        if p is not None:
            p.resolve(form, status, payload, wakes)

    def child_exit(self, child_id: int, form: Form, status: Status, payload: Any) -> None:
        child = self.children.pop(child_id, None)
        if child is not None:
            child._ended(form, status, payload)
            self.owner.release(self)

    def idle(self) -> None:
        self.owner.idle_request(self)

    def goodbye(self, code: int) -> None:
        self.goodbye_code = code

    def output(self, stream: int, data: bytes) -> None:
        _output.emit(self.runner_id, stream, data)

    def closed(self, reason: str) -> None:
        self.owner.loop.create_task(self._lost(reason))

    async def _lost(self, reason: str) -> None:
        if self.gone:
            return
        # the connection closed: the runner is likely exiting; give the backend a moment to
        # report its exit status, for a useful message. Heartbeats stopped: the runner is
        # frozen or cut off, and no status is coming soon; fail its calls now.
        wait = self._handle_wait
        if wait is not None and not wait.done() and not reason.startswith("no heartbeat"):
            await asyncio.wait({wait}, timeout=1.0)
        if wait is not None and wait.done():
            with contextlib.suppress(BaseException):
                self.exit_text = wait.result()
        if self.exit_text is None and self.goodbye_code is not None:
            self.exit_text = describe_exit(self.goodbye_code)
        message = f"{self.describe()} was lost: {self.exit_text or reason}"
        if self.exit_text and reason and "closed by peer" not in reason:
            message += f" ({reason})"
        if self.goodbye_code == ExitCode.STUCK:
            message += "; a call on it did not stop after its deadline, so the runner exited"
        self.gone = True
        _output.end(self.runner_id)
        self.fail_all(message)
        await self.owner.runner_gone(self, message)

    def fail_all(self, message: str) -> None:
        for call_id, p in list(self.pending.items()):
            self.pending.pop(call_id, None)
            p.lose(message)
        for child in list(self.children.values()):
            child._ended(Form.LOST, Status.CANCELLED, message)
        self.children.clear()

    # -- the work on it (caller threads) -----------------------------------------------------
    def register(self, pending: Pending) -> None:
        self.pending[pending.call_id] = pending

    def free_slot(self, call_id: int) -> None:
        """The call (or the child it placed) is over: its slot goes back to the pool."""
        self.children.pop(call_id, None)
        self.owner.release(self)

    def abort(self, call_id: int) -> None:
        """A call that was never sent: forget it and give its slot back."""
        self.pending.pop(call_id, None)
        self.children.pop(call_id, None)
        if not self.gone:
            self.owner.release(self)

    def _link_or_lost(self) -> Link:
        link = self.link
        if link is None or link.closed:
            raise RunnerLost(f"{self.describe()} is gone ({link.close_reason if link else ''})")
        return link

    def send_call(
        self,
        call_id: int,
        flags: int,
        timeout: float | None,
        fn: Any,
        args: tuple[Any, ...],
        section: Section,
    ) -> None:
        try:
            self._link_or_lost().call(call_id, flags, timeout, fn, args, section)
        except ConnectionError as exc:
            raise RunnerLost(f"{self.describe()} was lost while sending a call: {exc}") from None

    def send_child_call(
        self,
        call_id: int,
        child_id: int,
        timeout: float | None,
        method: str,
        args: tuple[Any, ...],
        section: Section,
    ) -> None:
        try:
            self._link_or_lost().child_call(call_id, child_id, timeout, method, args, section)
        except ConnectionError as exc:
            raise RunnerLost(f"{self.describe()} was lost while sending a call: {exc}") from None

    def cancel(self, call_id: int) -> None:
        if self.link is not None:
            self.link.cancel(call_id)

    def stop_child(self, child_id: int) -> None:
        if self.link is not None:
            self.link.stop_child(child_id)

    # -- what the pool decides (any thread) -----------------------------------------------------
    def keep(self, retry_after: float) -> None:
        if self.link is not None:
            self.link.keep(retry_after)

    def shutdown(self) -> None:
        """Ask the runner to finish its work and exit."""
        link = self.link
        if link is not None and not link.closed:
            link.shutdown()
            return
        loop = self.owner.loop
        loop.call_soon_threadsafe(
            lambda: loop.create_task(self._lost("shut down before connecting"))
        )

    async def leave(self) -> None:
        """The parent is exiting: hang up, so that the runner loses its parent (its linked
        work is terminated at once, its unlinked work finishes), and stop it at once unless
        unlinked work is still running on it (then it exits by itself when done)."""
        unlinked = any(not p.linked for p in self.pending.values()) or any(
            not child.link for child in self.children.values()
        )
        self.gone = True
        link = self.link
        if link is not None and not link.closed:
            # cancel the linked work, let the rest drain, and hang up: a runner told to
            # stop does not take the closed connection for a lost parent
            for call_id, p in list(self.pending.items()):
                if p.linked:
                    link.cancel(call_id)
            for child_id, child in list(self.children.items()):
                if child.link:
                    link.stop_child(child_id)
            link.shutdown()
            link.close("the parent is exiting")
        if not unlinked and self.handle is not None:
            with contextlib.suppress(Exception):
                await self.handle.stop()
        _redact.forget(self)

    def forsake(self) -> None:
        """In a child forked from the parent: give up this process's copies of the runner's
        connection and handle, without touching the runner (it is the parent's)."""
        if self.link is not None:
            self.link.forsake()
        if self.handle is not None:
            self.handle.forsake()

    async def kill(self) -> None:
        """Force the runner down and release what the backend holds for it (loop thread)."""
        if self.link is not None and not self.link.closed:
            self.link.close("stopped by the pool")
        if self.handle is not None:
            try:
                await self.handle.stop()
            except Exception as exc:
                self.owner.log_error(f"backend failed to stop {self.describe()}: {exc!r}")
        if self._handle_wait is not None and not self._handle_wait.done():
            self._handle_wait.cancel()
        _redact.forget(self)


def _no_main_guard(app: dict[str, str] | None) -> str:
    what = next(iter((app or {}).values()), "the app")
    return (
        f"{what} calls a pool while it is imported, so each runner that imports it would call "
        'the pool again: put the calls under `if __name__ == "__main__":`'
    )


def _diag(handle: RunnerHandle | None) -> str:
    if handle is None:
        return ""
    text = handle.diagnostics()
    return f"\n--- runner output (last lines) ---\n{text}" if text else ""


def _opt_tuple(v: Any) -> tuple[str, ...] | None:
    return tuple(v) if v is not None else None


def app_spec(backend: Backend) -> dict[str, str] | None:
    """What the runner imports as the application (see ``Backend.runner_app``)."""
    explicit = backend.runner_app()
    if explicit is not None:
        return dict(explicit)
    inherited = runner_app()  # a runner's own pools boot runners of the same app
    if inherited is not None:
        return inherited
    main = sys.modules.get("__main__")
    if main is None:
        return None
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if name and name not in ("__main__", "flame.__main__"):
        return {"main_module": name}
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and not name:
        if not os.path.isfile(path):  # python - < app.py
            raise BootError(
                f"the main script was read from {path} (python - < app.py), and a runner "
                "imports the app from a file: save the code to a file and run it "
                "(python app.py), or pass the app to the backend (app=...)"
            )
        return {"main_path": os.path.abspath(path)}
    return None
