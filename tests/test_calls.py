"""The behavioural suite of SPEC "Calls", "Errors", "Inside a runner" and "Configuration",
run through the public API on every backend of ``conftest.BACKENDS``.

Functions that run on runners are defined at module level here (a ProcessBackend runner
imports this module by reference, through the parent's ``sys.path``); lambdas and closures
are written inside the tests and shipped by value. Remote work that must be observed from
here (started, interrupted, finished) writes marker files, since a runner is another process.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from helpers import describe, wait_until


# -- code that runs on runners ---------------------------------------------------------------------
def add(a: Any, b: Any) -> Any:
    return a + b


def getpid() -> int:
    return os.getpid()


def echo(value: Any) -> tuple[str, Any]:
    """The value back, with its type as the runner saw it."""
    return describe(value), value


def pack(*args: Any) -> tuple[Any, ...]:
    return args


async def async_add(a: int, b: int) -> tuple[int, bool]:
    await asyncio.sleep(0.001)
    return a + b, asyncio.current_task() is not None


def returns_awaitable(x: int) -> Any:
    """A sync function whose result is a coroutine: the runner awaits it."""
    return async_add(x, x)


class Accumulator:
    def __init__(self, base: int) -> None:
        self.base = base

    def add(self, x: int) -> int:
        self.base += x
        return self.base

    async def aadd(self, x: int) -> int:
        await asyncio.sleep(0.001)
        return self.base + x


class Boom(Exception):
    pass


def fail(message: str) -> None:
    _fail_deeper(message)


def _fail_deeper(message: str) -> None:
    raise Boom(message)


def raise_builtin(kind: str) -> None:
    if kind == "key":
        raise KeyError("missing-key")
    raise ValueError("bad value")


class NeedsTwo(Exception):
    """Its __init__ takes other arguments than its args: it is rebuilt without __init__."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")
        self.a, self.b = a, b


