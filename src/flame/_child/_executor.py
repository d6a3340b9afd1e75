"""Runs calls and placed children on a runner (and, in-process, for ``LocalBackend``).

Sync functions run in worker threads (started on demand, reused); ``async def`` functions, and
sync functions that return an awaitable, run as tasks on a separate "user" event loop thread,
so user code can never stall the control loop that answers heartbeats. Every entry point is
called on the control loop thread; completion callbacks run on the worker or user-loop thread.

Cancelling (deadline passed, caller gave up, linked parent lost) cancels a task, or raises
:class:`flame.CallTimeout` / :class:`CancelledByParent` inside the worker thread
(``PyThreadState_SetAsyncExc``). Work that has not stopped ``cancel_grace`` seconds later is
reported through ``on_stuck``: the runner then exits, since a thread cannot be killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import inspect
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._errors import CallTimeout, ChildEnded, SerializationError
from .._record import Outcome, Status

Loader = Callable[[], tuple[Any, tuple[Any, ...]]]
DoneCallback = Callable[[Outcome], None]


class CancelledByParent(Exception):
    """Raised inside remote work that the parent cancelled, or whose parent was lost."""


def _raise_in_thread(ident: int, exc_type: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc_type) if exc_type is not None else None
    )


def format_remote(exc: BaseException) -> str:
    """The traceback text of a remote exception, without flame's own frames on top."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("flame."):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def outcome_of_exception(exc: BaseException) -> Outcome:
    if isinstance(exc, CallTimeout):
        return (Status.TIMEOUT, str(exc) or "the call's deadline passed on the runner")
    if isinstance(exc, CancelledByParent | asyncio.CancelledError):
        return (Status.CANCELLED, str(exc) or "cancelled")
    return (Status.RAISED, (exc, format_remote(exc)))


@dataclass(eq=False)
class Job:
    id: int
    link: bool
    on_done: DoneCallback
    thread: int | None = None  # ident of the worker running sync user code
    task: concurrent.futures.Future[Any] | None = None  # the user-loop task, if async
    finished: bool = False
    cancel_exc: type[BaseException] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    is_child: bool = False
    obj: Any = None  # the placed child's object
    deadline: float | None = None  # monotonic; enforced by sweep()
    closing: threading.Event | None = None  # a stopped child's close(): set once it returned


