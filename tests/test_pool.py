"""End-to-end tests of SPEC "Pools" and "Pool rules", on LocalBackend(serialize=True) and
ProcessBackend, through the public API.

Inspired by phoenixframework/flame's test/flame_test.exs (growth on demand, queueing with
timeouts, failed async boots, idle shutdown, runner DOWN failing its checkouts), written anew
for flame's Python API. Work that must be observed from here talks back through files (a
runner is another process): see ``helpers.runner.pool_work``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import flame
from helpers import assert_pids_gone, pid_alive, runner_pids, wait_until
from helpers.parent.callers import Caller, holds_for
from helpers.runner import pool_work as ph

BAD_APP = str(Path(__file__).parent / "helpers" / "runner" / "bad_app.py")


# -- fixtures --------------------------------------------------------------------------------------
class SlowBootBackend(flame.ProcessBackend):
    """A ProcessBackend whose boot takes ``delay`` seconds longer (a cold machine)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def boot(self, launch: flame.RunnerLaunch) -> flame.RunnerHandle:
        await asyncio.sleep(self.delay)
        return await super().boot(launch)


class FailsOnceBackend(flame.ProcessBackend):
    """A ProcessBackend whose boot number ``fail_at`` (1-based) fails."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.boots = 0

    async def boot(self, launch: flame.RunnerLaunch) -> flame.RunnerHandle:
        self.boots += 1
        if self.boots == self.fail_at:
            raise flame.BootError("simulated capacity error")
        return await super().boot(launch)


class NoCapacityBackend(flame.Backend):
    """A custom backend whose boot always fails."""

    name = "nocapacity"

    def __init__(self) -> None:
        self.boots = 0

    async def boot(self, launch: flame.RunnerLaunch) -> flame.RunnerHandle:
        self.boots += 1
        raise RuntimeError("no capacity left in region xyz")


def _gate_files(tmp_path: Path, n: int) -> tuple[str, list[Path]]:
    gate = tmp_path / "gate"
    return str(gate), [tmp_path / f"entered-{i}" for i in range(n)]


# -- growth and concurrency ------------------------------------------------------------------------
@pytest.mark.timeout(40)
def test_thirty_concurrent_callers_never_exceed_max_runners_or_concurrency(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool]
) -> None:
    grow_starts: list[dict[str, Any]] = []
    pool = make_pool(
        backend,
        max=3,
        max_concurrency=2,
        idle_shutdown_after=None,
        on_grow_start=lambda meta: grow_starts.append(dict(meta)),
    )
    outside = runner_pids()
    pool.start()
    samples: list[flame.PoolStats] = []
    processes: list[int] = []  # runner processes alive, sampled (process backends)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            samples.append(pool.stats())
            if not isinstance(backend, flame.LocalBackend):
                processes.append(len(runner_pids() - outside))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    barrier = threading.Barrier(30)

    def one() -> tuple[int, int]:
        barrier.wait()
        return flame.call(pool, ph.hold, 0.15, timeout=30)

    callers = [Caller(one) for _ in range(30)]
    try:
        results = [c.outcome(35) for c in callers]
    finally:
        sampling.set()
        sampler.join()

    assert len(results) == 30
    # the pool never had more than max runners, booting and retiring ones included
    assert max(s.runners + s.booting + s.retiring for s in samples) <= 3
    assert max(s.in_flight for s in samples) <= 3 * 2
    assert max(s.waiting for s in samples) > 0, "the burst should have queued callers"
    assert 1 <= len(grow_starts) <= 3
    assert all(m["count"] <= 3 for m in grow_starts)
    if not isinstance(backend, flame.LocalBackend):
        assert max(processes) <= 3  # never more than max runner processes, either
        pids = collections.Counter(pid for pid, _ in results)
        assert len(pids) == 3  # it grew to max, and no further
        # each runner process saw at most max_concurrency calls at once
        assert max(at_entry for _, at_entry in results) <= 2
    else:
        assert max(at_entry for _, at_entry in results) <= 3 * 2


@pytest.mark.timeout(20)
def test_queue_is_fifo_and_skips_callers_whose_deadline_passed(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    pool = make_pool(backend, max=1, max_concurrency=1, idle_shutdown_after=None)
    pool.start()
    gate, (entered,) = _gate_files(tmp_path, 1)
    holder = Caller(pool.call, ph.gated, str(entered), gate, timeout=15)
    wait_until(entered.exists)

    expiring = Caller(pool.call, ph.stamp, "expiring", timeout=0.3)
    wait_until(lambda: pool.stats().waiting == 1)
    queued = []
    for i, token in enumerate("abc", start=2):
        queued.append(Caller(pool.call, ph.stamp, token, timeout=15))
        wait_until(lambda i=i: pool.stats().waiting == i)  # type: ignore[misc]

    # the expired caller is told at its deadline, while the slot is still taken
    err = expiring.failure(5)
    assert isinstance(err, flame.CallTimeout)
    assert isinstance(err, TimeoutError)
    assert expiring.elapsed < 1.5
    assert entered.exists() and not Path(gate).exists()
    wait_until(lambda: pool.stats().waiting == 3)

    Path(gate).touch()
    assert holder.outcome() > 0
    served = [c.outcome() for c in queued]
    assert [token for token, _, _ in served] == ["a", "b", "c"]
    starts = [started for _, started, _ in served]
    assert starts == sorted(starts), "queued callers were not served first in, first out"
    assert pool.stats().waiting == 0


@pytest.mark.timeout(20)
def test_a_cancelled_waiter_is_skipped(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    pool = make_pool(backend, max=1, max_concurrency=1, idle_shutdown_after=None)
    pool.start()
    gate, (entered,) = _gate_files(tmp_path, 1)
    holder = Caller(pool.call, ph.gated, str(entered), gate, timeout=15)
    wait_until(entered.exists)
    never = tmp_path / "never"

    async def cancel_while_queued() -> bool:
        task = asyncio.create_task(pool.acall(ph.write_after, str(never), 0.0, timeout=15))
        while pool.stats().waiting != 1:  # noqa: ASYNC110 - the pool's state, polled
            await asyncio.sleep(0.005)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(cancel_while_queued())
    wait_until(lambda: pool.stats().waiting == 0)
    Path(gate).touch()
    assert holder.outcome() > 0
    # the slot goes to the next caller; the cancelled one's work never ran
    assert pool.call(ph.pid, timeout=5) > 0
    assert not never.exists()
    wait_until(lambda: pool.stats().in_flight == 0)


@pytest.mark.timeout(20)
def test_call_timeout_covers_a_cold_boot(make_pool: Callable[..., flame.Pool]) -> None:
    backend = SlowBootBackend(delay=0.8)
    pool = make_pool(backend, max=1, max_concurrency=2, idle_shutdown_after=None)
    pool.start()
    # booting (0.8 s + process start) plus running (0.8 s) does not fit in 1.2 s
    slow = Caller(pool.call, ph.hold, 0.8, timeout=1.2)
    wait_until(lambda: pool.stats().booting == 1)
    assert repr(pool) == f"<Pool {pool.name!r} runners=0 booting=1 in_flight=0 waiting=1>"
    err = slow.failure(10)
    assert isinstance(err, flame.CallTimeout)
    # (a timeout on the run alone would end after boot + 1.2 s, at 2.3 s or later)
    assert 1.1 <= slow.elapsed < 2.2, slow.elapsed
    # the runner still came up and serves what comes next
    pid, _ = pool.call(ph.hold, 0.0, timeout=10)
    assert pid != os.getpid()


@pytest.mark.timeout(20)
def test_calls_go_to_the_least_busy_runner(
    make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    pool = make_pool(
        flame.ProcessBackend(), min=2, max=2, max_concurrency=4, idle_shutdown_after=None
    )
    pool.start()
    assert pool.stats().runners == 2
    gate, entered = _gate_files(tmp_path, 4)
    callers = []
    for path in entered:
        callers.append(Caller(pool.call, ph.gated, str(path), gate, timeout=15))
        wait_until(path.exists)
    placed = collections.Counter(int(p.read_text()) for p in entered)
    # 1st -> A, 2nd -> B (idle), 3rd -> either (1 each), 4th -> the other one
    assert sorted(placed.values()) == [2, 2], placed
    Path(gate).touch()
    for c in callers:
        c.outcome()


# -- boot failures ---------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_app_that_fails_to_import_fails_callers_at_once_without_retry_storm(
    make_pool: Callable[..., flame.Pool],
) -> None:
    grow_starts: list[dict[str, Any]] = []
    grow_ends: list[tuple[Any, dict[str, Any]]] = []
    pool = make_pool(
        flame.ProcessBackend(app=BAD_APP),
        max=2,
        max_concurrency=1,
        on_grow_start=lambda meta: grow_starts.append(dict(meta)),
        on_grow_end=lambda result, meta: grow_ends.append((result, dict(meta))),
    )
    pool.start()  # min=0: nothing booted yet

    started = time.monotonic()
    with pytest.raises(flame.BootError) as info:
        pool.call(ph.pid, timeout=20)
    assert time.monotonic() - started < 5, "the caller waited out its timeout"
    message = str(info.value)
    assert "importing the application raised" in message
    assert "bad_app_marker" in message  # the runner's own traceback, from its stderr
    assert isinstance(info.value.__cause__, flame.BootError)
    wait_until(lambda: grow_ends)
    result, meta = grow_ends[0]
    assert isinstance(result, flame.BootError)
    assert meta["name"] == pool.name
    assert grow_starts[0] == {"name": pool.name, "count": 1}

    # three callers keep asking for ~2 s: every one gets a BootError quickly, and the 1 s
    # debounce keeps boot attempts to a handful (never past max at once)
    attempts_before = len(grow_starts)
    errors: list[BaseException] = []
    durations: list[float] = []
    until = time.monotonic() + 2.0

    def keep_calling() -> None:
        while time.monotonic() < until:
            t0 = time.monotonic()
            try:
                pool.call(ph.pid, timeout=10)
            except BaseException as exc:
                errors.append(exc)
            durations.append(time.monotonic() - t0)

    threads = [threading.Thread(target=keep_calling) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    attempts = len(grow_starts) - attempts_before
    assert errors and all(isinstance(e, flame.BootError) for e in errors), errors
    assert max(durations) < 3.0
    assert attempts <= 2 * 3, f"{attempts} boot attempts in ~2 s"
    assert all(m["count"] <= 2 for m in grow_starts)
    wait_until(lambda: pool.stats().booting == 0)
    assert pool.stats().runners == 0


@pytest.mark.timeout(20)
def test_failed_growth_is_retried_after_the_debounce_while_a_runner_is_busy(
    make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    grow_starts: list[dict[str, Any]] = []
    grow_ends: list[tuple[Any, dict[str, Any]]] = []
    pool = make_pool(
        FailsOnceBackend(fail_at=2),
        min=1,
        max=2,
        max_concurrency=1,
        idle_shutdown_after=None,
        on_grow_start=lambda meta: grow_starts.append(dict(meta)),
        on_grow_end=lambda result, meta: grow_ends.append((result, dict(meta))),
    )
    pool.start()
    gate, (entered,) = _gate_files(tmp_path, 1)
    holder = Caller(pool.call, ph.gated, str(entered), gate, timeout=15)
    wait_until(entered.exists)
    # the min runner is busy: this caller makes the pool grow, and the first try fails
    queued = Caller(pool.call, ph.pid, timeout=15)
    wait_until(lambda: grow_ends)
    assert isinstance(grow_ends[0][0], flame.BootError)
    assert grow_ends[0][1] == {"name": pool.name, "count": 1}
    assert queued.is_alive(), "a runner is up (busy): the caller keeps waiting"
    # the retry (after the 1 s debounce) succeeds and serves the queued caller
    served_by = queued.outcome(10)
    assert queued.elapsed >= 0.9
    assert served_by != int(entered.read_text())
    assert [m["count"] for m in grow_starts] == [2, 2]
    wait_until(lambda: len(grow_ends) == 2)  # hooks run on the loop, after the hand-out
    assert grow_ends[1] == ("ok", {"name": pool.name, "count": 2})
    Path(gate).touch()
    holder.outcome()


@pytest.mark.timeout(20)
def test_start_with_min_on_a_failing_backend_raises_and_leaves_nothing_running(
    make_pool: Callable[..., flame.Pool],
) -> None:
    before = runner_pids()
    pool = make_pool(flame.ProcessBackend(app=BAD_APP), min=1, max=2)
    with pytest.raises(flame.BootError) as info:
        pool.start()
    assert "importing the application raised" in str(info.value)
    stats = pool.stats()
    assert (stats.runners, stats.booting, stats.in_flight) == (0, 0, 0)
    assert runner_pids() <= before
    # it was never registered, and it takes no calls
    with pytest.raises(flame.PoolNotFound):
        flame.call(pool.name, ph.pid)
    with pytest.raises(flame.FlameError):
        pool.call(ph.pid)
    # and no boot loop carries on behind our back
    assert holds_for(lambda: runner_pids() <= before, 1.2)


@pytest.mark.timeout(20)
def test_custom_backend_whose_boot_raises(make_pool: Callable[..., flame.Pool]) -> None:
    backend = NoCapacityBackend()
    pool = make_pool(backend, max=2)
    started = time.monotonic()
    with pytest.raises(flame.BootError) as info:
        pool.call(ph.pid, timeout=20)
    assert time.monotonic() - started < 3
    assert "no capacity left in region xyz" in str(info.value)
    assert "nocapacity" in str(info.value)  # which backend refused

    # a boot that fails instantly, and callers that keep coming for ~1.2 s: without the 1 s
    # debounce this would be thousands of boots
    errors: list[BaseException] = []
    until = time.monotonic() + 1.2

    def keep_calling() -> None:
        while time.monotonic() < until:
            try:
                pool.call(ph.pid, timeout=10)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=keep_calling) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors and all(isinstance(e, flame.BootError) for e in errors), errors
    assert backend.boots <= 4, f"{backend.boots} boots in ~1.2 s"
    boots = backend.boots

    min_backend = NoCapacityBackend()
    with pytest.raises(flame.BootError, match="no capacity left in region xyz"):
        make_pool(min_backend, min=1, max=1).start()
    # no restart loop: neither the pool nobody waits on nor the one that failed to start
    # boots again, though the 1 s retry debounce has passed
    assert holds_for(lambda: (backend.boots, min_backend.boots) == (boots, 1), 1.3), (
        backend.boots,
        min_backend.boots,
    )


# -- runner death ----------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_killed_runner_fails_in_flight_calls_and_min_is_restored(
    make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    shrinks: list[dict[str, Any]] = []
    grow_starts: list[dict[str, Any]] = []
    pool = make_pool(
        flame.ProcessBackend(),
        min=1,
        max=1,
        max_concurrency=2,
        idle_shutdown_after=None,
        on_shrink=lambda meta: shrinks.append(dict(meta)),
        on_grow_start=lambda meta: grow_starts.append(dict(meta)),
    )
    pool.start()
    gate, entered = _gate_files(tmp_path, 2)
    callers = [Caller(pool.call, ph.gated, str(p), gate, timeout=15) for p in entered]
    wait_until(lambda: all(p.exists() for p in entered))
    victim = int(entered[0].read_text())
    assert victim == int(entered[1].read_text()) != os.getpid()

    os.kill(victim, signal.SIGKILL)
    for c in callers:
        err = c.failure(10)
        assert isinstance(err, flame.RunnerLost), err
        assert "SIGKILL" in str(err)
        assert c.elapsed < 5
    wait_until(lambda: shrinks)
    assert shrinks[0] == {"name": pool.name, "count": 0}
    # the pool is below min=1: it boots a replacement on its own
    wait_until(lambda: pool.stats().runners == 1, 10)
    assert pool.call(ph.pid, timeout=10) not in (victim, os.getpid())
    assert not pid_alive(victim)
    assert grow_starts == []  # replacing a min runner is not growth


# -- idle shutdown and single use ------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_runners_beyond_min_idle_down_and_min_is_kept(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    shrinks: list[dict[str, Any]] = []
    pool = make_pool(
        backend,
        min=1,
        max=3,
        max_concurrency=1,
        idle_shutdown_after=0.5,
        on_shrink=lambda meta: shrinks.append(dict(meta)),
    )
    outside = runner_pids()
    pool.start()
    # three calls at once on max_concurrency=1: the pool grows to three runners
    gate, entered = _gate_files(tmp_path, 3)
    callers = [Caller(pool.call, ph.gated, str(p), gate, timeout=15) for p in entered]
    wait_until(lambda: all(p.exists() for p in entered))
    assert pool.stats().runners == 3
    Path(gate).touch()
    served = {c.outcome() for c in callers}
    wait_until(lambda: len(shrinks) == 2, 8)
    stats = pool.stats()
    assert (stats.runners, stats.booting) == (1, 0)
    assert sorted(m["count"] for m in shrinks) == [1, 2]
    assert all(m["name"] == pool.name for m in shrinks)
    # the last runner stays (min=1), however long it idles
    assert holds_for(lambda: pool.stats().runners == 1, 0.8)
    assert len(shrinks) == 2
    if not isinstance(backend, flame.LocalBackend):
        assert len(served) == 3
        # the runners that idled down exited; exactly one runner process is left (of those
        # that served, which for a container backend need not be our descendants)
        (kept,) = wait_until(
            lambda: (left := {p for p in served if pid_alive(p)}) and len(left) == 1 and left
        )
        assert_pids_gone(served - {kept})
        assert not runner_pids() - outside - {kept}


@pytest.mark.timeout(20)
def test_min_runners_idle_down_after_min_idle_shutdown_after(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool]
) -> None:
    shrinks: list[dict[str, Any]] = []
    pool = make_pool(
        backend,
        min=1,
        max=1,
        idle_shutdown_after=0.2,
        min_idle_shutdown_after=0.6,
        on_shrink=lambda meta: shrinks.append(dict(meta)),
    )
    pool.start()
    first = pool.call(ph.whoami)
    started = time.monotonic()
    wait_until(lambda: shrinks, 5)
    assert time.monotonic() - started >= 0.3, "the min runner used idle_shutdown_after"
    assert shrinks[0] == {"name": pool.name, "count": 0}
    if not isinstance(backend, flame.LocalBackend):
        wait_until(lambda: not pid_alive(first[0]))
    # the pool still serves calls afterwards
    assert pool.call(ph.whoami, timeout=10)


@pytest.mark.timeout(20)
def test_min_runner_idled_down_is_not_replaced_while_the_pool_stays_idle(
    make_pool: Callable[..., flame.Pool],
) -> None:
    shrinks: list[dict[str, Any]] = []
    pool = make_pool(
        flame.LocalBackend(serialize=True),
        min=1,
        max=1,
        min_idle_shutdown_after=0.3,
        on_shrink=lambda meta: shrinks.append(dict(meta)),
    )
    pool.start()
    wait_until(lambda: shrinks, 5)
    # idle with nothing to do: it stays at zero rather than booting a runner to idle again
    assert holds_for(lambda: pool.stats().runners + pool.stats().booting == 0, 1.0)
    assert len(shrinks) == 1
    # the next caller brings it back
    assert pool.call(ph.pid, timeout=10)


@pytest.mark.timeout(20)
def test_single_use_runners_serve_one_call_and_min_is_kept(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool]
) -> None:
    shrinks: list[dict[str, Any]] = []
    pool = make_pool(
        backend,
        min=1,
        max=2,
        single_use=True,
        on_shrink=lambda meta: shrinks.append(dict(meta)),
    )
    pool.start()
    pids = []
    for round_ in range(1, 3):
        pids.append(pool.call(ph.pid, timeout=10))
        wait_until(lambda round_=round_: len(shrinks) == round_)  # type: ignore[misc]
        # the used runner is gone, and a fresh one replaces it (min=1)
        wait_until(
            lambda: (pool.stats().runners, pool.stats().booting, pool.stats().retiring) == (1, 0, 0)
        )
    if not isinstance(backend, flame.LocalBackend):
        assert len(set(pids)) == 2
        assert_pids_gone(pids)


# -- hooks -----------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_hooks_get_name_and_count_and_a_raising_hook_is_logged(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool], caplog: pytest.LogCaptureFixture
) -> None:
    grow_ends: list[tuple[Any, dict[str, Any]]] = []
    shrinks: list[dict[str, Any]] = []

    def broken_grow_start(meta: dict[str, Any]) -> None:
        raise RuntimeError("hook failure marker")

    def shrink(meta: dict[str, Any]) -> None:
        shrinks.append(dict(meta))
        raise RuntimeError("shrink hook failure marker")

    pool = make_pool(
        backend,
        max=2,
        max_concurrency=1,
        idle_shutdown_after=0.3,
        on_grow_start=broken_grow_start,
        on_grow_end=lambda result, meta: grow_ends.append((result, dict(meta))),
        on_shrink=shrink,
    )
    with caplog.at_level(logging.ERROR, logger="flame"):
        pool.start()
        assert pool.call(ph.hold, 0.0)[0] > 0
        wait_until(lambda: grow_ends)
        assert grow_ends[0] == ("ok", {"name": pool.name, "count": 1})
        failed = wait_until(
            lambda: [r for r in caplog.records if "hook failure marker" in (r.exc_text or "")]
        )
        assert failed[0].name == "flame"
        assert "on_grow_start" in failed[0].getMessage()
        # the runner idles down; the raising on_shrink is logged too
        wait_until(lambda: shrinks)
        assert shrinks[0] == {"name": pool.name, "count": 0}
        wait_until(
            lambda: any("shrink hook failure marker" in (r.exc_text or "") for r in caplog.records)
        )
        # the pool keeps working
        assert [pool.call(ph.hold, 0.0)[0] > 0 for _ in range(2)] == [True, True]


# -- boot ahead ------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_boot_ahead_boots_the_next_runner_before_the_current_ones_are_full(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    pool = make_pool(backend, max=3, max_concurrency=4, boot_ahead=2, idle_shutdown_after=None)
    pool.start()
    gate, entered = _gate_files(tmp_path, 3)
    callers = [Caller(pool.call, ph.gated, str(entered[0]), gate, timeout=15)]
    wait_until(entered[0].exists)
    # 3 free slots left >= boot_ahead: no new runner
    assert holds_for(lambda: pool.stats().runners + pool.stats().booting == 1, 0.3)
    for path in entered[1:]:
        callers.append(Caller(pool.call, ph.gated, str(path), gate, timeout=15))
        wait_until(path.exists)
    # 1 free slot < boot_ahead: the next runner boots though nobody waits yet
    wait_until(lambda: pool.stats().runners == 2, 10)
    assert pool.stats().waiting == 0
    # now 5 free slots: no third runner
    assert holds_for(lambda: pool.stats().runners + pool.stats().booting == 2, 0.3)
    Path(gate).touch()
    for c in callers:
        c.outcome()


# -- stop ------------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_stop_drains_in_flight_work_then_stops_runners_and_is_idempotent(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool]
) -> None:
    pool = make_pool(backend, max=2, max_concurrency=2, shutdown_timeout=10)
    pool.start()
    working = [Caller(pool.call, ph.hold, 0.5, timeout=10) for _ in range(3)]
    wait_until(lambda: pool.stats().in_flight == 3)
    started = time.monotonic()
    pool.stop()
    assert time.monotonic() - started < 5
    results = [c.outcome(1) for c in working]  # finished, with their results
    assert all(pid > 0 for pid, _ in results)
    stats = pool.stats()
    assert (stats.runners, stats.booting, stats.in_flight, stats.waiting) == (0, 0, 0, 0)
    if not isinstance(backend, flame.LocalBackend):
        assert_pids_gone({pid for pid, _ in results})
    pool.stop()  # a second stop is a no-op
    asyncio.run(pool.astop())


@pytest.mark.timeout(20)
@pytest.mark.usefixtures("flame_defaults")
def test_stop_cancels_work_that_outlives_shutdown_timeout(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool]
) -> None:
    flame.configure(cancel_grace=0.5)
    pool = make_pool(backend, max=1, max_concurrency=2, shutdown_timeout=0.3)
    pool.start()
    pid = pool.call(ph.pid)
    stuck = Caller(pool.call, ph.hold, 30, timeout=None)
    wait_until(lambda: pool.stats().in_flight == 1)
    started = time.monotonic()
    pool.stop()
    assert time.monotonic() - started < 4
    err = stuck.failure(5)
    assert isinstance(err, flame.FlameError), err
    if not isinstance(backend, flame.LocalBackend):
        assert_pids_gone([pid])


@pytest.mark.timeout(20)
def test_stopped_pool_refuses_calls_and_waiting_callers_get_pool_closed(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    pool = make_pool(backend, max=1, max_concurrency=1, shutdown_timeout=5)
    pool.start()
    gate, (entered,) = _gate_files(tmp_path, 1)
    holder = Caller(pool.call, ph.gated, str(entered), gate, timeout=15)
    wait_until(entered.exists)
    waiters = [Caller(pool.call, ph.pid, timeout=15) for _ in range(2)]
    wait_until(lambda: pool.stats().waiting == 2)

    stopper = Caller(pool.stop)
    for w in waiters:
        err = w.failure(3)
        assert isinstance(err, flame.PoolClosed), err
        assert isinstance(err, flame.FlameError)
    assert stopper.is_alive(), "stop should still be draining the holder's call"
    Path(gate).touch()
    assert holder.outcome() > 0
    stopper.outcome()

    with pytest.raises(flame.PoolClosed, match=re.escape(pool.name)):
        pool.call(ph.pid)
    with pytest.raises(flame.PoolClosed):
        asyncio.run(pool.acall(ph.pid))
    with pytest.raises(flame.PoolClosed):
        pool.cast(ph.pid)
    with pytest.raises(flame.PoolNotFound):
        flame.call(pool.name, ph.pid)
    with pytest.raises(flame.PoolClosed):
        pool.start()


# -- introspection ---------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_stats_and_repr_tell_the_state(
    backend: flame.Backend, make_pool: Callable[..., flame.Pool], tmp_path: Path
) -> None:
    pool = make_pool(backend, min=0, max=1, max_concurrency=2, idle_shutdown_after=None)
    stats = pool.stats()
    assert isinstance(stats, flame.PoolStats)
    assert (stats.runners, stats.booting, stats.in_flight, stats.waiting) == (0, 0, 0, 0)
    assert (stats.min, stats.max, stats.max_concurrency) == (0, 1, 2)
    assert repr(pool) == f"<Pool {pool.name!r} runners=0 booting=0 in_flight=0 waiting=0>"
    pool.start()
    gate, entered = _gate_files(tmp_path, 2)
    callers = [Caller(pool.call, ph.gated, str(p), gate, timeout=15) for p in entered]
    wait_until(lambda: all(p.exists() for p in entered))
    callers.append(Caller(pool.call, ph.pid, timeout=15))
    wait_until(lambda: pool.stats().waiting == 1)
    stats = pool.stats()
    assert (stats.runners, stats.booting, stats.in_flight, stats.waiting) == (1, 0, 2, 1)
    assert (stats.min, stats.max, stats.max_concurrency) == (0, 1, 2)
    assert repr(pool) == f"<Pool {pool.name!r} runners=1 booting=0 in_flight=2 waiting=1>"
    Path(gate).touch()
    for c in callers:
        c.outcome()
    wait_until(lambda: pool.stats().in_flight == 0)
    assert repr(pool) == f"<Pool {pool.name!r} runners=1 booting=0 in_flight=0 waiting=0>"
