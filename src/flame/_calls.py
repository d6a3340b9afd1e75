"""The call path: one skeleton behind ``call``, ``acall``, ``cast``, ``place_child``,
``Child.call`` and ``map``; and ``Child``.

Every call goes through the same steps, written once in :func:`_skeleton`: make sure the
pool is started, pickle the call (on the caller's side, before any runner is used), plan
its deadlines, check a runner slot out, register the call on that runner, send it, wait for
its outcome, give up if the wait ends first, settle the slot, and decode the outcome. The
skeleton is a generator that yields at each step that waits; the sync driver blocks the
caller's thread there (a sync call never hops through the background loop: the caller
writes the frame itself and blocks on its ``Pending``), the async driver awaits. Deadlines:
the ``timeout`` of a call bounds the whole of it (waiting for a slot, booting, running);
left out, waiting is bounded by the pool's ``boot_timeout`` and running by its
``timeout``. On expiry, or when the caller is cancelled, the runner is told to cancel the
work; the slot is given back when the runner confirms (or dies).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Iterator
from typing import Any, Protocol

from . import _loop, _serialize, _wire
from ._errors import CallTimeout, ChildEnded, RunnerLost, SerializationError
from ._link import Section
from ._record import Form, Kind, Pending, Status, cancelled, decode
from ._runner import Runner
from ._sentinel import DEFAULT

logger = logging.getLogger("flame")
_BIG_SEND = 256 * 1024  # larger frames are written from a worker thread, not an event loop


class Queued(Protocol):
    """An asyncio caller's place in a pool's queue."""

    @property
    def future(self) -> asyncio.Future[None]: ...


class CallTarget(Protocol):
    """A pool, as the call path needs it."""

    name: str
    timeout: float | None
    boot_timeout: float
    shutdown_timeout: float
    max: int
    max_concurrency: int

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def pickles_calls(self) -> bool: ...

    @property
    def started(self) -> bool: ...

    def ensure_started(self) -> None: ...

    async def aensure_started(self) -> None: ...

    def checkout(self, deadline: float | None) -> Runner: ...

    def acheckout(self, deadline: float | None) -> Runner | Queued: ...

    def give_up(self, queued: Any) -> None: ...

    def outcome(self, queued: Any) -> Runner: ...

    def checkout_later(
        self, deadline: float | None, then: Callable[[Runner | None, BaseException | None], None]
    ) -> None: ...


# -- the steps that wait, as the skeleton yields them (plain classes: cheap to make) ------------
class _Start:
    __slots__ = ("pool",)

    def __init__(self, pool: CallTarget) -> None:
        self.pool = pool


class _Checkout:
    __slots__ = ("deadline", "pool")

    def __init__(self, pool: CallTarget, deadline: float | None) -> None:
        self.pool, self.deadline = pool, deadline


class _Send:
    __slots__ = ("args", "child_id", "flags", "fn", "pending", "runner", "section", "timeout")

    def __init__(
        self,
        runner: Runner,
        pending: Pending,
        flags: int,
        timeout: float | None,
        fn: Any,
        args: tuple[Any, ...],
        section: Section,
        child_id: int = 0,  # for a call on a placed child
    ) -> None:
        self.runner, self.pending, self.flags, self.timeout = runner, pending, flags, timeout
        self.fn, self.args, self.section, self.child_id = fn, args, section, child_id


class _Wait:
    __slots__ = ("pending", "timeout")

    def __init__(self, pending: Pending, timeout: float | None) -> None:
        self.pending, self.timeout = pending, timeout


_Step = _Start | _Checkout | _Send | _Wait
Skeleton = Generator[_Step, Any, Any]


def _skeleton(
    pool: CallTarget,
    kind: Kind,
    fn: Any,
    args: tuple[Any, ...],
    timeout: Any,
    link: bool,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    child: Child | None = None,
) -> Skeleton:
    """One call, from start to outcome (see the module's docstring). ``kind`` says which:
    a call, placing a child (the result is the :class:`Child`), or a call on ``child``.
    ``loop``: the asyncio caller's loop (``None`` for a thread)."""
    if child is None:
        if not pool.started:
            yield _Start(pool)
        section = encode_call(pool, fn, args)
        wait_deadline, overall, default_run = _plan(pool, timeout)
        runner: Runner = yield _Checkout(pool, wait_deadline)
        limit = _run_timeout(overall, default_run)
    else:
        fn, section = child._prepare(fn, args)
        runner = child._runner
        limit = pool.timeout if timeout is DEFAULT else timeout
    pending = Pending(runner, runner.next_id(), kind, loop, linked=link)
    runner.register(pending)
    flags = _wire.FLAG_LINK if link else 0
    placed: Child | None = None
    if kind is Kind.PLACE:
        placed = Child(pool, runner, pending.call_id, link)
        runner.children[pending.call_id] = placed
        flags |= _wire.FLAG_CHILD
    run_limit = None if kind is Kind.PLACE else limit  # a child lives on after it is built
    child_id = child._id if child is not None else 0
    send = _Send(runner, pending, flags, run_limit, fn, args, section, child_id)
    try:
        if _section_size(section) > _BIG_SEND:
            yield send  # the async driver writes a large frame from a worker thread
        else:
            _send(send)
    except BaseException:
        runner.abort(pending.call_id)
        raise
    try:
        ok = yield _Wait(pending, limit)
    except BaseException:
        if _give_up(pending):
            pending.settle()
        raise
    if not ok and not _give_up(pending):
        raise _timed_out(fn, runner, limit)
    pending.settle()
    if placed is not None:
        pending.value()  # raises what the factory raised
        return placed
    return pending.value()


def _give_up(pending: Pending) -> bool:
    """The caller stops waiting (timeout, cancellation). Returns True if the outcome came
    in meanwhile: the caller owns it, and settles it. Otherwise the runner is told to cancel
    the work (its slot comes back when the runner confirms); a child being placed is
    stopped, and so is one built meanwhile (the caller then still raises)."""
    runner = pending.runner
    assert isinstance(runner, Runner)
    if pending.kind is not Kind.PLACE:
        if pending.abandon():
            return True
        runner.cancel(pending.call_id)
        return False
    if pending.abandon():
        pending.settle()
        if pending.form is not Form.LOST and pending.status is Status.OK:
            runner.stop_child(pending.call_id)
        return False
    runner.stop_child(pending.call_id)
    return False


# -- the drivers ------------------------------------------------------------------------------
def run_sync(skeleton: Skeleton) -> Any:
    """Drive a skeleton in the caller's thread, blocking at each step that waits."""
    step: _Step = next(skeleton)
    try:
        while True:
            try:
                if isinstance(step, _Wait):
                    answer: Any = step.pending.wait(step.timeout)
                elif isinstance(step, _Checkout):
                    answer = step.pool.checkout(step.deadline)
                elif isinstance(step, _Send):
                    _send(step)
                    answer = None
                else:
                    step.pool.ensure_started()
                    answer = None
            except BaseException as exc:
                step = skeleton.throw(exc)
            else:
                step = skeleton.send(answer)
    except StopIteration as stop:
        return stop.value


async def run_async(skeleton: Skeleton) -> Any:
    """Drive a skeleton from an asyncio task, awaiting at each step that waits."""
    step: _Step = next(skeleton)
    try:
        while True:
            try:
                if isinstance(step, _Wait):
                    answer: Any = await step.pending.wait_async(step.timeout)
                elif isinstance(step, _Checkout):
                    got = step.pool.acheckout(step.deadline)
                    if not isinstance(got, Runner):  # queued: the future, and no frame
                        try:
                            await got.future
                        except BaseException:
                            step.pool.give_up(got)
                            raise
                        got = step.pool.outcome(got)
                    answer = got
                elif isinstance(step, _Send):  # a large frame: not from the event loop
                    await asyncio.to_thread(_send, step)
                    answer = None
                else:
                    await step.pool.aensure_started()
                    answer = None
            except BaseException as exc:
                step = skeleton.throw(exc)
            else:
                step = skeleton.send(answer)
    except StopIteration as stop:
        return stop.value


def _send(step: _Send) -> None:
    runner, pending = step.runner, step.pending
    if pending.kind is Kind.CHILD_CALL:
        runner.send_child_call(
            pending.call_id, step.child_id, step.timeout, step.fn, step.args, step.section
        )
    else:
        runner.send_call(
            pending.call_id, step.flags, step.timeout, step.fn, step.args, step.section
        )


# -- the steps that do not wait ----------------------------------------------------------------
def encode_call(pool: CallTarget, fn: Any, args: tuple[Any, ...]) -> Section:
    """The call, pickled if the pool's runners need it (raises ``SerializationError``)."""
    if not callable(fn):
        raise TypeError(f"expected a callable to run on the pool, got {type(fn).__name__}")
    return _serialize.dumps_call(fn, args) if pool.pickles_calls else None


def _plan(pool: CallTarget, timeout: Any) -> tuple[float | None, float | None, float | None]:
    """(deadline for getting a slot, overall deadline, run timeout if no overall deadline)."""
    now = time.monotonic()
    if timeout is DEFAULT:
        return now + pool.boot_timeout, None, pool.timeout
    if timeout is None:
        return None, None, None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
    return now + timeout, now + timeout, None


def _run_timeout(overall: float | None, default: float | None) -> float | None:
    if overall is not None:
        return max(0.0, overall - time.monotonic())
    return default


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


def _timed_out(fn: Any, runner: Runner, limit: float | None) -> CallTimeout:
    return CallTimeout(
        f"{_name(fn)} did not finish on {runner.describe()} within {limit or 0:g}s; "
        "the remote work was cancelled"
    )


def _section_size(section: Section) -> int:
    if section is None:
        return 0
    data, bufs = section
    return int(len(data) + sum(b.nbytes for b in bufs))


# -- the front doors ---------------------------------------------------------------------------
def call(pool: CallTarget, fn: Any, args: tuple[Any, ...], timeout: Any, link: bool) -> Any:
    return run_sync(_skeleton(pool, Kind.CALL, fn, args, timeout, link))


def acall(
    pool: CallTarget, fn: Any, args: tuple[Any, ...], timeout: Any, link: bool
) -> Coroutine[Any, Any, Any]:
    """The coroutine of an ``acall`` (no frame of its own: a queued call costs little)."""
    loop = asyncio.get_running_loop()
    return run_async(_skeleton(pool, Kind.CALL, fn, args, timeout, link, loop=loop))


def place_child(
    pool: CallTarget, factory: Any, args: tuple[Any, ...], timeout: Any, link: bool
) -> Child:
    child: Child = run_sync(_skeleton(pool, Kind.PLACE, factory, args, timeout, link))
    return child


async def aplace_child(
    pool: CallTarget, factory: Any, args: tuple[Any, ...], timeout: Any, link: bool
) -> Child:
    loop = asyncio.get_running_loop()
    skeleton = _skeleton(pool, Kind.PLACE, factory, args, timeout, link, loop=loop)
    child: Child = await run_async(skeleton)
    return child


def cast(pool: CallTarget, fn: Any, args: tuple[Any, ...], link: bool) -> None:
    pool.ensure_started()
    _Cast(pool, fn, args, link).queue()


class _Cast:
    """A call nobody waits for. Queued, it is a waiter of the pool with this object to call
    once a slot is its own (no task, no thread, no timer: a few hundred bytes); in flight, a
    ``Pending`` whose outcome is looked at on the pool's loop only to log a failure. Its run
    time is bounded on the runner (the pool's ``timeout``), and a lost runner fails it like
    any call. The call is pickled at once, so a ``SerializationError`` is the caller's."""

    __slots__ = ("args", "flags", "fn", "link", "pool", "section")

    def __init__(self, pool: CallTarget, fn: Any, args: tuple[Any, ...], link: bool) -> None:
        self.pool, self.fn, self.args, self.link = pool, fn, args, link
        self.section = encode_call(pool, fn, args)
        self.flags = _wire.FLAG_CAST | (_wire.FLAG_LINK if link else 0)

    def queue(self) -> None:
        self.pool.checkout_later(time.monotonic() + self.pool.boot_timeout, self.assigned)

    def assigned(self, runner: Runner | None, error: BaseException | None) -> None:
        if runner is None:
            self.failed(error or RuntimeError("no runner"))
            return
        pending = Pending(
            runner, runner.next_id(), Kind.CALL, self.pool.loop, linked=self.link, then=self.done
        )
        runner.register(pending)
        if _section_size(self.section) > _BIG_SEND and _loop.in_loop_thread():
            self.pool.loop.run_in_executor(None, self.send, runner, pending)  # not on the loop
        else:
            self.send(runner, pending)

    def send(self, runner: Runner, pending: Pending) -> None:
        try:
            runner.send_call(
                pending.call_id, self.flags, self.pool.timeout, self.fn, self.args, self.section
            )
        except Exception as exc:
            runner.abort(pending.call_id)
            self.failed(exc)

    def done(self, pending: Pending) -> None:
        pending.settle()
        if pending.form is Form.LOST or pending.status is not Status.OK:
            try:
                pending.value()
            except Exception as exc:
                self.failed(exc)

    def failed(self, exc: BaseException) -> None:
        logger.error(
            "flame.cast of %s on pool %r failed: %s",
            _name(self.fn),
            self.pool.name,
            exc,
            exc_info=exc,
        )


# -- placed children -------------------------------------------------------------------------------
class Child:
    """A handle on an object placed on a runner with :func:`flame.place_child`.

    The object lives on the runner, in one concurrency slot, until its ``run()`` returns or
    raises, :meth:`stop` is called, or the runner goes away. It is never restarted.
    """

    def __init__(self, pool: CallTarget, runner: Runner, child_id: int, link: bool) -> None:
        self._pool = pool
        self._runner = runner
        self._id = child_id
        self.link = link
        self._ended_event = threading.Event()
        self._outcome: tuple[Form, Status, Any] | None = None
        self._stop_requested = False

    def __repr__(self) -> str:
        state = "alive" if self.alive else "ended"
        return f"<flame.Child {self._id} on {self._runner.describe()} {state}>"

    @property
    def alive(self) -> bool:
        """True until the child has ended."""
        return not self._ended_event.is_set()

    def _ended(self, form: Form, status: Status, payload: Any) -> None:
        if self._ended_event.is_set():
            return
        self._outcome = (form, status, payload)
        self._ended_event.set()

    def _prepare(self, method: Any, args: tuple[Any, ...]) -> tuple[str, Section]:
        if not self.alive:
            raise ChildEnded(f"{self!r} has ended; it is never restarted")
        name = method if isinstance(method, str) else getattr(method, "__name__", None)
        if not isinstance(name, str):
            raise TypeError(f"method must be a method name or a method, got {method!r}")
        if not self._pool.pickles_calls:
            return name, None
        try:
            return name, _serialize.dumps((name, _serialize.mark_args(args)))
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle the arguments of {name}(): {type(exc).__name__}: {exc}"
            ) from exc

    def call(self, method: Any, /, *args: Any, timeout: Any = DEFAULT) -> Any:
        """Call ``method`` (a name) of the remote object with ``args``; return its result."""
        skeleton = _skeleton(
            self._pool, Kind.CHILD_CALL, method, args, timeout, self.link, child=self
        )
        return run_sync(skeleton)

    async def acall(self, method: Any, /, *args: Any, timeout: Any = DEFAULT) -> Any:
        """The async form of :meth:`call`."""
        loop = asyncio.get_running_loop()
        skeleton = _skeleton(
            self._pool, Kind.CHILD_CALL, method, args, timeout, self.link, loop=loop, child=self
        )
        return await run_async(skeleton)

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the child to end; return what its ``run()`` returned, or raise what it
        raised. Returns ``None`` for a child ended by :meth:`stop`."""
        if not self._ended_event.wait(timeout):
            raise CallTimeout(f"{self!r} did not end within {timeout:g}s")
        return self._result()

    def _result(self) -> Any:
        assert self._outcome is not None
        form, status, payload = self._outcome
        if form is Form.LOST:
            raise RunnerLost(payload)
        if cancelled(form, status, payload):
            if self._stop_requested:
                return None
            raise ChildEnded(f"{self!r} was cancelled")
        return decode(form, status, payload)

    def stop(self) -> None:
        """End the child (calling its ``close()`` if it has one) and wait for it to end."""
        if not self.alive:
            return
        self._stop_requested = True
        self._runner.stop_child(self._id)
        self._ended_event.wait(self._pool.shutdown_timeout + 10.0)

    async def astop(self) -> None:
        """The async form of :meth:`stop`."""
        if not self.alive:
            return
        self._stop_requested = True
        self._runner.stop_child(self._id)
        await asyncio.to_thread(self._ended_event.wait, self._pool.shutdown_timeout + 10.0)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Child:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()


# -- map -------------------------------------------------------------------------------------------
def _window(pool: CallTarget) -> int:
    return max(1, min(pool.max * pool.max_concurrency, 256))


def map_(
    pool: CallTarget, fn: Any, iterable: Iterable[Any], timeout: float | None
) -> Iterator[Any]:
    """``pool.map``: the items' calls run as tasks on the background loop (no thread per
    item in flight), at most ``_window(pool)`` of them at once; results come back in order.

    The caller's thread reads the iterable and hands items to the loop in batches (one
    wake-up of the loop per batch, not per item): the whole window at first, then half a
    window whenever that much room has come free."""
    pool.ensure_started()
    deadline = None if timeout is None else time.monotonic() + timeout
    loop = pool.loop
    tasks: dict[int, asyncio.Task[Any]] = {}  # filled and emptied on the loop

    def start(batch: list[tuple[Any, concurrent.futures.Future[Any]]]) -> None:
        for item, out in batch:
            if out.cancelled():
                continue
            t: Any = DEFAULT if deadline is None else max(0.0, deadline - time.monotonic())
            task = loop.create_task(acall(pool, fn, (item,), t, True))
            tasks[id(out)] = task
            task.add_done_callback(functools.partial(_settle_map_item, out, tasks))

    window = _window(pool)
    refill = max(1, window // 2)
    futures: deque[concurrent.futures.Future[Any]] = deque()
    batch: list[tuple[Any, concurrent.futures.Future[Any]]] = []
    items = iter(iterable)
    try:
        while True:
            room = window - len(futures)
            if room >= refill or not futures:
                for item in itertools.islice(items, room):
                    out: concurrent.futures.Future[Any] = concurrent.futures.Future()
                    futures.append(out)
                    batch.append((item, out))
                if batch:
                    loop.call_soon_threadsafe(start, batch)
                    batch = []
            if not futures:
                return
            yield futures.popleft().result()
    finally:
        if futures:
            for f in futures:
                f.cancel()

            def cancel_all() -> None:
                for task in list(tasks.values()):
                    task.cancel()

            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(cancel_all)


def _settle_map_item(
    out: concurrent.futures.Future[Any],
    tasks: dict[int, asyncio.Task[Any]],
    task: asyncio.Task[Any],
) -> None:
    tasks.pop(id(out), None)
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # the caller left
        if task.cancelled():
            out.cancel()
        elif (exc := task.exception()) is not None:
            out.set_exception(exc)
        else:
            out.set_result(task.result())


async def amap(
    pool: CallTarget, fn: Any, iterable: Iterable[Any], timeout: float | None
) -> AsyncIterator[Any]:
    await pool.aensure_started()
    deadline = None if timeout is None else time.monotonic() + timeout
    window = _window(pool)
    tasks: deque[asyncio.Task[Any]] = deque()

    def start(item: Any) -> None:
        t: Any = DEFAULT if deadline is None else max(0.0, deadline - time.monotonic())
        tasks.append(asyncio.ensure_future(acall(pool, fn, (item,), t, True)))

    try:
        for item in iterable:
            start(item)
            if len(tasks) >= window:
                yield await tasks.popleft()
        while tasks:
            yield await tasks.popleft()
    finally:
        for t in tasks:
            t.cancel()
