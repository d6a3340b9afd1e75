"""``flame.Pool``: options, life cycle, the name registry, and the shell around the scaling core.

The pool's rules live in ``flame._scaling`` (pure). This module feeds it events and carries
out what it answers: it boots runners (as tasks on the background loop), hands runners to
waiting callers, retires runners, fails callers, runs the hooks and keeps the timers. The
core is guarded by one ``threading.Lock``, so a sync caller checks a runner out from its
own thread without a hop through the loop; every action taken under that lock is a cheap,
non-blocking hand-off (hooks, for instance, are queued onto the loop, never run under it).

Calls themselves (``call``/``acall``/``cast``/``place_child``/``map``) are in ``flame._calls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

from . import _calls, _lifecycle, _loop, _parent, _scaling, _tls
from ._calls import Child
from ._errors import BootError, CallTimeout, PoolClosed, PoolNotFound
from ._parent import parent as _current_parent
from ._record import Waker, Wakes, wake_all
from ._runner import Runner, RunnerSpec
from ._sentinel import DEFAULT as _DEFAULT
from ._settings import resolve_backend, settings
from ._wire import RunnerConfig
from .backends._base import Backend

if TYPE_CHECKING:
    from types import TracebackType

T = TypeVar("T")
R = TypeVar("R")
Ts = TypeVarTuple("Ts")

logger = logging.getLogger("flame")

#: every pool that is not stopped, by name: only stop() frees a name (a pool made in an
#: AppConfig.ready() and not kept is still callable by name); started pools are in _running
_registry: dict[str, Pool] = {}
_running: set[Pool] = set()
_registry_lock = threading.Lock()
_KILL_GRACE = 5.0
#: at interpreter exit, how long flame waits for the backends to release the runners
_EXIT_BUDGET = 1.5


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool, as returned by :meth:`Pool.stats`."""

    runners: int  # booted and serving
    booting: int
    retiring: int
    in_flight: int  # calls, casts and placed children running
    waiting: int  # callers queued for a slot
    min: int
    max: int
    max_concurrency: int


class _Waiter(Waker):
    """A caller waiting for a runner: a thread, an asyncio task, or a cast (a function
    called on the pool's loop, no task at all), told as :class:`flame._record.Waker` says."""

    __slots__ = ("done", "error", "runner", "wid")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None,
        then: Callable[[Runner | None, BaseException | None], None] | None = None,
    ) -> None:
        super().__init__(loop, then)
        self.done = False
        self.wid = 0  # its number in the pool's queue
        self.runner: Runner | None = None
        self.error: BaseException | None = None

    def assign(self, runner: Runner, wakes: Wakes) -> None:  # under the pool lock
        self.runner = runner
        self.done = True
        self._wake(wakes, runner, None)

    def fail(self, error: BaseException, wakes: Wakes) -> None:  # under the pool lock
        self.error = error
        self.done = True
        self._wake(wakes, None, error)


def _check_time(name: str, value: Any, *, allow_none: bool) -> float | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number of seconds, not None")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or math.isnan(value):
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