class HoldsLock(Exception):
    """Cannot be pickled on the runner (it holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_needs_two() -> None:
    raise NeedsTwo("left", "right")


def raise_holds_lock() -> None:
    raise HoldsLock("lock inside")


def _mark(directory: str, name: str, text: str = "") -> None:
    Path(directory, name).write_text(text or str(os.getpid()))


def spin(directory: str, seconds: float) -> str:
    """Busy pure-Python loop: only an exception raised in its thread stops it early."""
    _mark(directory, "started")
    try:
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
    except BaseException as exc:
        _mark(directory, "interrupted", type(exc).__name__)
        raise
    _mark(directory, "finished")
    return "finished"


def poll_sleep(directory: str, seconds: float) -> str:
    """Sleeps in short steps (interruptible between them), like most real sync work."""
    _mark(directory, "started")
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
    except BaseException as exc:
        _mark(directory, "interrupted", type(exc).__name__)
        raise
    _mark(directory, "finished")
    return "finished"


async def async_wait(directory: str, seconds: float) -> str:
    _mark(directory, "started")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _mark(directory, "interrupted", "CancelledError")
        raise
    _mark(directory, "finished")
    return "finished"


def gated(directory: str) -> int:
    """Mark "entered", then wait (interruptibly) for the file "gate"."""
    _mark(directory, "entered")
    gate = Path(directory, "gate")
    deadline = time.monotonic() + 20
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def current_parent() -> flame.Parent | None:
    p = flame.parent()
    assert flame.Parent.get() == p
    return p


def inner_pool_min() -> tuple[int, int]:
    """A pool created where this runs (not started): what min did it get?"""
    inner = flame.Pool("created-inside", min=2, max=3)
    return inner.min, inner.max


# -- fixtures ----------------------------------------------------------------------------------
POOL_OPTIONS = {"min": 1, "max": 2, "max_concurrency": 8, "idle_shutdown_after": None}


@pytest.fixture
def remote(backend_id: str) -> bool:
    """True when runners are separate processes."""
    return backend_id != "local"


def _settled(pool: flame.Pool) -> None:
    wait_until(lambda: pool.stats().in_flight == 0, 10, message=f"{pool!r} did not settle")


# -- kinds of callables ------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_plain_function_runs_on_a_runner(pool: flame.Pool, remote: bool) -> None:
    assert flame.call(pool, add, 2, 3) == 5
    assert pool.call(add, "a", "b") == "ab"
    pid = flame.call(pool, getpid)
    assert (pid != os.getpid()) is remote


@pytest.mark.timeout(20)
def test_lambda_and_closure_are_shipped_by_value(pool: flame.Pool) -> None:
    assert flame.call(pool, lambda: 6 * 7) == 42

    factor = 3
    items = [1, 2, 3]

    def scaled(offset: int) -> list[int]:
        return [factor * i + offset for i in items]

    assert flame.call(pool, scaled, 1) == [4, 7, 10]

    def make_adder(n: int) -> Callable[[int], int]:
        return lambda x: x + n

    assert flame.call(pool, make_adder(10), 5) == 15


@pytest.mark.timeout(20)
def test_partial_and_bound_methods(pool: flame.Pool) -> None:
    assert flame.call(pool, functools.partial(add, 100), 1) == 101
    assert flame.call(pool, functools.partial(pack, 1, 2), 3) == (1, 2, 3)
    acc = Accumulator(10)
    # the object travels with the method; the runner's copy is mutated, not ours
    assert flame.call(pool, acc.add, 5) == 15
    assert acc.base == 10
    assert flame.call(pool, acc.aadd, 1) == 11


@pytest.mark.timeout(20)
def test_async_function_is_awaited_on_the_runner(pool: flame.Pool) -> None:
    # the result is the awaited value, computed inside a task on the runner's loop
    assert flame.call(pool, async_add, 2, 3) == (5, True)
    assert flame.call(pool, functools.partial(async_add, 1), 1) == (2, True)
    # a sync function that returns an awaitable: the runner awaits it too
    assert flame.call(pool, returns_awaitable, 4) == (8, True)


@pytest.mark.timeout(20)
def test_acall_runs_sync_and_async_functions_concurrently(pool: flame.Pool) -> None:
    async def main() -> list[Any]:
        return await asyncio.gather(
            flame.acall(pool, add, 1, 2),
            flame.acall(pool, async_add, 3, 4),
            flame.acall(pool.name, lambda: "by name"),
            pool.acall(pack, "x", None),
            *(flame.acall(pool, add, i, i) for i in range(10)),
        )

    results = asyncio.run(main())
    assert results[:4] == [3, (7, True), "by name", ("x", None)]
    assert results[4:] == [2 * i for i in range(10)]


@pytest.mark.timeout(20)
def test_many_positional_arguments(pool: flame.Pool) -> None:
    args = tuple(range(50))
    assert flame.call(pool, pack, *args) == args
    assert flame.call(pool, pack) == ()


# -- values crossing the wire ------------------------------------------------------------------
class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class Point:
    x: float
    y: float
    tags: tuple[str, ...] = ()


Pair = collections.namedtuple("Pair", "left right")

_BIG = 200 * 1024  # above the out-of-band threshold

VALUES = [
    pytest.param(None, id="None"),
    pytest.param(True, id="bool"),
    pytest.param(-(2**100), id="bigint"),
    pytest.param(3.25, id="float"),
    pytest.param(float("inf"), id="inf"),
    pytest.param(complex(1, -2), id="complex"),
    pytest.param("héllo, wörld ✓ 🔥", id="str-unicode"),
    pytest.param("", id="str-empty"),
    pytest.param(b"\x00\xffbinary", id="bytes"),
    pytest.param(bytearray(b"mutable"), id="bytearray"),
    pytest.param(os.urandom(_BIG), id="bytes-large"),
    pytest.param(bytearray(os.urandom(_BIG)), id="bytearray-large"),
    pytest.param([1, [2, [3, [4]]]], id="nested-list"),
    pytest.param((1, "a", None, (2.5,)), id="tuple"),
    pytest.param({"k": [1, 2], 3: (4,), None: {"x": {}}}, id="dict"),
    pytest.param({1, 2, 3}, id="set"),
    pytest.param(frozenset({"a", "b"}), id="frozenset"),
    pytest.param(range(0, 100, 7), id="range"),
    pytest.param(slice(1, 10, 2), id="slice"),
    pytest.param(decimal.Decimal("1.10"), id="Decimal"),
    pytest.param(fractions.Fraction(1, 3), id="Fraction"),
    pytest.param(datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.UTC), id="datetime"),
    pytest.param(datetime.date(1999, 12, 31), id="date"),
    pytest.param(datetime.timedelta(days=1, microseconds=5), id="timedelta"),
    pytest.param(uuid.UUID("12345678-1234-5678-1234-567812345678"), id="UUID"),
    pytest.param(Path("/srv/data/file.txt"), id="Path"),
    pytest.param(Color.BLUE, id="Enum"),
    pytest.param(Point(1.0, -2.0, ("a",)), id="dataclass"),
    pytest.param(Pair(left=1, right=[2]), id="namedtuple"),
    pytest.param(collections.OrderedDict([("b", 1), ("a", 2)]), id="OrderedDict"),
    pytest.param(collections.defaultdict(list, {"x": [1]}), id="defaultdict"),
    pytest.param(collections.deque([1, 2, 3], maxlen=5), id="deque"),
    pytest.param(collections.Counter("hello"), id="Counter"),
    pytest.param(np.arange(12, dtype=np.int32).reshape(3, 4), id="ndarray"),
    pytest.param(np.linspace(0, 1, _BIG // 8), id="ndarray-large"),
    pytest.param(np.arange(10)[::2], id="ndarray-strided"),
    pytest.param(np.float32(1.5), id="numpy-scalar"),
]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return bool(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))
    if isinstance(a, collections.deque):
        return a == b and a.maxlen == b.maxlen
    if isinstance(a, collections.defaultdict):
        return a == b and a.default_factory is b.default_factory
    return bool(a == b)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("value", VALUES)
def test_arguments_and_results_keep_value_and_type(pool: flame.Pool, value: Any) -> None:
    seen_type, back = flame.call(pool, echo, value)
    assert seen_type == describe(value), "the runner got another type"
    assert type(back) is type(value)
    assert _same(back, value)


@pytest.mark.timeout(20)
def test_memoryview_argument_arrives_with_its_bytes(pool: flame.Pool) -> None:
    for data in (b"small view", os.urandom(_BIG)):
        seen_type, back = flame.call(pool, echo, memoryview(data))
        assert seen_type == "memoryview"
        assert bytes(back) == data


@pytest.mark.timeout(20)
def test_mutating_an_argument_on_the_runner_does_not_touch_ours(pool: flame.Pool) -> None:
    mine = [1, 2]
    big = bytearray(_BIG)
    assert flame.call(pool, lambda xs, b: (xs.append(3), b.__setitem__(0, 7), len(xs)), mine, big)
    assert mine == [1, 2]
    assert big[0] == 0


# -- errors ------------------------------------------------------------------------------------
def _first_frame(tb: str) -> str:
    return next(line for line in tb.splitlines() if line.lstrip().startswith("File "))


@pytest.mark.timeout(20)
def test_user_exception_is_reraised_as_its_own_type_with_the_remote_traceback(
    pool: flame.Pool,
) -> None:
    with pytest.raises(Boom, match=r"^kaput$") as info:
        flame.call(pool, fail, "kaput")
    err = info.value
    assert type(err) is Boom
    cause = err.__cause__
    assert isinstance(cause, flame.RemoteTraceback)
    text = str(cause)
    assert text.startswith("Traceback (most recent call last):\n")
    # the remote frames come first: the user's function, not flame's machinery
    first = _first_frame(text)
    assert "test_calls.py" in first and first.rstrip().endswith("in fail")
    assert "in _fail_deeper" in text
    assert text.rstrip().endswith("Boom: kaput")
    assert "flame/_child" not in text


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("kind", "exc_type"), [("key", KeyError), ("value", ValueError)])
def test_builtin_exceptions_keep_their_type(
    pool: flame.Pool, kind: str, exc_type: type[Exception]
) -> None:
    with pytest.raises(exc_type) as info:
        flame.call(pool, raise_builtin, kind)
    assert type(info.value) is exc_type
    assert isinstance(info.value.__cause__, flame.RemoteTraceback)


@pytest.mark.timeout(20)
def test_exception_from_a_lambda_points_at_the_lambda(pool: flame.Pool) -> None:
    with pytest.raises(ZeroDivisionError) as info:
        flame.call(pool, lambda: 1 / 0)
    first = _first_frame(str(info.value.__cause__))
    assert "test_calls.py" in first and "<lambda>" in first


@pytest.mark.timeout(20)
def test_an_exception_keeps_its_class_and_attributes_whatever_its_init(pool: flame.Pool) -> None:
    with pytest.raises(NeedsTwo) as info:
        flame.call(pool, raise_needs_two)
    err = info.value
    assert (err.a, err.b, err.args) == ("left", "right", ("left/right",))
    assert isinstance(err.__cause__, flame.RemoteTraceback)
    assert "raise_needs_two" in _first_frame(str(err.__cause__))


def exit_with(code: int) -> None:
    sys.exit(code)


def interrupt() -> None:
    raise KeyboardInterrupt


async def async_exit() -> None:
    sys.exit(4)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("fn", "args", "type_name"),
    [
        pytest.param(exit_with, (3,), "SystemExit", id="sys.exit"),
        pytest.param(interrupt, (), "KeyboardInterrupt", id="KeyboardInterrupt"),
        pytest.param(async_exit, (), "SystemExit", id="async-sys.exit"),
    ],
)
def test_system_exit_and_other_base_exceptions_arrive_as_remote_error(
    pool: flame.Pool, fn: Callable[..., Any], args: tuple[Any, ...], type_name: str
) -> None:
    """They never end the caller's thread, and the runner goes on serving."""
    with pytest.raises(flame.RemoteError) as info:
        flame.call(pool, fn, *args)
    assert info.value.type_name == type_name
    assert isinstance(info.value.__cause__, flame.RemoteTraceback)
    assert flame.call(pool, add, 1, 1) == 2
    assert asyncio.run(flame.acall(pool, add, 2, 2)) == 4


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("fn", "type_name", "message"),
    [
        pytest.param(raise_holds_lock, "test_calls.HoldsLock", "lock inside", id="cannot-pickle"),
    ],
)
def test_exception_that_cannot_cross_the_wire_arrives_as_remote_error(
    pool: flame.Pool, fn: Callable[[], None], type_name: str, message: str
) -> None:
    with pytest.raises(flame.RemoteError) as info:
        flame.call(pool, fn)
    err = info.value
    assert isinstance(err, flame.FlameError)
    assert err.type_name == type_name
    assert err.message == message
    assert err.remote_traceback.startswith("Traceback (most recent call last):\n")
    assert fn.__name__ in _first_frame(err.remote_traceback)
    assert isinstance(err.__cause__, flame.RemoteTraceback)
    assert type_name in str(err) and message in str(err)
    # the runner is fine afterwards
    assert flame.call(pool, add, 1, 1) == 2


