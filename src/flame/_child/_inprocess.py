"""The runner side, in this very process: what ``LocalBackend`` boots.

An :class:`InProcessRunner` is a runner without a process of its own: the same executor and
the same terminator as a runner process, on the parent's background loop. It "dials" its
parent in-process (``Listener.arrive_in_process``, proving the runner secret from its
``FLAME_PARENT``) and is then the parent side's link (``flame._link.Link``): calls are handed
to the executor directly, outcomes go straight back to the parent side, and KEEP, SHUTDOWN,
IDLE and GOODBYE take the same paths as on the wire. With ``serialize=True`` every call,
argument and result makes the same pickle round trip as it would to a runner process.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from .. import _serialize, _wire
from .._exits import ExitCode
from .._link import Peer, Section
from .._listener import Listener
from .._parent import LaunchInfo
from .._record import Form, Outcome, encode
from .._wire import RunnerConfig
from ._executor import Executor, Loader
from ._terminator import Terminator


class InProcessRunner:
    """One in-process runner: its executor and terminator, and its link to the parent."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: RunnerConfig,
        idle_check: Callable[[], Any] | None,
        serialize: bool,
    ) -> None:
        self.loop = loop
        self.serialize = serialize
        self.executor = Executor(
            loop,
            on_change=self._changed,
            on_stuck=self._stuck,
            cancel_grace=config.cancel_grace,
            now=loop.time,
        )
        self.terminator = Terminator(config, self.executor, self, loop, self._exit)
        self.terminator.idle_check = idle_check
        self.exited: asyncio.Future[ExitCode] = loop.create_future()
        self._peer: Peer | None = None
        self._closed = False
        self._close_reason = ""

    @classmethod
    def dial(cls, info: LaunchInfo, *, serialize: bool) -> InProcessRunner:
        """Reach the parent that booted ``info`` in this process (its loop thread)."""
        port = info.addresses[0][1] if info.addresses else -1
        listener = Listener.at(port)
        if listener is None:
            raise _wire.ProtocolError("no listener of this process booted the runner")
        expected = listener.arrive_in_process(info.runner_id, info.secret)
        idle_check = expected.idle_check
        if serialize:  # the idle check makes the same trip as to a runner process
            idle_check = _serialize.loads(expected.extra).get("idle_check")
        runner = cls(listener.loop, expected.config, idle_check, serialize)
        expected.future.set_result(runner)
        return runner

    # -- flame._link.Link: the parent side talks (any thread, unless said) ------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def close_reason(self) -> str:
        return self._close_reason

    def start(self, peer: Peer, config: RunnerConfig, name: str) -> None:
        self._peer = peer
        self.terminator.start()

    def call(
        self,
        call_id: int,
        flags: int,
        timeout: float | None,
        fn: Any,
        args: tuple[Any, ...],
        section: Section,
    ) -> None:
        self._check_open()
        load = self._loader(fn, args, section)
        link = bool(flags & _wire.FLAG_LINK)
        ex = self.executor
        self.terminator.served()
        if flags & _wire.FLAG_CHILD:
            self.loop.call_soon_threadsafe(
                functools.partial(
                    ex.place_child,
                    call_id,
                    load,
                    link=link,
                    on_built=functools.partial(self._result, call_id, "child"),
                    on_exit=functools.partial(self._child_exit, call_id),
                )
            )
            return
        job = ex.new_call(
            call_id,
            timeout=timeout,
            link=link,
            on_done=functools.partial(self._result, call_id, "result"),
        )
        ex.spawn(functools.partial(ex.run, job, load))

    def child_call(
        self,
        call_id: int,
        child_id: int,
        timeout: float | None,
        method: str,
        args: tuple[Any, ...],
        section: Section,
    ) -> None:
        self._check_open()
        load = self._loader(method, args, section)
        self.loop.call_soon_threadsafe(
            functools.partial(
                self.executor.child_call,
                call_id,
                child_id,
                load,
                timeout=timeout,
                on_done=functools.partial(self._result, call_id, "result"),
            )
        )

    def cancel(self, call_id: int) -> None:
        self._soon(self.executor.cancel, call_id)

    def stop_child(self, child_id: int) -> None:
        self._soon(self.executor.stop_child, child_id)

    def keep(self, retry_after: float) -> None:
        self._soon(self.terminator.keep, retry_after)

    def shutdown(self) -> None:
        self._soon(self.terminator.shutdown)

    def close(self, reason: str) -> None:
        """The parent hangs up (loop thread): as a runner whose parent is lost, linked work
        is cancelled at once and the rest may finish."""
        if self._end_link(reason):
            self.terminator.parent_lost()

    def forsake(self) -> None:
        """In a forked child: the in-process runner's threads stayed with the parent."""

    # -- the terminator's ports (loop thread) ------------------------------------------------
    def idle(self) -> None:
        if self._peer is not None and not self._closed:
            self._peer.idle()

    def goodbye(self, code: ExitCode) -> None:
        if self._peer is not None and not self._closed:
            self._peer.goodbye(code)

    def _changed(self) -> None:
        self.terminator.changed()

    def _stuck(self, call_id: int) -> None:
        self.terminator.stuck(call_id)

    def _exit(self, code: ExitCode) -> None:
        if not self.exited.done():
            self.exited.set_result(code)
        self._end_link("connection closed by peer")

    def kill(self) -> None:
        """End now, whatever is in flight (loop thread)."""
        self.executor.cancel_all()
        self.terminator.stop(ExitCode.STOPPED)

    # -- helpers ----------------------------------------------------------------------------
    def _end_link(self, reason: str) -> bool:
        if self._closed:
            return False
        self._closed, self._close_reason = True, reason
        if self._peer is not None:
            self._peer.closed(reason)
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionError(self._close_reason or "the runner has ended")

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self._closed:
            self.loop.call_soon_threadsafe(fn, *args)

    def _loader(self, fn: Any, args: tuple[Any, ...], section: Section) -> Loader:
        if section is None:
            return lambda: (fn, args)
        data, bufs = section
        # copy the buffers as a transport would, so that mutations do not leak back
        copies = [memoryview(bytearray(b)) for b in bufs]
        return lambda: _serialize.loads(data, copies)

    def _outcome(self, outcome: Outcome, what: str) -> tuple[Form, Any, Any]:
        if not self.serialize:
            return Form.DIRECT, outcome[0], outcome[1]
        status, parts = encode(outcome, what)
        return Form.ENCODED, status, memoryview(b"".join(bytes(p) for p in parts))

    def _result(self, call_id: int, what: str, outcome: Outcome) -> None:
        """A call's outcome, from the worker that ran it: straight to its caller."""
        if self._peer is not None:
            self._peer.result(call_id, *self._outcome(outcome, what))

    def _child_exit(self, child_id: int, outcome: Outcome) -> None:
        form, status, payload = self._outcome(outcome, "child's run() result")
        if self._peer is not None:
            self.loop.call_soon_threadsafe(self._peer.child_exit, child_id, form, status, payload)
