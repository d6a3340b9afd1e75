"""The call path: ``call``, ``acall``, ``cast``, ``place_child`` and ``map``, and ``Child``.

A sync call never hops through the background loop: the caller's thread pickles the call,
checks a runner slot out of the pool, writes the frame itself, and blocks on its ``Pending``
until the loop thread delivers the reply. Async calls do the same from their own loop and
await instead. Deadlines: the ``timeout`` of a call bounds the whole of it (waiting for a
slot, booting, running); left out, waiting is bounded by the pool's ``boot_timeout`` and
running by its ``timeout``. On expiry, or when the caller is cancelled, the runner is told
to cancel the work; the slot is given back when the runner confirms (or dies).
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
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import _serialize, _wire
from ._errors import CallTimeout, ChildEnded, RunnerLost, SerializationError
from ._runner import DIRECT, LOST, BaseRunner, Pending, decode

if TYPE_CHECKING:
    from ._pool import Pool

logger = logging.getLogger("flame")
_BIG_SEND = 256 * 1024  # larger frames are written from a worker thread, not an event loop


from ._sentinel import DEFAULT  # noqa: E402 - "use the pool's default" for timeout


def _serialize_call(pool: Pool, fn: Any, args: tuple[Any, ...]) -> Any:
    if not callable(fn):
        raise TypeError(f"expected a callable to run on the pool, got {type(fn).__name__}")
    if pool.backend.in_process and not getattr(pool.backend, "serialize", False):
        return None
    return _serialize.dumps_call(fn, args)


def _plan(pool: Pool, timeout: Any) -> tuple[float | None, float | None, float | None]:
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


def _timed_out(fn: Any, runner: BaseRunner, limit: float | None) -> CallTimeout:
    return CallTimeout(
        f"{_name(fn)} did not finish on {runner.describe()} within {limit or 0:g}s; "
        "the remote work was cancelled"
    )


def _send(
    runner: BaseRunner,
    call_id: int,
    flags: int,
    timeout: float | None,
    fn: Any,
    args: tuple[Any, ...],
    section: Any,
) -> None:
    try:
        runner.send_call(call_id, flags, timeout, fn, args, section)
    except BaseException:
        runner.pending.pop(call_id, None)
        runner.children.pop(call_id, None)
        if not runner.gone:
            runner.pool._release(runner)
        raise


def _register(
    runner: BaseRunner,
    kind: str,
    loop: asyncio.AbstractEventLoop | None = None,
    call_id: int | None = None,
) -> tuple[int, Pending]:
    """A new call in flight on ``runner``, whose outcome this caller will wait for."""
    if call_id is None:
        call_id = runner.next_id()
    pending = Pending(runner, loop, kind)
    pending.call_id = call_id
    runner.pending[call_id] = pending
    return call_id, pending


def _give_up(pending: Pending) -> bool:
    """The caller stops waiting (timeout, cancellation). If the outcome came in meanwhile,
    settle it and return True; otherwise tell the runner to cancel the work."""
    if pending.abandon():
        pending.settle()
        return True
    pending.runner.cancel(pending.call_id)
    return False


def _give_up_placing(pending: Pending) -> bool:
    """Like :func:`_give_up`, for a child being placed: a child built meanwhile is stopped."""
    if pending.abandon():
        pending.settle()
        if pending.status == _wire.STATUS_OK:
            pending.runner.stop_child(pending.call_id)
        return False
    pending.runner.stop_child(pending.call_id)
    return False


def _section_size(section: Any) -> int:
    if section is None:
        return 0
    data, bufs = section
    return int(len(data) + sum(b.nbytes for b in bufs))


def call(pool: Pool, fn: Any, args: tuple[Any, ...], timeout: Any, link: bool) -> Any:
    pool._ensure_started()
    section = _serialize_call(pool, fn, args)
    wait_deadline, overall, default_run = _plan(pool, timeout)
    runner = pool.checkout(wait_deadline)
    limit = _run_timeout(overall, default_run)
    call_id, pending = _register(runner, "call")
    _send(runner, call_id, _wire.FLAG_LINK if link else 0, limit, fn, args, section)
    try:
        ok = pending.wait(limit)
    except BaseException:
        _give_up(pending)
        raise
    if not ok and not _give_up(pending):
        raise _timed_out(fn, runner, limit)
    pending.settle()
    return decode(pending)


async def acall(pool: Pool, fn: Any, args: tuple[Any, ...], timeout: Any, link: bool) -> Any:
    await pool._aensure_started()
    section = _serialize_call(pool, fn, args)
    wait_deadline, overall, default_run = _plan(pool, timeout)
    runner = await pool.acheckout(wait_deadline)
    limit = _run_timeout(overall, default_run)
    call_id, pending = _register(runner, "call", asyncio.get_running_loop())
    flags = _wire.FLAG_LINK if link else 0
    try:
        if _section_size(section) > _BIG_SEND:
            await asyncio.to_thread(_send, runner, call_id, flags, limit, fn, args, section)
        else:
            _send(runner, call_id, flags, limit, fn, args, section)
        ok = await pending.wait_async(limit)
    except asyncio.CancelledError:
        _give_up(pending)
        raise
    if not ok and not _give_up(pending):
        raise _timed_out(fn, runner, limit)
    pending.settle()
    return decode(pending)


_casts: set[asyncio.Task[None]] = set()


def cast(pool: Pool, fn: Any, args: tuple[Any, ...], link: bool) -> None:
    pool._ensure_started()
    section = _serialize_call(pool, fn, args)
    loop = pool._loop

    async def run() -> None:
        try:
            runner = await pool.acheckout(time.monotonic() + pool.boot_timeout)
            call_id, pending = _register(runner, "call", loop)
            flags = _wire.FLAG_CAST | (_wire.FLAG_LINK if link else 0)
            if _section_size(section) > _BIG_SEND:
                await asyncio.to_thread(
                    _send, runner, call_id, flags, pool.timeout, fn, args, section
                )
            else:
                _send(runner, call_id, flags, pool.timeout, fn, args, section)
            if not await pending.wait_async(pool.timeout) and not _give_up(pending):
                raise _timed_out(fn, runner, pool.timeout)
            pending.settle()
            await asyncio.to_thread(decode, pending)
        except Exception as exc:
            logger.error(
                "flame.cast of %s on pool %r failed: %s", _name(fn), pool.name, exc, exc_info=exc
            )

    def start() -> None:
        task = loop.create_task(run())
        _casts.add(task)
        task.add_done_callback(_casts.discard)

    loop.call_soon_threadsafe(start)


# -- placed children -------------------------------------------------------------------------------
class Child:
    """A handle on an object placed on a runner with :func:`flame.place_child`.

    The object lives on the runner, in one concurrency slot, until its ``run()`` returns or
    raises, :meth:`stop` is called, or the runner goes away. It is never restarted.
    """

    def __init__(self, pool: Pool, runner: BaseRunner, child_id: int, link: bool) -> None:
        self._pool = pool
        self._runner = runner
        self._id = child_id
        self.link = link
        self._ended_event = threading.Event()
        self._status: int | None = None
        self._payload: Any = None
        self._stop_requested = False

    def __repr__(self) -> str:
        state = "alive" if self.alive else "ended"
        return f"<flame.Child {self._id} on {self._runner.describe()} {state}>"

    @property
    def alive(self) -> bool:
        """True until the child has ended."""
        return not self._ended_event.is_set()

    def _ended(self, status: int, payload: Any) -> None:
        if self._ended_event.is_set():
            return
        self._status, self._payload = status, payload
        self._ended_event.set()

    def _prepare(self, method: Any, args: tuple[Any, ...]) -> tuple[str, Any]:
        if not self.alive:
            raise ChildEnded(f"{self!r} has ended; it is never restarted")
        name = method if isinstance(method, str) else getattr(method, "__name__", None)
        if not isinstance(name, str):
            raise TypeError(f"method must be a method name or a method, got {method!r}")
        pool = self._pool
        if pool.backend.in_process and not getattr(pool.backend, "serialize", False):
            return name, None
        try:
            return name, _serialize.dumps((name, _serialize.mark_args(args)))
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle the arguments of {name}(): {type(exc).__name__}: {exc}"
            ) from exc

    def call(self, method: Any, /, *args: Any, timeout: Any = DEFAULT) -> Any:
        """Call ``method`` (a name) of the remote object with ``args``; return its result."""
        name, section = self._prepare(method, args)
        limit = self._pool.timeout if timeout is DEFAULT else timeout
        runner = self._runner
        call_id, pending = _register(runner, "child_call")
        try:
            runner.send_child_call(call_id, self._id, limit, name, args, section)
        except BaseException:
            runner.pending.pop(call_id, None)
            raise
        try:
            ok = pending.wait(limit)
        except BaseException:
            _give_up(pending)
            raise
        if not ok and not _give_up(pending):
            raise _timed_out(name, runner, limit)
        return decode(pending)

    async def acall(self, method: Any, /, *args: Any, timeout: Any = DEFAULT) -> Any:
        """The async form of :meth:`call`."""
        name, section = self._prepare(method, args)
        limit = self._pool.timeout if timeout is DEFAULT else timeout
        runner = self._runner
        call_id, pending = _register(runner, "child_call", asyncio.get_running_loop())
        try:
            runner.send_child_call(call_id, self._id, limit, name, args, section)
            ok = await pending.wait_async(limit)
        except asyncio.CancelledError:
            _give_up(pending)
            raise
        if not ok and not _give_up(pending):
            raise _timed_out(name, runner, limit)
        return decode(pending)

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the child to end; return what its ``run()`` returned, or raise what it
        raised. Returns ``None`` for a child ended by :meth:`stop`."""
        if not self._ended_event.wait(timeout):
            raise CallTimeout(f"{self!r} did not end within {timeout:g}s")
        return self._result()

    def _result(self) -> Any:
        status, payload = self._status, self._payload
        assert status is not None
        if status == LOST:
            raise RunnerLost(payload)
        stopped = status == _wire.STATUS_CANCELLED or (
            status == DIRECT and payload[0] == _wire.STATUS_CANCELLED
        )
        if stopped:
            if self._stop_requested:
                return None
            raise ChildEnded(f"{self!r} was cancelled")
        p = Pending(self._runner, kind="child_call")
        p.resolve(status, payload)
        return decode(p)

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


