"""Burst scale-out: an empty pool takes 8 concurrent slow calls and grows to 8 runners.

Each sample makes a new ``Pool(min=0, max=8, max_concurrency=1)``, releases 8 threads at
once, each doing ``flame.call(pool, sleep_for, 0.5)``, and times from the release to the
last result. Interleaved with those samples, one runner's boot (an empty pool to the first
result of a trivial call) is timed, and the burst is reported against the target
``3 x boot + 0.5 s``: a ratio of at most 1.0 means the target holds.
"""

from __future__ import annotations

import threading
import time

import flame

from .harness import Counts, Figure, figure, relate
from .work import noop, sleep_for

CALLS = 8
SLEEP = 0.5
GROUP = f"burst scale-out: {CALLS} x sleep({SLEEP}) on an empty pool"


def _pool(name: str, max_runners: int) -> flame.Pool:
    return flame.Pool(
        name, min=0, max=max_runners, max_concurrency=1, backend=flame.ProcessBackend()
    )


def boot_once() -> float:
    """Seconds from an empty, started pool to the first result of a trivial call."""
    pool = _pool("bench-boot", 1).start()
    try:
        t = time.perf_counter()
        flame.call(pool, noop)
        return time.perf_counter() - t
    finally:
        pool.stop()


def burst_once() -> float:
    """Seconds from releasing ``CALLS`` waiting threads to the last of their results."""
    pool = _pool("bench-burst", CALLS).start()
    go = threading.Event()
    results: list[object] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def caller() -> None:
        go.wait()
        try:
            r = flame.call(pool, sleep_for, SLEEP, timeout=60)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(r)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(CALLS)]
    try:
        for th in threads:
            th.start()
        time.sleep(0.05)  # let every thread reach go.wait()
        t = time.perf_counter()
        go.set()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t
    finally:
        go.set()
        pool.stop()
    if errors:
        raise errors[0]
    if len(results) != CALLS:
        raise RuntimeError(f"burst got {len(results)} results out of {CALLS}")
    return elapsed


def bench_burst(counts: Counts) -> list[Figure]:
    boots: list[float] = []
    bursts: list[float] = []
    for _ in range(counts.burst_runs):
        boots.append(boot_once())
        bursts.append(burst_once())
    boot = figure(GROUP, "one runner's boot: empty pool -> first result", boots)
    assert boot.median is not None and boot.min is not None and boot.max is not None
    target = Figure(
        GROUP,
        f"target: 3 x boot + {SLEEP} s",
        3 * boot.median + SLEEP,
        3 * boot.min + SLEEP,
        3 * boot.max + SLEEP,
        "s",
        boot.samples,
    )
    burst = relate(
        figure(GROUP, f"Pool(max={CALLS}, max_concurrency=1): {CALLS} calls -> all", bursts),
        target,
    )
    return [boot, target, burst]
