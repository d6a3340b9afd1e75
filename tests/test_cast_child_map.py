"""End-to-end tests of ``cast``, ``place_child`` / ``flame.Child``, links, and
``pool.map`` / ``pool.amap`` (SPEC "Calls"), on LocalBackend(serialize=True) and ProcessBackend.

Inspired by phoenixframework/flame's test/flame_test.exs ("cast", "process placement",
"call links", "cast with link false"), written anew for flame's Python API. Work on runners
reports back through files; see ``helpers.runner.pool_work``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flame
from helpers import assert_pids_gone, pid_alive, wait_until
from helpers.parent.callers import holds_for
from helpers.runner import pool_work as ph

TESTS_DIR = str(Path(__file__).parent)
MAX, MAX_CONCURRENCY = 2, 4


# -- fixtures --------------------------------------------------------------------------------------
POOL_OPTIONS = {
    "min": MAX,
    "max": MAX,
    "max_concurrency": MAX_CONCURRENCY,
    "idle_shutdown_after": None,
    "shutdown_timeout": 5,
}


# -- cast ------------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_cast_returns_at_once_and_takes_a_slot(pool: flame.Pool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    entered = [tmp_path / "entered-0", tmp_path / "entered-1"]
    started = time.monotonic()
    assert pool.cast(ph.gated, str(entered[0]), str(gate)) is None
    assert flame.cast(pool.name, ph.gated, str(entered[1]), str(gate)) is None
    assert time.monotonic() - started < 0.5
    wait_until(lambda: all(p.exists() for p in entered))
    # the casts hold their slots while they run
    assert pool.stats().in_flight == 2
    gate.touch()
    wait_until(lambda: pool.stats().in_flight == 0)


@pytest.mark.timeout(20)
def test_cast_on_a_cold_pool_returns_before_a_runner_is_up(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    cold = make_pool(backend, max=1)
    cold.start()
    assert cold.stats().runners == 0
    done = tmp_path / "done"
    started = time.monotonic()
    cold.cast(ph.write_after, str(done), 0.0)
    assert time.monotonic() - started < 0.5
    wait_until(done.exists)
    if not isinstance(backend, flame.LocalBackend):
        assert int(done.read_text()) != os.getpid()


@pytest.mark.timeout(20)
def test_cast_failure_is_logged_with_the_remote_traceback_and_never_raised(
    pool: flame.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="flame"):
        assert pool.cast(ph.fail, "cast failure marker") is None
        (record,) = wait_until(
            lambda: [r for r in caplog.records if "cast failure marker" in r.getMessage()]
        )
    assert record.name == "flame"
    assert record.levelno == logging.ERROR
    assert pool.name in record.getMessage()
    assert "fail" in record.getMessage()  # names the function
    assert record.exc_info is not None
    error = record.exc_info[1]
    assert isinstance(error, ValueError)
    assert isinstance(error.__cause__, flame.RemoteTraceback)
    remote = str(error.__cause__)
    assert "pool_work.py" in remote and "in fail" in remote
    assert "raise ValueError(message)" in remote
    # the logged text carries the remote traceback too
    assert "raise ValueError(message)" in caplog.text


@pytest.mark.timeout(20)
def test_cast_with_an_unpicklable_argument_raises_serialization_error(pool: flame.Pool) -> None:
    lock = threading.Lock()
    with pytest.raises(flame.SerializationError, match=r"(?i)lock"):
        pool.cast(ph.pid, lock)
    with pytest.raises(flame.SerializationError):
        flame.cast(pool.name, lock.acquire)  # a bound method of a lock
    assert holds_for(lambda: pool.stats().in_flight == 0, 0.2)


# -- place_child -----------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_child_lives_on_a_runner_in_one_slot_until_stopped(
    pool: flame.Pool, tmp_path: Path
) -> None:
    closed = tmp_path / "closed"
    child = pool.place_child(ph.Counter, 10, str(closed))
    assert isinstance(child, flame.Child)
    assert child.alive
    assert pool.stats().in_flight == 1
    # its state lives on the runner, across calls
    assert child.call("incr", 5) == 15
    assert child.call("incr") == 16
    assert child.call(ph.Counter.incr, 2) == 18  # a method works as well as its name
    if not isinstance(pool.backend, flame.LocalBackend):
        assert child.call("pid") != os.getpid()
    with pytest.raises(ValueError, match="child method failed") as info:
        child.call("boom")
    assert isinstance(info.value.__cause__, flame.RemoteTraceback)
    assert child.alive, "a method that raised does not end the child"
    # other calls still go through while it holds its slot
    assert pool.call(ph.hold, 0.0)[0] > 0

    child.stop()
    assert closed.read_text() == "closed"  # stop() called close()
    assert not child.alive
    wait_until(lambda: pool.stats().in_flight == 0)  # its slot is given back
    assert child.wait(1) is None
    with pytest.raises(flame.ChildEnded):
        child.call("incr")
    child.stop()  # stopping again is a no-op


@pytest.mark.timeout(20)
def test_child_run_starts_in_the_background_and_wait_returns_its_result(
    pool: flame.Pool, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    child = pool.place_child(ph.Worker, str(gate), "run result")
    wait_until(lambda: child.call("started"))
    assert child.alive
    assert pool.stats().in_flight == 1
    with pytest.raises(flame.CallTimeout):
        child.wait(0.1)
    gate.touch()
    assert child.wait(10) == "run result"
    assert not child.alive
    wait_until(lambda: pool.stats().in_flight == 0)
    with pytest.raises(flame.ChildEnded):
        child.call("started")


@pytest.mark.timeout(20)
def test_child_wait_raises_what_run_raised(pool: flame.Pool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    child = pool.place_child(ph.Worker, str(gate), KeyError("run failed"))
    wait_until(lambda: child.call("started"))
    gate.touch()
    with pytest.raises(KeyError, match="run failed") as info:
        child.wait(10)
    assert isinstance(info.value.__cause__, flame.RemoteTraceback)
    assert "in run" in str(info.value.__cause__)
    assert not child.alive


@pytest.mark.timeout(20)
def test_async_child_from_asyncio(pool: flame.Pool, tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def main() -> tuple[Any, ...]:
        counter = await flame.aplace_child(pool, ph.Counter, 1)
        incremented = await counter.acall("incr", 2)
        async_incremented = await counter.acall("aincr", 3)  # an async method is awaited
        await counter.astop()
        worker = await pool.aplace_child(ph.AsyncWorker, str(gate), "async run result")
        while not await worker.acall("is_running"):  # noqa: ASYNC110 - a remote state
            await asyncio.sleep(0.01)
        gate.touch()
        result = await asyncio.to_thread(worker.wait, 10)
        return incremented, async_incremented, counter.alive, result, worker.alive

    assert asyncio.run(main()) == (3, 6, False, "async run result", False)


@pytest.mark.timeout(20)
def test_child_as_context_manager_is_stopped_on_exit(pool: flame.Pool, tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    with pool.place_child(ph.Worker, str(tmp_path / "never"), "x", str(closed)) as child:
        wait_until(lambda: child.call("started"))
        assert pool.stats().in_flight == 1
    assert not child.alive
    assert closed.read_text() == "closed"
    wait_until(lambda: pool.stats().in_flight == 0)
    child.wait(1)  # ended by stop: does not raise

    aclosed = tmp_path / "aclosed"

    async def astopped() -> bool:
        c = await pool.aplace_child(ph.Worker, str(tmp_path / "never"), "y", str(aclosed))
        await c.astop()
        return c.alive

    assert asyncio.run(astopped()) is False
    assert aclosed.read_text() == "closed"


@pytest.mark.timeout(20)
def test_child_is_never_restarted_after_its_runner_dies(
    make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    pool = make_pool(flame.ProcessBackend(), max=1, max_concurrency=2, idle_shutdown_after=None)
    entered = tmp_path / "entered"
    child = pool.place_child(ph.Sleeper, str(entered))
    runner = int(entered.read_text())
    assert runner != os.getpid()
    os.kill(runner, signal.SIGKILL)
    wait_until(lambda: not child.alive)
    with pytest.raises(flame.RunnerLost, match="SIGKILL"):
        child.wait(5)
    with pytest.raises(flame.ChildEnded):
        child.call("run")
    # nothing boots to bring it back (min=0), and it stays ended
    assert holds_for(lambda: pool.stats().booting + pool.stats().runners == 0, 0.5)
    assert not child.alive
    assert entered.read_text() == str(runner)  # never built again
    assert_pids_gone([runner])


# -- links: the parent dies ------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_unlinked_work_outlives_a_killed_parent_and_linked_work_does_not(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    code = "import sys; from helpers.parent.link_parent import main as m; m(sys.argv[1], 1.0)"
    log = (tmp_path / "parent.log").open("wb")
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    runner = 0
    try:
        ready = tmp_path / "ready"
        wait_until(lambda: ready.exists() or parent.poll() is not None, 20)
        assert ready.exists(), (tmp_path / "parent.log").read_text()
        runner = int(ready.read_text())
        assert pid_alive(runner)
        parent.kill()
        parent.wait(5)
        killed_at = time.monotonic()

        # link=False: the cast and the child run to completion without their parent
        unlinked = [tmp_path / "unlinked-cast.done", tmp_path / "unlinked-child.done"]
        wait_until(lambda: all(p.exists() for p in unlinked), 10)
        # link=True: terminated at once when the parent was lost (they were due at the same
        # time as the unlinked ones, so they would have written by now)
        assert holds_for(
            lambda: (
                not (tmp_path / "linked-cast.done").exists()
                and not (tmp_path / "linked-child.done").exists()
            ),
            0.3,
        )
        # a linked child without run() was closed when the parent was lost
        assert (tmp_path / "linked-counter.closed").read_text() == "closed"
        # and the runner exits as soon as its unlinked work is done (not after the parent's
        # 10 s shutdown_timeout, nor its 30 s cancel grace)
        wait_until(lambda: not pid_alive(runner), 3)
        assert time.monotonic() - killed_at < 5
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        log.close()
        if runner and pid_alive(runner):
            os.kill(runner, signal.SIGKILL)


# -- map -------------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_map_yields_results_in_input_order_spread_over_runners(pool: flame.Pool) -> None:
    samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            samples.append(pool.stats().in_flight)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = list(pool.map(ph.square_slowly, range(20)))
    finally:
        sampling.set()
        sampler.join()
    assert [square for square, _ in results] == [x * x for x in range(20)]
    assert max(samples) <= MAX * MAX_CONCURRENCY
    if not isinstance(pool.backend, flame.LocalBackend):
        assert len({pid for _, pid in results}) == MAX  # both runners did some of the work


@pytest.mark.timeout(20)
def test_map_pulls_its_input_lazily(pool: flame.Pool) -> None:
    pulled = 0

    def items() -> Iterator[int]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield i

    results = pool.map(ph.square_or_fail, items())
    assert next(results) == 0
    # a bounded number of items is in flight, not the whole input
    assert pulled <= 2 * MAX * MAX_CONCURRENCY
    assert next(results) == 1
    results.close()  # abandoning the map leaves nothing running


@pytest.mark.timeout(20)
def test_map_raises_an_items_exception_when_that_item_is_reached(pool: flame.Pool) -> None:
    results = pool.map(ph.square_or_fail, [1, 2, "bad", 4])
    assert next(results) == 1
    assert next(results) == 4
    with pytest.raises(KeyError, match="bad item") as info:
        next(results)
    assert isinstance(info.value.__cause__, flame.RemoteTraceback)


@pytest.mark.timeout(20)
def test_amap_from_asyncio(pool: flame.Pool) -> None:
    async def main() -> tuple[list[int], list[int], BaseException | None]:
        squares = [x async for x in pool.amap(ph.async_square, range(12))]
        before_error: list[int] = []
        error: BaseException | None = None
        try:
            async for x in pool.amap(ph.square_or_fail, [3, 4, "bad", 5]):
                before_error.append(x)
        except KeyError as exc:
            error = exc
        return squares, before_error, error

    squares, before_error, error = asyncio.run(main())
    assert squares == [x * x for x in range(12)]
    assert before_error == [9, 16]
    assert isinstance(error, KeyError)
    assert isinstance(error.__cause__, flame.RemoteTraceback)


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("flame_defaults")
def test_pool_stop_ends_a_live_child_calling_close(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    flame.configure(cancel_grace=10.0)
    pool = make_pool(backend, max=1, shutdown_timeout=0.3)
    closed = tmp_path / "closed"
    child = pool.place_child(ph.Counter, 0, str(closed))
    runner = child.call("pid")
    started = time.monotonic()
    pool.stop()
    # a child without run() never finishes on its own: it is closed once shutdown_timeout
    # is over, and the runner stops cleanly right after (not once a cancel grace has passed)
    assert time.monotonic() - started < 5
    assert closed.read_text() == "closed"
    assert not child.alive
    if not isinstance(backend, flame.LocalBackend):
        assert_pids_gone([runner])