# -- timeouts and cancellation -----------------------------------------------------------------
@pytest.mark.timeout(20)
@pytest.mark.parametrize("fn", [spin, poll_sleep, async_wait], ids=lambda f: f.__name__)
def test_timeout_raises_call_timeout_and_terminates_the_remote_work(
    pool: flame.Pool, tmp_path: Path, fn: Callable[..., Any]
) -> None:
    _settled(pool)
    wait_until(lambda: pool.stats().booting == 0, 10)
    runners = pool.stats().runners
    started = time.monotonic()
    with pytest.raises(flame.CallTimeout) as info:
        flame.call(pool, fn, str(tmp_path), 30, timeout=0.5)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, flame.FlameError)
    assert 0.45 <= elapsed < 2.0, elapsed
    # the work was really stopped: cancelled (async) or interrupted in its thread (sync)
    reason = wait_until(
        lambda: (tmp_path / "interrupted").exists() and (tmp_path / "interrupted").read_text(),
        5,
        message="the remote work was not interrupted",
    )
    expected = {"CancelledError"} if fn is async_wait else {"CallTimeout", "CancelledByParent"}
    assert reason in expected
    # and its slot is free again, on the same runners (none was lost over it)
    _settled(pool)
    assert pool.stats().runners == runners
    assert flame.call(pool, add, 1, 2) == 3
    assert not (tmp_path / "finished").exists()