def _placing(pool: Pool, runner: BaseRunner, link: bool) -> tuple[int, Child, int]:
    call_id = runner.next_id()
    child = Child(pool, runner, call_id, link)
    runner.children[call_id] = child
    flags = _wire.FLAG_CHILD | (_wire.FLAG_LINK if link else 0)
    return call_id, child, flags


def place_child(pool: Pool, factory: Any, args: tuple[Any, ...], timeout: Any, link: bool) -> Child:
    pool._ensure_started()
    section = _serialize_call(pool, factory, args)
    wait_deadline, overall, default_run = _plan(pool, timeout)
    runner = pool.checkout(wait_deadline)
    limit = _run_timeout(overall, default_run)
    call_id, child, flags = _placing(pool, runner, link)
    pending = _register(runner, "place", call_id=call_id)[1]
    _send(runner, call_id, flags, None, factory, args, section)
    try:
        ok = pending.wait(limit)
    except BaseException:
        _give_up_placing(pending)
        raise
    if not ok and not _give_up_placing(pending):
        raise _timed_out(factory, runner, limit)
    pending.settle()
    decode(pending)
    return child


async def aplace_child(
    pool: Pool, factory: Any, args: tuple[Any, ...], timeout: Any, link: bool
) -> Child:
    await pool._aensure_started()
    section = _serialize_call(pool, factory, args)
    wait_deadline, overall, default_run = _plan(pool, timeout)
    runner = await pool.acheckout(wait_deadline)
    limit = _run_timeout(overall, default_run)
    call_id, child, flags = _placing(pool, runner, link)
    pending = _register(runner, "place", asyncio.get_running_loop(), call_id=call_id)[1]
    try:
        _send(runner, call_id, flags, None, factory, args, section)
        ok = await pending.wait_async(limit)
    except asyncio.CancelledError:
        _give_up_placing(pending)
        raise
    if not ok and not _give_up_placing(pending):
        raise _timed_out(factory, runner, limit)
    pending.settle()
    decode(pending)
    return child


# -- map -------------------------------------------------------------------------------------------
def _window(pool: Pool) -> int:
    return max(1, min(pool.max * pool.max_concurrency, 256))


def map_(pool: Pool, fn: Any, iterable: Iterable[Any], timeout: float | None) -> Iterator[Any]:
    """``pool.map``: the items' calls run as tasks on the background loop (no thread per
    item in flight), at most ``_window(pool)`` of them at once; results come back in order.

    The caller's thread reads the iterable and hands items to the loop in batches (one
    wake-up of the loop per batch, not per item): the whole window at first, then half a
    window whenever that much room has come free."""
    pool._ensure_started()
    deadline = None if timeout is None else time.monotonic() + timeout
    loop = pool._loop
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
    pool: Pool, fn: Any, iterable: Iterable[Any], timeout: float | None
) -> AsyncIterator[Any]:
    await pool._aensure_started()
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
