"""Failure injection at every stage of a call (DESIGN 12), on every backend of
``conftest.BACKENDS``: pickling the call, unpickling it on the runner, running it, pickling
the result, unpickling it at home, the runner crashing or being killed, and work stuck past
its deadline. Each test asserts the exact error the caller sees, that nothing hangs (every
test has a tight timeout), and that the pool serves the next call.

Crashes (``os._exit``, SIGKILL, a runner exiting because a call is stuck) only run on
backends whose runners are separate processes: in-process, they would take pytest down.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import flame
from helpers import pid_alive, runner_pids, wait_until
from helpers.parent.callers import Caller


# -- code that runs on runners ---------------------------------------------------------------------
def echo(value: Any) -> Any:
    return value


def getpid() -> int:
    return os.getpid()


def _refuse_to_load(message: str) -> None:
    raise ValueError(message)


def _exit_on_load(code: int) -> None:
    os._exit(code)


class LoadFails:
    """Pickles fine; unpickling it raises ValueError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ("this object refuses to be unpickled",))


class LoadExits:
    """Pickles fine; unpickling it ends the process with exit code 42."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_exit_on_load, (42,))


class HoldsLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def method(self) -> int:
        return 1


def returns_lock() -> Any:
    return threading.Lock()


def returns_load_fails() -> LoadFails:
    return LoadFails()


def exits(code: int) -> None:
    os._exit(code)


def _mark(directory: str, name: str) -> None:
    Path(directory, name).write_text(str(os.getpid()))


def poll_sleep(directory: str, seconds: float) -> str:
    """Mark "started" (with our pid), then sleep in short, interruptible steps."""
    _mark(directory, "started")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    _mark(directory, "finished")
    return "finished"


def c_sleep(directory: str, seconds: float) -> None:
    """Mark "started", then block in one C call that no exception can interrupt."""
    _mark(directory, "started")
    time.sleep(seconds)
    _mark(directory, "finished")


_LOCK = threading.Lock()


# -- fixtures ----------------------------------------------------------------------------------
POOL_OPTIONS = {"max": 1, "max_concurrency": 4, "idle_shutdown_after": None}


@pytest.fixture
def crashable(
    backend_id: str,
    make_backend: Callable[[], flame.Backend],
    make_pool: Callable[..., flame.Pool],
) -> Callable[..., flame.Pool]:
    """Makes started pools whose runners a test may crash (separate-process backends only)."""
    if backend_id == "local":
        pytest.skip("crashing an in-process runner would crash the test process")

    def make(**options: Any) -> flame.Pool:
        options.setdefault("max_concurrency", 4)
        options.setdefault("idle_shutdown_after", None)
        return make_pool(make_backend(), **options).start()

    return make


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _healthy(pool: flame.Pool) -> None:
    """The pool settles (no call in flight) and serves the next call."""
    wait_until(lambda: pool.stats().in_flight == 0, 10, message=f"{pool!r} did not settle")
    assert flame.call(pool, echo, "still serving", timeout=15) == "still serving"


# -- pickling the call (caller side) -----------------------------------------------------------
@pytest.mark.timeout(20)
def test_unpicklable_argument_fails_in_the_caller_before_any_runner_boots(
    make_backend: Callable[[], flame.Backend],
) -> None:
    before = runner_pids()
    with flame.Pool("never-boots", max=2, backend=make_backend()) as p:
        with pytest.raises(flame.SerializationError) as info:
            flame.call(p, echo, threading.Lock())
        message = str(info.value)
        assert "argument 0" in message and "lock" in message

        with pytest.raises(flame.SerializationError, match="argument 1"):
            p.call(lambda a, b: None, 1, threading.Lock())

        async def main() -> None:
            with pytest.raises(flame.SerializationError, match="argument 0"):
                await flame.acall(p, echo, threading.Lock())

        asyncio.run(main())
        with pytest.raises(flame.SerializationError, match="argument 0"):
            flame.cast(p, echo, threading.Lock())
        with pytest.raises(flame.SerializationError, match="argument 0"):
            flame.place_child(p, echo, threading.Lock())

        s = p.stats()
        assert (s.runners, s.booting, s.in_flight, s.waiting) == (0, 0, 0, 0)
        assert runner_pids() == before, "a runner was booted for a call that cannot be sent"


@pytest.mark.timeout(20)
def test_closure_over_an_unpicklable_object_names_the_variable(pool: flame.Pool) -> None:
    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    with pytest.raises(flame.SerializationError) as info:
        flame.call(pool, uses_lock)
    message = str(info.value)
    assert "closure variable 'lock'" in message
    assert "uses_lock" in message

    # a module the runner imports: the lambda's globals are the runner's own
    assert flame.call(pool, lambda: _LOCK.locked()) is False  # noqa: PLW0108
    # code the runner cannot import (a notebook cell): its globals travel by value
    cell: dict[str, Any] = {"__name__": "notebook_cell", "_LOCK": threading.Lock()}
    exec("check = lambda: _LOCK.locked()", cell)
    with pytest.raises(flame.SerializationError, match="global '_LOCK'"):
        flame.call(pool, cell["check"])

    with pytest.raises(flame.SerializationError, match="the object it is bound to"):
        flame.call(pool, HoldsLock().method)
    assert pool.stats().in_flight == 0


# -- unpickling the call on the runner ---------------------------------------------------------
@pytest.mark.timeout(20)
def test_argument_that_fails_to_unpickle_on_the_runner(pool: flame.Pool) -> None:
    with pytest.raises(flame.SerializationError) as info:
        flame.call(pool, echo, LoadFails())
    message = str(info.value)
    assert "cannot unpickle the call on the runner" in message
    assert "ValueError: this object refuses to be unpickled" in message
    # the runner's traceback of the failed load is attached
    assert isinstance(info.value.__cause__, flame.RemoteTraceback)
    assert "_refuse_to_load" in str(info.value.__cause__)
    _healthy(pool)


@pytest.mark.timeout(20)
def test_argument_whose_unpickling_kills_the_runner(
    crashable: Callable[..., flame.Pool],
) -> None:
    p = crashable()
    first = flame.call(p, getpid)
    started = time.monotonic()
    with pytest.raises(flame.RunnerLost) as info:
        flame.call(p, echo, LoadExits(), timeout=15)
    assert time.monotonic() - started < 5
    assert "exited with code 42" in str(info.value)
    wait_until(lambda: not pid_alive(first), 5)
    _healthy(p)
    assert flame.call(p, getpid) != first


# -- running it --------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_function_calling_os_exit_loses_its_runner_with_the_exit_code(
    crashable: Callable[..., flame.Pool],
) -> None:
    p = crashable()
    first = flame.call(p, getpid)
    with pytest.raises(flame.RunnerLost) as info:
        flame.call(p, exits, 3, timeout=15)
    assert "exited with code 3" in str(info.value)
    if isinstance(p.backend, flame.ProcessBackend):
        assert f"pid {first}" in str(info.value)
    _healthy(p)
    assert flame.call(p, getpid) != first


@pytest.mark.timeout(20)
def test_runner_sigkilled_mid_call(crashable: Callable[..., flame.Pool], tmp_path: Path) -> None:
    p = crashable(max_concurrency=4)
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    callers = [Caller(flame.call, p, poll_sleep, str(d), 30, timeout=25) for d in dirs]
    pids = {int(wait_until(lambda d=d: _read(d / "started"), 10)) for d in dirs}  # type: ignore[misc]
    assert len(pids) == 1, "both calls should share the one runner"
    (victim,) = pids
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for c in callers:
        err = c.failure(10)
        assert isinstance(err, flame.RunnerLost), repr(err)
        assert "SIGKILL" in str(err)
        assert c.started_at + c.elapsed - killed_at < 2.5, "the loss was noticed too late"
    assert not any((d / "finished").exists() for d in dirs)
    _healthy(p)
    assert flame.call(p, getpid) != victim
    assert p.stats().runners == 1


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("flame_defaults")
def test_call_stuck_in_c_code_times_out_then_its_runner_exits_and_the_pool_recovers(
    backend_id: str, make_backend: Callable[[], flame.Backend], tmp_path: Path
) -> None:
    flame.configure(cancel_grace=0.5)
    remote = backend_id != "local"
    stuck_dir, other_dir = tmp_path / "stuck", tmp_path / "other"
    stuck_dir.mkdir()
    other_dir.mkdir()
    with flame.Pool(
        f"stuck-{backend_id}",
        max=1,
        max_concurrency=2,
        backend=make_backend(),
        idle_shutdown_after=None,
    ) as p:
        first = flame.call(p, getpid)
        # another call on the same runner, well within its own deadline
        bystander = Caller(flame.call, p, poll_sleep, str(other_dir), 30, timeout=25)
        wait_until((other_dir / "started").exists, 10)

        started = time.monotonic()
        with pytest.raises(flame.CallTimeout):
            # in-process, keep the thread that cannot be stopped short-lived
            flame.call(p, c_sleep, str(stuck_dir), 60 if remote else 8, timeout=1.0)
        assert time.monotonic() - started < 1.6, "CallTimeout came late"

        # the runner cannot stop the call, so after the grace period it gives up: the call
        # sharing it is told, and the runner is gone
        err = bystander.failure(10)
        assert isinstance(err, flame.RunnerLost), repr(err)
        assert "did not stop" in str(err)
        if remote:
            assert "exited with code 210" in str(err)
            wait_until(lambda: not pid_alive(first), 5, message="the stuck runner did not exit")
        _healthy(p)
        second = flame.call(p, getpid)
        assert not remote or second != first
        assert p.stats().runners == 1
    assert not (stuck_dir / "finished").exists()


# -- pickling the result (runner side) and unpickling it (caller side) -------------------------
@pytest.mark.timeout(20)
def test_result_that_fails_to_pickle_on_the_runner(pool: flame.Pool) -> None:
    with pytest.raises(flame.SerializationError) as info:
        flame.call(pool, returns_lock)
    message = str(info.value)
    assert "cannot pickle the result" in message and "lock" in message
    # the same from a lambda
    with pytest.raises(flame.SerializationError, match="cannot pickle the result"):
        flame.call(pool, lambda: threading.Lock())  # noqa: PLW0108
    _healthy(pool)


@pytest.mark.timeout(20)
def test_result_that_fails_to_unpickle_in_the_caller(pool: flame.Pool) -> None:
    with pytest.raises(flame.SerializationError) as info:
        flame.call(pool, returns_load_fails)
    message = str(info.value)
    assert "cannot unpickle the result in the caller" in message
    assert "this object refuses to be unpickled" in message
    assert isinstance(info.value.__cause__, ValueError)

    async def main() -> None:
        with pytest.raises(flame.SerializationError, match="cannot unpickle the result"):
            await flame.acall(pool, returns_load_fails)

    asyncio.run(main())
    _healthy(pool)