@pytest.mark.timeout(20)
def test_acall_timeout(pool: flame.Pool, tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(flame.CallTimeout):
            await flame.acall(pool, async_wait, str(tmp_path), 30, timeout=0.3)

    asyncio.run(main())
    wait_until((tmp_path / "interrupted").exists, 5)
    _settled(pool)


@pytest.mark.timeout(20)
def test_call_timeout_covers_a_cold_boot(
    make_backend: Callable[[], flame.Backend], tmp_path: Path
) -> None:
    # a timeout large enough for boot plus run: the first call boots a runner and succeeds
    with flame.Pool("cold-ok", max=1, backend=make_backend()) as cold:
        assert cold.stats().runners == 0
        assert flame.call(cold, add, 1, 2, timeout=15) == 3
    # boot + run longer than the timeout: CallTimeout at the deadline counted from the call,
    # not from when the runner came up
    with flame.Pool("cold-timeout", max=1, backend=make_backend()) as cold:
        started = time.monotonic()
        with pytest.raises(flame.CallTimeout):
            flame.call(cold, poll_sleep, str(tmp_path), 30, timeout=1.5)
        elapsed = time.monotonic() - started
        assert 1.45 <= elapsed < 2.2, elapsed
        wait_until((tmp_path / "interrupted").exists, 5)
        _settled(cold)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("fn", [poll_sleep, spin, async_wait], ids=lambda f: f.__name__)
def test_cancelling_the_task_awaiting_acall_cancels_the_remote_work(
    pool: flame.Pool, tmp_path: Path, fn: Callable[..., Any]
) -> None:
    async def main() -> None:
        task = asyncio.create_task(flame.acall(pool, fn, str(tmp_path), 30))
        await asyncio.to_thread(wait_until, (tmp_path / "started").exists, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    reason = wait_until(
        lambda: (tmp_path / "interrupted").exists() and (tmp_path / "interrupted").read_text(),
        5,
        message="cancelling the caller did not interrupt the remote work",
    )
    assert reason == ("CancelledError" if fn is async_wait else "CancelledByParent")
    _settled(pool)
    assert not (tmp_path / "finished").exists()


# -- inside a runner ---------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_parent_is_none_here_and_describes_the_parent_on_a_runner(
    pool: flame.Pool, remote: bool
) -> None:
    assert flame.parent() is None
    assert flame.Parent.get() is None
    p = flame.call(pool, current_parent)
    if not remote:
        assert p is None  # in-process: there is no parent
        return
    assert isinstance(p, flame.Parent)
    assert isinstance(p.runner_id, str) and p.runner_id
    assert p.pool == pool.name
    assert p.backend == pool.backend.name
    assert p.flame_version == flame.__version__


@pytest.mark.timeout(20)
def test_pools_created_inside_a_runner_have_min_zero(pool: flame.Pool, remote: bool) -> None:
    assert flame.call(pool, inner_pool_min) == ((0, 3) if remote else (2, 3))


# -- pools by name, life cycle -----------------------------------------------------------------
@pytest.mark.timeout(10)
def test_unknown_pool_name_raises_pool_not_found() -> None:
    with pytest.raises(flame.PoolNotFound, match="no-such-pool") as info:
        flame.call("no-such-pool", add, 1, 2)
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, flame.FlameError)

    async def main() -> None:
        with pytest.raises(flame.PoolNotFound):
            await flame.acall("no-such-pool", add, 1, 2)

    asyncio.run(main())
    # created but never started: not registered either
    flame.Pool("created-not-started", max=1)
    with pytest.raises(flame.PoolNotFound):
        flame.call("created-not-started", add, 1, 2)


@pytest.mark.timeout(20)
def test_a_started_pool_is_called_by_name(pool: flame.Pool) -> None:
    assert flame.call(pool.name, add, 20, 22) == 42


@pytest.mark.timeout(20)
def test_with_pool_starts_registers_and_stops(
    make_backend: Callable[[], flame.Backend], remote: bool, runner_pids_seen: set[int]
) -> None:
    with flame.Pool("with-pool", max=1, min=1, backend=make_backend()) as p:
        assert p.stats().runners == 1  # min runners are up before start returns
        assert flame.call("with-pool", add, 1, 2) == 3
        if remote:
            runner_pids_seen.add(flame.call("with-pool", getpid))
    with pytest.raises(flame.PoolNotFound):
        flame.call("with-pool", add, 1, 2)
    with pytest.raises(flame.PoolClosed):
        p.call(add, 1, 2)
    assert p.stats().runners == 0


@pytest.mark.timeout(20)
def test_async_with_pool(
    make_backend: Callable[[], flame.Backend], remote: bool, runner_pids_seen: set[int]
) -> None:
    async def main() -> flame.Pool:
        async with flame.Pool("async-with-pool", max=1, min=1, backend=make_backend()) as p:
            assert p.stats().runners == 1
            assert await flame.acall("async-with-pool", async_add, 1, 2) == (3, True)
            if remote:
                runner_pids_seen.add(await p.acall(getpid))
        with pytest.raises(flame.PoolNotFound):
            await flame.acall("async-with-pool", add, 1, 2)
        return p

    p = asyncio.run(main())
    assert p.stats().runners == 0


@pytest.mark.timeout(20)
def test_stats_and_repr(make_backend: Callable[[], flame.Backend], tmp_path: Path) -> None:
    p = flame.Pool(
        "stats-pool", min=1, max=2, max_concurrency=3, backend=make_backend(), timeout=12.5
    )
    assert (p.name, p.min, p.max, p.max_concurrency, p.timeout) == ("stats-pool", 1, 2, 3, 12.5)
    with p:
        s = p.stats()
        assert isinstance(s, flame.PoolStats)
        assert (s.runners, s.booting, s.in_flight, s.waiting) == (1, 0, 0, 0)
        assert (s.min, s.max, s.max_concurrency) == (1, 2, 3)
        assert repr(p) == "<Pool 'stats-pool' runners=1 booting=0 in_flight=0 waiting=0>"

        async def main() -> None:
            held = asyncio.create_task(p.acall(gated, str(tmp_path)))
            await asyncio.to_thread(wait_until, (tmp_path / "entered").exists, 10)
            assert p.stats().in_flight == 1
            assert repr(p) == "<Pool 'stats-pool' runners=1 booting=0 in_flight=1 waiting=0>"
            (tmp_path / "gate").touch()
            await held

        asyncio.run(main())
        _settled(p)
        assert repr(p) == "<Pool 'stats-pool' runners=1 booting=0 in_flight=0 waiting=0>"