class Executor:
    def __init__(
        self,
        control: asyncio.AbstractEventLoop,
        *,
        on_change: Callable[[], None],
        on_stuck: Callable[[int], None],
        cancel_grace: float,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control = control
        self._now = now
        self.on_change = on_change  # control loop: the set of jobs changed
        self.on_stuck = on_stuck
        self.cancel_grace = cancel_grace
        self.jobs: dict[int, Job] = {}
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle_workers = 0
        self._workers_lock = threading.Lock()
        self._user_loop: asyncio.AbstractEventLoop | None = None
        self._user_lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        #: jobs not finished yet (calls, placed children, child calls)
        self.busy = 0
        self.idle_since = now()
        #: when set, the end of the last job wakes the control loop (``on_change``) at once;
        #: otherwise the control loop notices idleness on its own periodic tick, so that
        #: finishing a call costs no cross-thread wake-up on the hot path
        self.notify_idle = False
        self.closed = False

    # -- threads ----------------------------------------------------------------------------
    def spawn(self, work: Callable[[], None]) -> None:
        """Run ``work`` in an idle worker thread, or a new one."""
        with self._workers_lock:
            if self._idle_workers > 0:
                self._idle_workers -= 1
                self._queue.put(work)
                return
        t = threading.Thread(target=self._worker, args=(work,), name="flame-worker", daemon=True)
        t.start()

    def _worker(self, work: Callable[[], None] | None) -> None:
        while work is not None:
            try:
                work()
            except BaseException:
                pass
            with self._workers_lock:
                self._idle_workers += 1
            work = self._queue.get()

    def user_loop(self) -> asyncio.AbstractEventLoop:
        with self._user_lock:
            if self._user_loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=main, name="flame-user-loop", daemon=True).start()
                ready.wait()
                self._user_loop = loop
            return self._user_loop

    # -- calls --------------------------------------------------------------------------------
    def start_call(
        self,
        call_id: int,
        load: Loader,
        *,
        timeout: float | None,
        link: bool,
        on_done: DoneCallback,
    ) -> None:
        job = self.new_call(call_id, timeout=timeout, link=link, on_done=on_done)
        self.spawn(lambda: self.run(job, load))

    def new_call(
        self, call_id: int, *, timeout: float | None, link: bool, on_done: DoneCallback
    ) -> Job:
        """Register a call (any thread); :meth:`run` it next, in a worker thread."""
        job = Job(call_id, link, on_done)
        if timeout is not None:
            job.deadline = self._now() + max(timeout, 0.0)
        self._add(job)
        return job

    def _add(self, job: Job) -> None:
        """Register a job (any thread; ``on_change`` must be safe to call from any thread
        when the executor becomes busy)."""
        with self._jobs_lock:
            self.jobs[job.id] = job
            self.busy += 1
            first = self.busy == 1
        if first:
            self.on_change()

    def _remove(self, job: Job) -> None:
        """Forget a finished job (any thread)."""
        with self._jobs_lock:
            if self.jobs.pop(job.id, None) is None:
                return
            self.busy -= 1
            idle = self.busy == 0
            if idle:
                self.idle_since = self._now()
        if idle and self.notify_idle and not self.control.is_closed():
            self.control.call_soon_threadsafe(self.on_change)

    def sweep(self, now: float) -> None:
        """Cancel the jobs whose deadline has passed (control loop, on its periodic tick).

        The parent cancels a call at its deadline itself; this is the runner's own backstop
        (for instance while the parent is unreachable)."""
        for job in list(self.jobs.values()):
            if job.deadline is not None and job.deadline <= now and job.cancel_exc is None:
                self.cancel(job.id, CallTimeout)

    def run(self, job: Job, load: Loader) -> None:
        """Run a registered call in this (worker) thread and report its outcome."""
        outcome: Outcome
        try:
            try:
                fn, args = load()
            except Exception as exc:
                raise _LoadFailed(exc) from exc
            outcome = self._execute(job, fn, args)
        except _LoadFailed as lf:
            err = SerializationError(
                f"cannot unpickle the call on the runner: {type(lf.exc).__name__}: {lf.exc}"
            )
            outcome = (Status.RAISED, (err, format_remote(lf.exc)))
        except BaseException as exc:
            outcome = outcome_of_exception(exc)
        self._finish(job, outcome)

    def _execute(self, job: Job, fn: Callable[..., Any], args: tuple[Any, ...]) -> Outcome:
        if _is_async(fn):
            return self._await(job, lambda: fn(*args))
        with job.lock:
            if job.cancel_exc is not None:
                return outcome_of_exception(job.cancel_exc())
            job.thread = threading.get_ident()
        try:
            value = fn(*args)
        except BaseException as exc:
            self._leave_thread(job)
            return outcome_of_exception(exc)
        self._leave_thread(job)
        if inspect.isawaitable(value):
            return self._await(job, lambda: value)
        return (Status.OK, value)

    def _leave_thread(self, job: Job) -> None:
        with job.lock:
            job.thread = None
            if job.cancel_exc is not None:
                _raise_in_thread(threading.get_ident(), None)  # drop a pending async raise

    def _await(self, job: Job, make: Callable[[], Any]) -> Outcome:
        async def runner() -> Any:
            try:
                return await make()
            except (Exception, asyncio.CancelledError):
                raise
            except BaseException as exc:  # SystemExit would stop the user loop itself
                raise _Escaped(exc) from None

        with job.lock:
            if job.cancel_exc is not None:
                return outcome_of_exception(job.cancel_exc())
            job.task = asyncio.run_coroutine_threadsafe(runner(), self.user_loop())
        try:
            return (Status.OK, job.task.result())
        except concurrent.futures.CancelledError:
            exc_type = job.cancel_exc or CancelledByParent
            return outcome_of_exception(exc_type())
        except _Escaped as escaped:
            return outcome_of_exception(escaped.exc)
        except BaseException as exc:
            return outcome_of_exception(exc)

    def _finish(self, job: Job, outcome: Outcome) -> None:
        with job.lock:
            if job.finished:
                return
            job.finished = True
            closing = job.closing
        if closing is not None:  # a stopped child ends (and frees its slot) after close()
            closing.wait(self.cancel_grace)
        try:
            job.on_done(outcome)
        finally:
            self._remove(job)

    def cancel(self, call_id: int, exc_type: type[BaseException] = CancelledByParent) -> None:
        """Stop a job (control loop thread). Reports ``on_stuck`` if it does not stop in time."""
        job = self.jobs.get(call_id)
        if job is None or job.finished:
            return
        with job.lock:
            if job.cancel_exc is not None:
                return
            job.cancel_exc = exc_type
            if job.task is not None:
                loop = self.user_loop()
                loop.call_soon_threadsafe(job.task.cancel)
            elif job.thread is not None:
                _raise_in_thread(job.thread, exc_type)
            if job.is_child:
                if job.obj is not None and not callable(getattr(job.obj, "run", None)):
                    # no run() to interrupt: closing it ends it
                    outcome = outcome_of_exception(exc_type())
                    self._close_child(job, then=lambda: self._finish(job, outcome))
                else:
                    self._close_child(job)
        self.control.call_later(self.cancel_grace, self._check_stuck, job)

    def _check_stuck(self, job: Job) -> None:
        if not job.finished and job.id in self.jobs:
            self.on_stuck(job.id)

    # -- placed children -------------------------------------------------------------------------
    def place_child(
        self,
        child_id: int,
        load: Loader,
        *,
        link: bool,
        on_built: DoneCallback,
        on_exit: DoneCallback,
    ) -> None:
        """Build ``factory(*args)``; report through ``on_built``; then run its ``run()``."""
        job = Job(child_id, link, on_exit, is_child=True)
        self._add(job)

        def build() -> None:
            try:
                factory, args = load()
                obj = factory(*args)
            except BaseException as exc:
                outcome = outcome_of_exception(exc)
                on_built(outcome)
                job.finished = True
                self._remove(job)
                return
            job.obj = obj
            on_built((Status.OK, None))
            run = getattr(obj, "run", None)
            if not callable(run):
                return  # lives until stopped
            outcome = self._execute(job, run, ())
            self._finish(job, outcome)

        self.spawn(build)

    def child_call(
        self,
        call_id: int,
        child_id: int,
        load: Loader,
        *,
        timeout: float | None,
        on_done: DoneCallback,
    ) -> None:
        child = self.jobs.get(child_id)
        if child is None or not child.is_child or child.finished:
            on_done((Status.RAISED, (ChildEnded("the placed child has ended"), "")))
            return

        def bound() -> tuple[Any, tuple[Any, ...]]:
            name, args = load()
            return getattr(child.obj, name), args

        job = Job(call_id, child.link, on_done)
        if timeout is not None:
            job.deadline = self._now() + max(timeout, 0.0)
        self._add(job)
        self.spawn(lambda: self.run(job, bound))

    def stop_child(self, child_id: int) -> None:
        job = self.jobs.get(child_id)
        if job is None or not job.is_child:
            return
        if job.obj is not None and not callable(getattr(job.obj, "run", None)):
            # no run(): closing it ends it (once close() has returned)
            self._close_child(job, then=lambda: self._finish(job, (Status.OK, None)))
            return
        self.cancel(child_id, CancelledByParent)

    def _close_child(self, job: Job, then: Callable[[], None] | None = None) -> None:
        """Call the child's ``close()`` (if any) in a worker, then ``then()`` there. Once."""
        if job.closing is not None:
            return
        closing = job.closing = threading.Event()
        close = getattr(job.obj, "close", None)

        def do_close() -> None:
            try:
                if callable(close):
                    result = close()
                    if inspect.isawaitable(result):
                        asyncio.run_coroutine_threadsafe(
                            _awaitable(result), self.user_loop()
                        ).result(self.cancel_grace)
            except Exception:
                pass
            finally:
                closing.set()
                if then is not None:
                    then()

        self.spawn(do_close)

    # -- whole-runner transitions ---------------------------------------------------------------
    def cancel_linked(self) -> None:
        for job in list(self.jobs.values()):
            if job.link:
                self.cancel(job.id, CancelledByParent)

    def cancel_all(self) -> None:
        for job in list(self.jobs.values()):
            self.cancel(job.id, CancelledByParent)


class _Escaped(Exception):
    """Carries a ``BaseException`` that is not an ``Exception`` out of a user-loop task."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


class _LoadFailed(Exception):
    def __init__(self, exc: Exception) -> None:
        super().__init__(str(exc))
        self.exc = exc


async def _awaitable(a: Any) -> Any:
    return await a


def _is_async(fn: Any) -> bool:
    while hasattr(fn, "func") and not inspect.isfunction(fn):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )
