"""Boots: one runner's boot, a burst of 8 on an empty pool, and a process's first boot.

``ProcessBackend`` forks runners from its fork server; each figure is also taken with
``fork_server=False`` (every runner spawned as ``python -m flame runner``), in turns.

* *one cold call*: a new, started ``Pool(min=0, max=1)``, then ``flame.call(pool,
  sleep_for, 0.5)``, timed from the call to its result (the baseline of the burst);
* *burst*: a new ``Pool(min=0, max=8, max_concurrency=1)``; 8 waiting threads are released at
  once, each doing ``flame.call(pool, sleep_for, 0.5)``; timed from the release to the last
  result. Target: at most 1.5x one cold call;
* *boot*: an empty, started pool to the first result of a trivial call;
* *a process's first boot*: the same, in a new interpreter that has imported flame and
  nothing else yet (``python -m bench.burst --first-boot``), so its fork server is started
  by this very boot; the interpreter's own start is not timed.

The fork server is shared by every pool of a process: after the first boot of the run, the
forked figures are those of a process whose fork server is up.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import flame

from .harness import Counts, Figure, figure, interleaved, relate, self_timed
from .work import noop, sleep_for

CALLS = 8
SLEEP = 0.5
GROUP = f"boots, and a burst of {CALLS} x sleep({SLEEP}) on an empty pool"
HOW = {"forked": True, "spawned": False}


def _pool(name: str, max_runners: int, forked: bool) -> flame.Pool:
    return flame.Pool(
        name,
        min=0,
        max=max_runners,
        max_concurrency=1,
        backend=flame.ProcessBackend(fork_server=forked),
    )


def boot_once(forked: bool = True) -> float:
    """Seconds from an empty, started pool to the first result of a trivial call."""
    pool = _pool("bench-boot", 1, forked).start()
    try:
        t = time.perf_counter()
        flame.call(pool, noop)
        return time.perf_counter() - t
    finally:
        pool.stop()


def cold_call_once(forked: bool = True) -> float:
    """Seconds from an empty, started pool to the result of one ``sleep_for(SLEEP)``."""
    pool = _pool("bench-cold-sleep", 1, forked).start()
    try:
        t = time.perf_counter()
        flame.call(pool, sleep_for, SLEEP, timeout=60)
        return time.perf_counter() - t
    finally:
        pool.stop()


def burst_once(forked: bool = True) -> float:
    """Seconds from releasing ``CALLS`` waiting threads to the last of their results."""
    pool = _pool("bench-burst", CALLS, forked).start()
    ready = threading.Barrier(CALLS + 1)
    go = threading.Event()
    results: list[object] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def caller() -> None:
        ready.wait()
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
        ready.wait()  # every thread is about to wait for the release
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


def first_boot_once(forked: bool = True) -> float:
    """:func:`boot_once` in a new interpreter, as its first boot (see the module's doc)."""
    argv = [sys.executable, "-m", "bench.burst", "--first-boot", "fork" if forked else "spawn"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def bench_burst(counts: Counts) -> list[Figure]:
    n = counts.burst_runs
    subjects = [
        (f"one cold call of sleep({SLEEP}): empty pool -> result", cold_call_once),
        (f"Pool(max={CALLS}, max_concurrency=1): {CALLS} calls -> all", burst_once),
        ("one runner's boot: empty pool -> first result", boot_once),
        ("a new process's first boot: empty pool -> first result", first_boot_once),
    ]
    samplers = []
    for _, fn in subjects:
        for forked in HOW.values():
            samplers.append(self_timed(lambda fn=fn, forked=forked: fn(forked)))
    times = iter(interleaved(samplers, n, rounds=n))
    rows: dict[tuple[str, str], Figure] = {}
    for name, _ in subjects:
        for how in HOW:
            rows[name, how] = figure(GROUP, f"{how}: {name}", next(times))
    cold, burst = subjects[0][0], subjects[1][0]
    figs: list[Figure] = []
    for how in HOW:
        figs.append(rows[cold, how])
        figs.append(relate(rows[burst, how], rows[cold, how]))
    boots = [rows[name, how] for name, _ in subjects[2:] for how in HOW]
    base = boots[1]  # a spawned runner's boot, as before the fork server
    return [*figs, base, *(relate(f, base) for f in boots if f is not base)]


def _first_boot(how: str) -> None:
    """The child of :func:`first_boot_once`: print the seconds its first boot took."""
    print(f"{boot_once(how == 'fork'):.6f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--first-boot"]:
        _first_boot(sys.argv[2])