# -- options -----------------------------------------------------------------------------------
def _check() -> bool:
    return True


@pytest.mark.parametrize(
    ("options", "named"),
    [
        pytest.param({"max": 1, "min": 2}, "max", id="max<min"),
        pytest.param({"max": 0}, "max", id="max=0"),
        pytest.param({"max": 1, "min": -1}, "min", id="min<0"),
        pytest.param({"max": 1, "max_concurrency": 0}, "max_concurrency", id="concurrency=0"),
        pytest.param({"max": 1, "timeout": -1}, "timeout", id="timeout<0"),
        pytest.param({"max": 1, "boot_timeout": -0.5}, "boot_timeout", id="boot_timeout<0"),
        pytest.param({"max": 1, "shutdown_timeout": -2}, "shutdown_timeout", id="shutdown<0"),
        pytest.param({"max": 1, "idle_shutdown_after": -1}, "idle_shutdown_after", id="idle<0"),
        pytest.param(
            {"max": 1, "min_idle_shutdown_after": -1}, "min_idle_shutdown_after", id="min_idle<0"
        ),
        pytest.param({"max": 1, "backend": "swarm"}, "backend", id="unknown-backend"),
        pytest.param(
            {"max": 1, "idle_shutdown_after": (5, "not callable")},
            "idle_shutdown_after",
            id="idle-check-not-callable",
        ),
        pytest.param(
            {"max": 1, "idle_shutdown_after": (5, _check, 1)},
            "idle_shutdown_after",
            id="idle-tuple-of-3",
        ),
        pytest.param(
            {"max": 1, "idle_shutdown_after": (-5, _check)},
            "idle_shutdown_after",
            id="idle-tuple-negative",
        ),
    ],
)
def test_invalid_pool_options_raise_value_error_naming_the_option(
    options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        flame.Pool("invalid", **options)


def test_valid_idle_tuple_and_none_times_are_accepted() -> None:
    p = flame.Pool("valid", max=1, timeout=None, idle_shutdown_after=(5, _check))
    assert p.idle_shutdown_after == (5, _check)
    assert p.timeout is None


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.usefixtures("flame_defaults")
def test_default_backend_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    flame.configure(backend=None)
    assert isinstance(flame.Pool("default", max=1).backend, flame.LocalBackend)


@pytest.mark.timeout(20)
@pytest.mark.usefixtures("flame_defaults")
def test_flame_backend_env_picks_the_default(
    monkeypatch: pytest.MonkeyPatch, runner_pids_seen: set[int]
) -> None:
    flame.configure(backend=None)
    monkeypatch.setenv("FLAME_BACKEND", "process")
    with flame.Pool("from-env", max=1) as p:
        assert isinstance(p.backend, flame.ProcessBackend)
        pid = flame.call(p, getpid)
        runner_pids_seen.add(pid)
        assert pid != os.getpid()
    monkeypatch.setenv("FLAME_BACKEND", "Local")
    assert isinstance(flame.Pool("from-env", max=1).backend, flame.LocalBackend)
    monkeypatch.setenv("FLAME_BACKEND", "swarm")
    with pytest.raises(ValueError, match="FLAME_BACKEND"):
        flame.Pool("from-env", max=1)


@pytest.mark.usefixtures("flame_defaults")
def test_configure_backend_overrides_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAME_BACKEND", "local")
    flame.configure(backend="process")
    assert isinstance(flame.Pool("configured", max=1).backend, flame.ProcessBackend)
    mine = flame.LocalBackend(serialize=True)
    flame.configure(backend=mine)
    assert flame.Pool("configured", max=1).backend is mine
    # an explicit backend option still wins
    assert isinstance(
        flame.Pool("configured", max=1, backend="process").backend, flame.ProcessBackend
    )
    with pytest.raises(ValueError, match="backend"):
        flame.configure(backend="swarm")
    assert flame.Pool("configured", max=1).backend is mine  # unchanged by the bad call
