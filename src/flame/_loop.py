"""The background event loop: one per process, started on first use.

Pools need timers and monitors that run while no caller is active (boots, heartbeats, idle
shutdown, death detection), so every process using flame gets one daemon thread running an
asyncio loop. The sync front door hands coroutines to it with :func:`run` (blocking) and the
async front door with :func:`arun` (awaiting, from any other loop). The hot path of a call
does not go through here at all: callers write their frame themselves and the loop only
delivers the reply.

After ``os.fork()`` the child gets a fresh loop on first use (the parent's thread is gone).
The loop's default executor (``asyncio.to_thread``) keeps working while the interpreter
shuts down: once ``concurrent.futures`` refuses new work, each task gets a daemon thread of
its own, so what flame does at exit never fails for want of a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from . import _lifecycle

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid = 0


def get_loop() -> asyncio.AbstractEventLoop:
    """The background loop, started on first use."""
    global _loop, _thread, _pid
    loop = _loop
    if loop is not None and _pid == os.getpid():
        return loop
    with _lock:
        if _loop is None or _pid != os.getpid():
            new = asyncio.new_event_loop()
            new.set_default_executor(_Executor(thread_name_prefix="flame-helper"))
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(new)
                new.call_soon(ready.set)
                new.run_forever()

            t = threading.Thread(target=main, name="flame-loop", daemon=True)
            t.start()
            ready.wait()
            _loop, _thread, _pid = new, t, os.getpid()
        return _loop


class _Executor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that, during interpreter shutdown, runs each task in a daemon thread."""

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        try:
            return super().submit(fn, *args, **kwargs)
        except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
            future: concurrent.futures.Future[T] = concurrent.futures.Future()

            def run() -> None:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:
                        future.set_exception(exc)

            threading.Thread(target=run, name="flame-helper-late", daemon=True).start()
            return future


def _after_fork() -> None:
    global _lock, _loop, _thread
    _lifecycle.bury(_loop, _thread)  # the parent's loop: its thread is not in this process
    _lock, _loop, _thread = threading.Lock(), None, None


_lifecycle.on_fork(_after_fork)


def in_loop_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and block until it is done."""
    if in_loop_thread():
        coro.close()
        raise RuntimeError("flame's blocking API cannot be used from flame's own loop thread")
    fut = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return fut.result(timeout)
    except BaseException:
        fut.cancel()
        raise


async def arun(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` running on the background loop from another event loop."""
    loop = get_loop()
    try:
        current = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    if current is loop:
        return await coro
    cfut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
    return await asyncio.wrap_future(cfut)
