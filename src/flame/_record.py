"""A call's record and its outcome: how an outcome is encoded on the runner, held while it
travels, and decoded in the caller.

:class:`Pending` is one call in flight, seen from the caller. Caller threads block on it,
asyncio callers await it; whoever delivers the outcome (a connection's reader thread, a
worker of the in-process runner, or the pool's loop when a runner is lost) resolves it
exactly once, in one of three forms (:class:`Form`): a pickled section from the wire, the
value itself (in-process, without pickling), or the runner's loss. :func:`encode` is the
runner's half (an executor's outcome to a RESULT body); :func:`decode` the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import threading
from collections.abc import Callable
from typing import Any, Protocol

from . import _serialize, _wire
from ._errors import (
    CallTimeout,
    PoolClosed,
    RemoteError,
    RemoteTraceback,
    RunnerLost,
    SerializationError,
)


class Status(enum.IntEnum):
    """How a call ended on its runner (the status byte of RESULT and CHILD_EXIT)."""

    OK = 0  # the value
    RAISED = 1  # (pickled exception or None, type name, message, traceback)
    TIMEOUT = 3  # message text: the deadline passed on the runner
    CANCELLED = 4  # message text: cancelled by the parent, or by parent loss


#: what an executor reports: a status and the value, the exception (with its traceback
#: text), or a message
Outcome = tuple[Status, Any]


class Form(enum.Enum):
    """How a resolved call holds its outcome."""

    ENCODED = "encoded"  # status + a pickled section (from the wire, or LocalBackend(serialize))
    DIRECT = "direct"  # status + the value itself (in-process, nothing pickled)
    LOST = "lost"  # the runner went away before the outcome came; payload: the message


class Kind(enum.Enum):
    """What a pending call is, for its slot."""

    CALL = "call"  # a call or cast: holds a slot until its outcome
    PLACE = "place"  # placing a child: the slot stays with the child if it was built
    CHILD_CALL = "child_call"  # a call on a placed child: uses the child's slot


class SlotHolder(Protocol):
    """The runner a call is on, as the call's record needs it."""

    def free_slot(self, call_id: int) -> None:
        """Give the slot the call (or the child it placed) held back to the pool."""


# -- the runner's half -------------------------------------------------------------------------
def encode(outcome: Outcome, what: str) -> tuple[Status, list[bytes | memoryview]]:
    """Pickle an executor's outcome for a RESULT / CHILD_EXIT body.

    A raised exception travels as ``(pickled exception or None, type name, message,
    traceback)`` so that the caller can still report it when the exception itself will not
    pickle here or unpickle there.
    """
    status, value = outcome
    if status is Status.OK:
        try:
            data, bufs = _serialize.dumps_value(value, what)
            return status, _wire.section_parts(data, bufs)
        except SerializationError as exc:
            status, value = Status.RAISED, (exc, "")
    if status is Status.RAISED:
        error, tb = value
        if not isinstance(error, Exception):
            # SystemExit, KeyboardInterrupt...: never raised as such in the caller's thread
            error = RemoteError(_qualname(type(error)), str(error), tb)
        try:
            blob: bytes | None = _serialize.dumps(error)[0]
        except Exception:
            blob = None
        value = (blob, _qualname(type(error)), str(error), tb)
    data, bufs = _serialize.dumps(value)
    return status, _wire.section_parts(data, bufs)


def _qualname(t: type) -> str:
    module = "__main__" if t.__module__ == "__mp_main__" else t.__module__
    return t.__qualname__ if module == "builtins" else f"{module}.{t.__qualname__}"


# -- the caller's half -------------------------------------------------------------------------
def decode(form: Form, status: Status, payload: Any) -> Any:
    """Turn an outcome into its value, or raise what the caller must see."""
    if form is Form.LOST:
        raise RunnerLost(payload)
    if form is Form.DIRECT:
        if status is Status.OK:
            return payload
        if status is Status.RAISED:
            exc, tb = payload
            if tb:
                exc.__cause__ = RemoteTraceback(tb)
            raise exc
        message = payload
    else:
        data, bufs = _wire.split_section(payload) if isinstance(payload, memoryview) else payload
        if status is Status.OK:
            try:
                return _serialize.loads(data, bufs)
            except Exception as exc:
                raise SerializationError(
                    f"cannot unpickle the result in the caller: {type(exc).__name__}: {exc}"
                ) from exc
        message = _serialize.loads(data, bufs)
        if status is Status.RAISED:
            raise _remote_exception(*message)
    if status is Status.TIMEOUT:
        raise CallTimeout(str(message))
    # the runner was shut down (pool stopped) and the call outlived its shutdown_timeout
    raise PoolClosed(
        f"the call was cancelled on its runner ({message}): the runner was shut down and the "
        "call did not finish within the pool's shutdown_timeout"
    )


def cancelled(form: Form, status: Status, payload: Any) -> bool:
    """Whether an outcome says the work was cancelled (not failed, not done)."""
    return form is not Form.LOST and status is Status.CANCELLED


def _remote_exception(blob: bytes | None, type_name: str, message: str, tb: str) -> BaseException:
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = _serialize.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, tb)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


# -- one call in flight --------------------------------------------------------------------------
_resolve_lock = threading.Lock()

#: what to wake on each loop, collected while a batch of frames (or of pool events) is
#: handled, so that each loop is woken once: futures to resolve, or functions to call
Wakes = dict[asyncio.AbstractEventLoop, list[Any]]


class Waker:
    """How whoever waits is told: a thread blocks on a lock, an asyncio task awaits a future
    on its loop, or, when nobody waits (a cast), a function is called on a loop."""

    __slots__ = ("_fut", "_lock", "_loop", "_then")

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None, then: Callable[..., None] | None
    ) -> None:
        self._loop = loop
        self._then = then
        self._fut: asyncio.Future[None] | None = None
        self._lock: threading.Lock | None = None
        if loop is None:
            self._lock = threading.Lock()
            self._lock.acquire()
        elif then is None:
            self._fut = loop.create_future()

    def _wake(self, wakes: Wakes | None, *args: Any) -> None:
        """Tell the waiter (``then`` gets ``args``); with ``wakes``, an asyncio waiter's
        wake-up is collected there, for :func:`wake_all` to send with others in one go."""
        if self._lock is not None:
            self._lock.release()
            return
        if self._loop is None:
            return
        item: Any = self._fut if self._then is None else functools.partial(self._then, *args)
        if wakes is not None:
            wakes.setdefault(self._loop, []).append(item)
            return
        with contextlib.suppress(RuntimeError):  # the waiter's loop is gone
            self._loop.call_soon_threadsafe(_set_all, [item])

    def wait(self, timeout: float | None) -> bool:
        """A thread's wait (``None``: no limit); False if ``timeout`` passed first."""
        assert self._lock is not None
        return self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0))

    @property
    def future(self) -> asyncio.Future[None]:
        """An asyncio waiter's future."""
        assert self._fut is not None
        return self._fut


class Pending(Waker):
    """A call in flight, resolved once from any thread."""

    __slots__ = (
        "abandoned",
        "call_id",
        "done",
        "form",
        "kind",
        "linked",
        "payload",
        "runner",
        "status",
    )

    def __init__(
        self,
        runner: SlotHolder,
        call_id: int,
        kind: Kind,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        linked: bool = True,
        then: Callable[[Pending], None] | None = None,
    ) -> None:
        super().__init__(loop, then)  # then: called on ``loop`` once resolved (a cast)
        self.runner = runner
        self.call_id = call_id
        self.kind = kind
        self.linked = linked  # the remote work ends if its caller goes away
        self.done = False
        self.abandoned = False
        self.form = Form.LOST
        self.status = Status.CANCELLED
        self.payload: Any = None

    def resolve(self, form: Form, status: Status, payload: Any, wakes: Wakes | None = None) -> None:
        """Deliver the outcome. The slot bookkeeping (:meth:`settle`) is left to the caller,
        off the delivering thread, unless the caller has already stopped waiting."""
        with _resolve_lock:
            if self.done:
                return
            self.done = True
            self.form, self.status, self.payload = form, status, payload
            abandoned = self.abandoned
        if abandoned:
            self.settle()
            return
        self._wake(wakes, self)

    def lose(self, message: str) -> None:
        self.resolve(Form.LOST, Status.CANCELLED, message)

    def abandon(self) -> bool:
        """The caller stops waiting. Returns True if the outcome is already there (then the
        caller still owns it, and must :meth:`settle` it)."""
        with _resolve_lock:
            if self.done:
                return True
            self.abandoned = True
            return False

    def settle(self) -> None:
        """Give back the slot the finished call held (a placed child keeps its own)."""
        if self.form is Form.LOST or self.kind is Kind.CHILD_CALL:
            return
        if self.kind is Kind.CALL or self.status is not Status.OK:
            self.runner.free_slot(self.call_id)

    def value(self) -> Any:
        """The call's result, or the error the caller must see."""
        return decode(self.form, self.status, self.payload)

    async def wait_async(self, timeout: float | None) -> bool:
        assert self._fut is not None
        if not self._fut.done():
            try:
                async with asyncio.timeout(timeout):
                    await self._fut
            except TimeoutError:
                return self.done
        return True


def wake_all(wakes: Wakes) -> None:
    """Wake the asyncio callers collected by :meth:`Pending.resolve`: one wake-up per loop."""
    for loop, futs in wakes.items():
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone
            loop.call_soon_threadsafe(_set_all, futs)


def _set_all(items: list[Any]) -> None:
    for item in items:
        if isinstance(item, asyncio.Future):
            if not item.done():
                item.set_result(None)
        else:
            item()
