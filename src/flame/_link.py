"""The parent side's conversation with one runner, as two protocols.

:class:`Link` is what the parent side says to its runner (a call, a cancel, KEEP, SHUTDOWN...)
and :class:`Peer` is what it hears back (results, a child's end, IDLE, GOODBYE, the end of
the conversation). Two links exist: the wire (``flame._remote.WireLink``, a connection the
runner dialled) and the in-process runner of ``LocalBackend`` (``flame._child._inprocess``).
The parent side (``flame._runner.Runner``) is written once against these.
"""

from __future__ import annotations

from typing import Any, Protocol

from ._record import Form, Status, Wakes
from ._wire import RunnerConfig

#: a pickled section ready to send: the pickle stream and its out-of-band buffers, or None
#: for a link that takes the objects themselves
Section = tuple[bytes, list[memoryview]] | None


class Peer(Protocol):
    """The parent side of a runner: what its link reports."""

    def result(
        self, call_id: int, form: Form, status: Status, payload: Any, wakes: Wakes | None = None
    ) -> None:
        """A call's outcome (any thread)."""

    def child_exit(self, child_id: int, form: Form, status: Status, payload: Any) -> None:
        """A placed child ended (loop thread)."""

    def idle(self) -> None:
        """The runner asks to shut down, idle (loop thread)."""

    def goodbye(self, code: int) -> None:
        """The runner is about to exit on its own, with this exit code (loop thread)."""

    def output(self, stream: int, data: bytes) -> None:
        """What the runner wrote to its stdout (1) or stderr (2) (any thread)."""

    def closed(self, reason: str) -> None:
        """The conversation is over (loop thread, once)."""


class Link(Protocol):
    """How the parent side talks to its runner. Sending a call raises ``ConnectionError``
    once the link is closed; the small messages never block and are dropped then."""

    @property
    def closed(self) -> bool: ...

    @property
    def close_reason(self) -> str: ...

    def start(self, peer: Peer, config: RunnerConfig, name: str) -> None:
        """Begin reporting to ``peer`` (loop thread, once, right after the handshake)."""

    def call(
        self,
        call_id: int,
        flags: int,
        timeout: float | None,
        fn: Any,
        args: tuple[Any, ...],
        section: Section,
    ) -> None:
        """Start ``fn(*args)`` (any thread)."""

    def child_call(
        self,
        call_id: int,
        child_id: int,
        timeout: float | None,
        method: str,
        args: tuple[Any, ...],
        section: Section,
    ) -> None:
        """Call ``method`` of a placed child (any thread)."""

    def cancel(self, call_id: int) -> None: ...

    def stop_child(self, child_id: int) -> None: ...

    def keep(self, retry_after: float) -> None: ...

    def shutdown(self) -> None: ...

    def close(self, reason: str) -> None:
        """Hang up (loop thread)."""

    def forsake(self) -> None:
        """In a forked child: drop this process's copy of the connection, without a word to
        the runner (it is the parent's) and without taking any lock."""