class Pool:
    """An elastic pool of runners: copies of this app, booted on demand.

    Args:
        name: the pool's name, under which a started pool is registered (``flame.call(name, ...)``).
        max: the most runners the pool ever has at once, booting ones included.
        min: runners kept up from :meth:`start` on (forced to 0 inside a runner).
        max_concurrency: calls (and placed children) one runner serves at once.
        backend: a :class:`flame.Backend`, or ``"local"``, ``"process"``, ``"fly"``,
            ``"kubernetes"``; ``None`` picks the configured default (``flame.configure``,
            then ``FLAME_BACKEND``, then ``"local"``).
        timeout: default bound on running a call (seconds; ``None``: no limit).
        boot_timeout: bound on booting a runner, and by default on waiting for one.
        shutdown_timeout: how long in-flight work may take to finish on stop or drain.
        idle_shutdown_after: runners beyond ``min`` shut down after this long without work
            (``None``: never). Or ``(seconds, check)``: only once ``check()``, run on the
            runner, also returns true.
        min_idle_shutdown_after: the same for the ``min`` runners (default ``None``: never).
        single_use: each runner serves one call, then shuts down (``min`` is still kept).
        on_grow_start, on_grow_end, on_shrink: hooks, called with ``meta`` (``{"name",
            "count"}``); ``on_grow_end(result, meta)`` gets ``"ok"`` or the exception.
        log: ``False``, or a logging level at which pool events are logged on ``flame``.
        boot_ahead: start booting the next runner when fewer than this many free slots
            remain while work is in flight (0: boot only for callers already waiting).
        tls: encrypt the connections to this pool's runners with TLS 1.3. The parent makes
            an ephemeral self-signed certificate, and each runner accepts only that
            certificate (its fingerprint travels in ``FLAME_PARENT``). Needs
            ``pip install 'flame-py[tls]'``. Off by default: the connection is always
            authenticated (HMAC handshake), and with ``tls`` also confidential.
        forward_output: every line a runner writes to its stdout or stderr (print,
            logging, warnings, tracebacks, also from C code and subprocesses) reaches this
            process's own stdout or stderr as it is written, prefixed ``[<runner id>] ``,
            through the runner's connection, on every backend (default). ``False``: the
            runner's output goes where the backend puts it (the inherited terminal, the
            platform's logs), line by line.

    Use ``with Pool(...) as pool:`` / ``async with``, or :meth:`start` and :meth:`stop`.
    A pool that is used before being started starts itself.
    """

    def __init__(
        self,
        name: str,
        *,
        max: int,
        min: int = 0,
        max_concurrency: int = 100,
        backend: Backend | str | None = None,
        timeout: float | None = 30.0,
        boot_timeout: float = 30.0,
        shutdown_timeout: float = 30.0,
        idle_shutdown_after: float | tuple[float, Callable[[], bool]] | None = 30.0,
        min_idle_shutdown_after: float | None = None,
        single_use: bool = False,
        on_grow_start: Callable[[dict[str, Any]], Any] | None = None,
        on_grow_end: Callable[[Any, dict[str, Any]], Any] | None = None,
        on_shrink: Callable[[dict[str, Any]], Any] | None = None,
        log: bool | int | str = False,
        boot_ahead: int = 0,
        tls: bool = False,
        forward_output: bool = True,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        for opt, val, low in (
            ("max", max, 1),
            ("min", min, 0),
            ("max_concurrency", max_concurrency, 1),
            ("boot_ahead", boot_ahead, 0),
        ):
            if isinstance(val, bool) or not isinstance(val, int):
                raise ValueError(f"{opt} must be an int, got {val!r}")
            if val < low:
                raise ValueError(f"{opt} must be >= {low}, got {val}")
        if max < min:
            raise ValueError(f"max ({max}) must be >= min ({min})")
        self.timeout = _check_time("timeout", timeout, allow_none=True)
        self.boot_timeout: float = _check_time("boot_timeout", boot_timeout, allow_none=False)  # type: ignore[assignment]
        self.shutdown_timeout: float = _check_time(  # type: ignore[assignment]
            "shutdown_timeout", shutdown_timeout, allow_none=False
        )
        check: Callable[[], bool] | None = None
        if isinstance(idle_shutdown_after, tuple):
            if len(idle_shutdown_after) != 2 or not callable(idle_shutdown_after[1]):
                raise ValueError(
                    "idle_shutdown_after must be seconds, None, or a (seconds, check) tuple "
                    "whose check is callable"
                )
            idle_secs, check = idle_shutdown_after
            self._idle_after = _check_time("idle_shutdown_after", idle_secs, allow_none=True)
        else:
            self._idle_after = _check_time(
                "idle_shutdown_after", idle_shutdown_after, allow_none=True
            )
        self.idle_shutdown_after = idle_shutdown_after
        self.min_idle_shutdown_after = _check_time(
            "min_idle_shutdown_after", min_idle_shutdown_after, allow_none=True
        )
        for hook_name, hook in (
            ("on_grow_start", on_grow_start),
            ("on_grow_end", on_grow_end),
            ("on_shrink", on_shrink),
        ):
            if hook is not None and not callable(hook):
                raise ValueError(f"{hook_name} must be callable or None, got {hook!r}")
        if log is not False and not isinstance(log, bool | int | str):
            raise ValueError(f"log must be False or a logging level, got {log!r}")
        self.name = name
        self.max = max
        self.min = 0 if _current_parent() is not None else min
        self.max_concurrency = max_concurrency
        self.single_use = bool(single_use)
        self.on_grow_start = on_grow_start
        self.on_grow_end = on_grow_end
        self.on_shrink = on_shrink
        self.log = log
        self.boot_ahead = boot_ahead
        if not isinstance(tls, bool):
            raise ValueError(f"tls must be True or False, got {tls!r}")
        if not isinstance(forward_output, bool):
            raise ValueError(f"forward_output must be True or False, got {forward_output!r}")
        self.forward_output = forward_output
        if tls:
            _tls.require()
        self.tls = tls
        self.backend: Backend = resolve_backend(backend)
        self._idle_check = check
        self._lock = threading.Lock()
        self._core = self._new_core()
        self._runners: dict[int, Runner] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._boot_tasks: dict[int, asyncio.Task[None]] = {}
        self._next_waiter = 0
        self._state = "new"
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = math.inf  # when the timer is set for (loop thread)
        self._wake_asked = math.inf  # the earliest Wake asked of the loop (under the lock)
        self._stopped: asyncio.Event | None = None
        self._gone_event: asyncio.Event | None = None
        self._start_lock = threading.Lock()
        _register(self)

    def _new_core(self) -> _scaling.Scaler:
        return _scaling.Scaler(
            min=self.min,
            max=self.max,
            max_concurrency=self.max_concurrency,
            single_use=self.single_use,
            idle_shutdown_after=self._idle_after,
            min_idle_shutdown_after=self.min_idle_shutdown_after,
            boot_ahead=self.boot_ahead,
        )

    # -- introspection -------------------------------------------------------------------------
    def stats(self) -> PoolStats:
        """A snapshot of the pool: runners, boots, work in flight and callers waiting."""
        with self._lock:
            core = self._core
            return PoolStats(
                runners=core.count(_scaling.RState.READY),
                booting=core.count(_scaling.RState.BOOTING),
                retiring=core.count(_scaling.RState.RETIRING),
                in_flight=core.in_flight(),
                waiting=len(core.waiters),
                min=self.min,
                max=self.max,
                max_concurrency=self.max_concurrency,
            )

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<Pool {self.name!r} runners={s.runners} booting={s.booting} "
            f"in_flight={s.in_flight} waiting={s.waiting}>"
        )

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> Pool:
        """Boot ``min`` runners, register the pool under its name, and return it.

        Raises :class:`flame.BootError` if one of the ``min`` runners cannot boot.
        """
        _loop.run(self.astart())
        return self

    async def astart(self) -> Pool:
        """The async form of :meth:`start`."""
        await _loop.arun(self._start())
        return self

    async def _start(self) -> None:
        if self._state == "started":
            return
        if self._state != "new":
            raise PoolClosed(f"pool {self.name!r} was stopped; create a new Pool to start again")
        with _registry_lock:
            _running.add(self)
        self._stopped = asyncio.Event()
        self._gone_event = asyncio.Event()
        with self._lock:
            self._state = "started"
            self._apply(self._core.start(time.monotonic()))
        # _apply queued the boots with call_soon_threadsafe on this very loop: let them
        # start, so that the min runners are awaited below
        await asyncio.sleep(0)
        tasks = list(self._boot_tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
            with self._lock:
                ready = self._core.count(_scaling.RState.READY)
            if ready < self.min:
                error = getattr(self, "_last_boot_error", None)
                await self._stop()
                raise BootError(
                    f"pool {self.name!r} could not boot its min={self.min} runners: {error}"
                ) from error
        self._log(f"pool {self.name!r} started ({self.backend.name} backend)")

    @property
    def started(self) -> bool:
        """Whether the pool is started (and not stopping)."""
        return self._state == "started"

    def ensure_started(self) -> None:
        if self._state == "started":
            return
        _parent.check_not_importing(self.name)
        if self._state == "new":
            with self._start_lock:
                if self._state == "new":
                    self.start()
                    return
        self._check_taking_calls()

    async def aensure_started(self) -> None:
        if self._state == "started":
            return
        _parent.check_not_importing(self.name)
        if self._state == "new":
            await self.astart()
            return
        self._check_taking_calls()

    def stop(self) -> None:
        """Stop taking calls, let in-flight work finish within ``shutdown_timeout``, and
        shut every runner down; the pool's name is free again. Safe to call more than once."""
        if self._state == "new":
            self._state = "stopped"
            _unregister(self)
            return
        _loop.run(self._stop())

    async def astop(self) -> None:
        """The async form of :meth:`stop`."""
        if self._state == "new":
            self._state = "stopped"
            _unregister(self)
            return
        await _loop.arun(self._stop())

    async def _stop(self) -> None:
        assert self._stopped is not None and self._gone_event is not None
        if self._state in ("stopping", "stopped"):
            await self._stopped.wait()
            return
        _unregister(self)
        with self._lock:
            self._state = "stopping"
            self._apply(self._core.stop(time.monotonic()))
        deadline = self.shutdown_timeout + _KILL_GRACE
        try:
            async with asyncio.timeout(deadline):
                while self._runners:
                    self._gone_event.clear()
                    await self._gone_event.wait()
        except TimeoutError:
            pass
        for runner in list(self._runners.values()):
            with contextlib.suppress(Exception):
                await runner.kill()
        for task in list(self._boot_tasks.values()):
            task.cancel()
        if self._wake is not None:
            self._wake.cancel()
        try:
            await self.backend.aclose()
        except Exception as exc:
            self.log_error(f"backend close failed: {exc!r}")
        self._state = "stopped"
        self._stopped.set()
        with _registry_lock:
            _running.discard(self)
        self._log(f"pool {self.name!r} stopped")

    async def _stop_at_exit(self) -> None:
        """The interpreter is exiting: stop now, without waiting for the runners' work.
        Each runner loses its parent: its linked work is terminated, its unlinked work
        finishes there, and then it exits by itself; the others are stopped at once."""
        if self._state != "started":
            return
        _unregister(self)
        with self._lock:
            self._state = "stopping"
            for a in self._core.stop(time.monotonic()):
                if isinstance(a, _scaling.Fail):  # waiting callers: PoolClosed
                    self._apply([a])
        for task in list(self._boot_tasks.values()):
            task.cancel()
        if self._wake is not None:
            self._wake.cancel()
        await asyncio.gather(*(r.leave() for r in list(self._runners.values())))
        with contextlib.suppress(Exception):
            await self.backend.aclose()
        self._state = "stopped"
        with _registry_lock:
            _running.discard(self)

    def _after_fork(self) -> None:
        """In a child forked from this process: this pool starts afresh on first use, with
        nothing of the parent's (its runners, their connections, its locks)."""
        _lifecycle.bury(self._runners, self._waiters, self._boot_tasks, self._lock, self._wake)
        for runner in self._runners.values():
            runner.forsake()
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._core = self._new_core()
        self._runners, self._waiters, self._boot_tasks = {}, {}, {}
        self._wake, self._wake_at, self._wake_asked = None, math.inf, math.inf
        self._stopped = self._gone_event = None
        if self._state != "stopped":
            self._state = "new"
        self.backend.forked()

    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Pool:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # -- calls (the same as the module-level functions) -------------------------------------------
    def call(
        self,
        fn: Callable[[*Ts], R],
        /,
        *args: *Ts,
        timeout: float | None = _DEFAULT,
        link: bool = True,
    ) -> R:
        """Run ``fn(*args)`` on a runner and return its result (see :func:`flame.call`)."""
        result: R = _calls.call(self, fn, args, timeout, link)
        return result

    async def acall(
        self,
        fn: Callable[[*Ts], R] | Callable[[*Ts], Awaitable[R]],
        /,
        *args: *Ts,
        timeout: float | None = _DEFAULT,
        link: bool = True,
    ) -> R:
        """The asyncio form of :meth:`call` (see :func:`flame.acall`)."""
        result: R = await _calls.acall(self, fn, args, timeout, link)
        return result

    def cast(self, fn: Callable[[*Ts], Any], /, *args: *Ts, link: bool = True) -> None:
        """Run ``fn(*args)`` on a runner without waiting (see :func:`flame.cast`)."""
        _calls.cast(self, fn, args, link)

    def place_child(
        self,
        factory: Callable[[*Ts], Any],
        /,
        *args: *Ts,
        timeout: float | None = _DEFAULT,
        link: bool = True,
    ) -> Child:
        """Build ``factory(*args)`` on a runner and keep it there (see
        :func:`flame.place_child`)."""
        return _calls.place_child(self, factory, args, timeout, link)

    async def aplace_child(
        self,
        factory: Callable[[*Ts], Any],
        /,
        *args: *Ts,
        timeout: float | None = _DEFAULT,
        link: bool = True,
    ) -> Child:
        """The asyncio form of :meth:`place_child`."""
        return await _calls.aplace_child(self, factory, args, timeout, link)

    def map(
        self, fn: Callable[[T], R], iterable: Iterable[T], *, timeout: float | None = None
    ) -> Iterator[R]:
        """Yield ``fn(item)`` for each item, in order, spread over the pool's runners.

        At most ``max * max_concurrency`` items (256 at most) are in flight at once. An
        item's exception is raised when that item is reached. ``timeout`` bounds the whole
        map, from this call on.
        """
        return _calls.map_(self, fn, iterable, timeout)

    def amap(
        self, fn: Callable[[T], R], iterable: Iterable[T], *, timeout: float | None = None
    ) -> AsyncIterator[R]:
        """The asyncio form of :meth:`map`: an async iterator of results, in order."""
        return _calls.amap(self, fn, iterable, timeout)

    @property
    def pickles_calls(self) -> bool:
        """Whether calls to this pool are pickled (its backend's runners need it)."""
        return self.backend.pickles_calls

    # -- checkout ---------------------------------------------------------------------------------
    def _enqueue(self, deadline: float | None, loop: asyncio.AbstractEventLoop | None) -> _Waiter:
        w = _Waiter(loop)
        with self._lock:
            self._check_taking_calls()
            self._next_waiter += 1
            wid = w.wid = self._next_waiter
            self._waiters[wid] = w
            self._apply(self._core.request(wid, deadline, time.monotonic()))
        return w

    def _check_taking_calls(self) -> None:
        if self._state != "started":
            raise PoolClosed(f"pool {self.name!r} is stopped and takes no more calls")

    def give_up(self, w: _Waiter) -> None:
        """The caller stopped waiting; give back a runner it was handed meanwhile."""
        with self._lock:
            if not w.done:
                self._waiters.pop(w.wid, None)
                self._apply(self._core.withdraw(w.wid, time.monotonic()))
                return
        if w.runner is not None:
            self.release(w.runner)

    def outcome(self, w: _Waiter) -> Runner:
        """The runner a waiter was handed, or the error it got (its deadline passed...)."""
        if w.runner is not None:
            return w.runner
        if w.error is not None:
            raise w.error
        raise self._timeout_error()

    def _timeout_error(self) -> CallTimeout:
        s = self.stats()
        return self._timeout_from(s.runners, s.booting)

    def _timeout_from(self, runners: int, booting: int) -> CallTimeout:
        return CallTimeout(
            f"no runner of pool {self.name!r} was free in time ({runners} runners busy, "
            f"{booting} booting, max={self.max}, max_concurrency={self.max_concurrency})"
        )

    def _take(self) -> Runner | None:
        """A free slot at once, when nothing queues before us (the hot path), else None."""
        with self._lock:
            self._check_taking_calls()
            rid = self._core.take(time.monotonic())
            if rid is None:
                return None
            runner = self._runners.get(rid)
            if runner is None:  # cannot happen: the core and this shell change together
                self._apply(self._core.release(rid, time.monotonic()))
            return runner

    def checkout(self, deadline: float | None) -> Runner:
        """Block until a runner slot is ours (sync callers)."""
        runner = self._take()
        if runner is not None:
            return runner
        w = self._enqueue(deadline, None)
        if not w.done:
            timeout = None if deadline is None else deadline - time.monotonic() + 0.05
            try:
                got = w.wait(timeout)
            except BaseException:
                self.give_up(w)
                raise
            if not got:
                self.give_up(w)
                if not w.done:
                    raise self._timeout_error()
        return self.outcome(w)

    def acheckout(self, deadline: float | None) -> Runner | _Waiter:
        """A runner slot for an asyncio caller: the runner, if one is free at once, else its
        place in the queue: await its ``future``, then ask :meth:`outcome` (or
        :meth:`give_up`). No timer of its own: the core fails the caller at its deadline,
        on the pool's one timer; and no coroutine frame while it waits."""
        runner = self._take()
        if runner is not None:
            return runner
        return self._enqueue(deadline, asyncio.get_running_loop())

    def checkout_later(
        self, deadline: float | None, then: Callable[[Runner | None, BaseException | None], None]
    ) -> None:
        """Get a runner slot without waiting for it: ``then(runner, None)`` once it is ours,
        or ``then(None, error)``; on the pool's loop, or in this thread if a slot is free at
        once. A queued cast costs a waiter, not a task."""
        runner = self._take()
        if runner is not None:
            then(runner, None)
            return
        w = _Waiter(self.loop, then)
        with self._lock:
            self._check_taking_calls()
            self._next_waiter += 1
            w.wid = self._next_waiter
            self._waiters[w.wid] = w
            self._apply(self._core.request(w.wid, deadline, time.monotonic()))

    # -- carrying out the core's decisions (under self._lock) -------------------------------
    def _apply(self, actions: list[_scaling.Action]) -> None:
        wakes: Wakes = {}
        for a in actions:
            if isinstance(a, _scaling.Assign):
                waiter = self._waiters.pop(a.waiter, None)
                runner = self._runners.get(a.runner)
                if waiter is None or runner is None:
                    # the caller left in the same instant: give the slot back
                    self.loop.call_soon_threadsafe(self._release_id, a.runner)
                    continue
                waiter.assign(runner, wakes)
            elif isinstance(a, _scaling.Fail):
                waiter = self._waiters.pop(a.waiter, None)
                if waiter is not None:
                    waiter.fail(self._fail_error(a), wakes)
            elif isinstance(a, _scaling.Boot):
                runner = Runner(self, a.runner, self._runner_spec())
                self._runners[a.runner] = runner
                self.loop.call_soon_threadsafe(self._start_boot, runner)
            elif isinstance(a, _scaling.Retire):
                rid = a.runner
                self.loop.call_soon_threadsafe(self._retire, rid)
            elif isinstance(a, _scaling.Keep):
                runner = self._runners.get(a.runner)
                if runner is not None:
                    runner.keep(a.retry_after)
            elif isinstance(a, _scaling.Hook):
                self.loop.call_soon_threadsafe(self._run_hook, a)
            elif isinstance(a, _scaling.Wake) and a.at < self._wake_asked:
                # one timer per pool, for the earliest time asked: a later one comes anyway
                self._wake_asked = a.at
                self.loop.call_soon_threadsafe(self._schedule_wake, a.at)
        if wakes:
            wake_all(wakes)

    def _fail_error(self, a: _scaling.Fail) -> BaseException:
        if a.kind is _scaling.FailKind.CLOSED:
            return PoolClosed(f"pool {self.name!r} was stopped while the caller waited")
        if a.kind is _scaling.FailKind.TIMEOUT:
            # under self._lock (not reentrant): read the core, never self.stats()
            core = self._core
            return self._timeout_from(
                core.count(_scaling.RState.READY), core.count(_scaling.RState.BOOTING)
            )
        cause = a.cause
        err = BootError(f"pool {self.name!r} could not boot a runner for this call: {cause}")
        err.__cause__ = cause
        return err

    # -- loop-thread handlers ----------------------------------------------------------------
    def _start_boot(self, runner: Runner) -> None:
        task = self.loop.create_task(self._boot(runner))
        self._boot_tasks[runner.rid] = task

    async def _boot(self, runner: Runner) -> None:
        started = time.monotonic()
        try:
            await runner.boot()
        except BaseException as exc:
            self._boot_tasks.pop(runner.rid, None)
            if isinstance(exc, asyncio.CancelledError):
                exc = BootError(f"booting {runner.describe()} was cancelled (pool stopping)")
            elif not isinstance(exc, BootError):
                exc = BootError(f"booting {runner.describe()} failed: {exc!r}")
            else:  # a BootError is its message: flame's frames that raised it tell nothing
                exc.__traceback__ = None
            self._last_boot_error = exc
            with self._lock:
                self._runners.pop(runner.rid, None)
                actions = self._core.boot_failed(runner.rid, exc, time.monotonic())
                self._apply(actions)
            if self._state == "started":  # loud only when no caller was given the error
                told = any(isinstance(a, _scaling.Fail) for a in actions)
                logger.log(
                    logging.DEBUG if told else logging.WARNING, "pool %r: %s", self.name, exc
                )
            self._notify_gone()
            return
        self._boot_tasks.pop(runner.rid, None)
        self._log(
            f"pool {self.name!r}: {runner.describe()} up in {time.monotonic() - started:.2f}s"
        )
        with self._lock:
            self._apply(self._core.runner_up(runner.rid, time.monotonic()))

    def _retire(self, rid: int) -> None:
        task = self._boot_tasks.get(rid)
        if task is not None and not task.done():
            task.cancel()
            return
        runner = self._runners.get(rid)
        if runner is None:
            return
        runner.shutdown()
        self.loop.call_later(self.shutdown_timeout + _KILL_GRACE, lambda: self._force(runner))

    def _force(self, runner: Runner) -> None:
        if not runner.gone and self._runners.get(runner.rid) is runner:
            self.log_error(f"{runner.describe()} did not stop in time; killing it")
            self.loop.create_task(runner.kill())

    async def runner_gone(self, runner: Runner, message: str) -> None:
        """``runner`` is gone: forget it and let the core replace it (loop thread)."""
        with self._lock:
            if self._runners.get(runner.rid) is runner:
                del self._runners[runner.rid]
                self._apply(self._core.runner_gone(runner.rid, time.monotonic()))
        self._log(f"pool {self.name!r}: {message}")
        try:
            await runner.kill()
        finally:
            self._notify_gone()

    def _notify_gone(self) -> None:
        if self._gone_event is not None:
            self._gone_event.set()

    def release(self, runner: Runner) -> None:
        """A call or child on ``runner`` ended: its slot is free (any thread)."""
        with self._lock:
            self._apply(self._core.release(runner.rid, time.monotonic()))

    def _release_id(self, rid: int) -> None:
        with self._lock:
            self._apply(self._core.release(rid, time.monotonic()))

    def idle_request(self, runner: Runner) -> None:
        """``runner`` asks to shut down, idle (loop thread)."""
        with self._lock:
            self._apply(self._core.idle_request(runner.rid, time.monotonic()))

    def _schedule_wake(self, at: float) -> None:
        if at >= self._wake_at and self._wake is not None:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = at
        delay = max(0.0, at - time.monotonic())
        self._wake = self.loop.call_later(delay, self._on_wake)

    def _on_wake(self) -> None:
        self._wake = None
        self._wake_at = math.inf
        with self._lock:
            self._wake_asked = math.inf
            if self._state == "started":
                self._apply(self._core.tick(time.monotonic()))

    def _run_hook(self, a: _scaling.Hook) -> None:
        meta = {"name": self.name, "count": a.count}
        try:
            if a.name == "on_grow_start" and self.on_grow_start is not None:
                self.on_grow_start(meta)
            elif a.name == "on_grow_end" and self.on_grow_end is not None:
                self.on_grow_end(a.result, meta)
            elif a.name == "on_shrink" and self.on_shrink is not None:
                self.on_shrink(meta)
        except Exception:
            logger.exception("pool %r: the %s hook raised", self.name, a.name)

    # -- what runners are told -------------------------------------------------------------------
    def _runner_idle_after(self) -> float | None:
        values = [v for v in (self._idle_after, self.min_idle_shutdown_after) if v is not None]
        return min(values) if values else None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The background loop this pool runs on (``flame._runner.RunnerOwner``)."""
        return _loop.get_loop()

    def _runner_spec(self) -> RunnerSpec:
        """What a runner booted now is booted with, and told."""
        config = RunnerConfig(
            heartbeat_interval=settings.heartbeat_interval,
            heartbeat_timeout=settings.heartbeat_timeout,
            idle_after=self._runner_idle_after(),
            shutdown_timeout=self.shutdown_timeout,
            single_use=self.single_use,
            cancel_grace=settings.cancel_grace,
            max_frame=settings.max_frame,
        )
        return RunnerSpec(
            pool=self.name,
            backend=self.backend,
            boot_timeout=self.boot_timeout,
            tls=self.tls,
            failsafe=settings.failsafe_timeout,
            config=config,
            idle_check=self._idle_check,
            forward_output=self.forward_output,
        )

    # -- logging ---------------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if self.log is False:
            return
        level = logging.INFO if self.log is True else self.log
        if isinstance(level, str):
            level = logging.getLevelName(level.upper())
        logger.log(level if isinstance(level, int) else logging.INFO, message)

    def log_error(self, message: str) -> None:
        logger.warning("pool %r: %s", self.name, message)


def _register(pool: Pool) -> None:
    with _registry_lock:
        other = _registry.get(pool.name)
        if other is not None and other._state != "stopped":
            raise ValueError(
                f"a pool named {pool.name!r} exists already; stop it first (pool.stop()) or "
                "pick another name"
            )
        _registry[pool.name] = pool


def _unregister(pool: Pool) -> None:
    with _registry_lock:
        if _registry.get(pool.name) is pool:
            del _registry[pool.name]


def lookup(pool: Pool | str) -> Pool:
    """The pool object for a pool or a pool's name."""
    if isinstance(pool, Pool):
        return pool
    if isinstance(pool, str):
        with _registry_lock:
            found = _registry.get(pool)
            names = sorted(_registry.keys())
        if found is None:
            close = difflib.get_close_matches(pool, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(map(repr, names)) if names else "none"
            raise PoolNotFound(f"no pool is named {pool!r} (pools: {known}){hint}")
        return found
    raise TypeError(f"expected a flame.Pool or a pool name, got {type(pool).__name__}")


def _stop_all_at_exit() -> None:
    with _registry_lock:
        pools = [p for p in _running if p._state == "started"]
    if not pools:
        return

    async def stop_all() -> None:
        await asyncio.wait(
            [asyncio.ensure_future(p._stop_at_exit()) for p in pools], timeout=_EXIT_BUDGET
        )

    with contextlib.suppress(BaseException):  # nothing of flame's may fail an exit
        _loop.run(stop_all(), timeout=_EXIT_BUDGET + 0.5)


def _after_fork() -> None:
    global _registry_lock, _running
    _lifecycle.bury(_registry_lock)
    _registry_lock = threading.Lock()
    _running = set()
    for pool in list(_registry.values()):
        pool._after_fork()


_lifecycle.on_exit(_stop_all_at_exit)
_lifecycle.on_fork(_after_fork)

__all__ = ["Pool", "PoolStats", "lookup"]
