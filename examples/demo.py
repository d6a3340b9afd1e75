"""The flame demo: a burst of CPU-heavy work moves off this process onto elastic runners.

Run it with ``make demo``. It uses ``ProcessBackend`` (local processes, no cloud account):
the pool starts empty, boots runners up to ``max`` as the burst arrives, queues the callers
it cannot serve yet, and once the burst is over the runners idle down to zero. Every step
is printed as it happens.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import flame

START = time.monotonic()


def say(message: str) -> None:
    # one write per line: callers in several threads say things at once
    sys.stdout.write(f"[{time.monotonic() - START:6.2f}s] {message}\n")
    sys.stdout.flush()


def count_primes(limit: int) -> tuple[int, str, int]:
    """CPU-heavy work: count the primes below ``limit`` the slow way."""
    found = 0
    for n in range(2, limit):
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            found += 1
    runner = flame.parent()
    return found, (runner.runner_id if runner else "parent"), os.getpid()


def main() -> None:
    say(f"parent pid {os.getpid()}: a burst of 12 jobs arrives")
    pool = flame.Pool(
        "primes",
        min=0,
        max=3,
        max_concurrency=2,
        backend=flame.ProcessBackend(),
        idle_shutdown_after=2.0,
        on_grow_start=lambda meta: say(f"booting a runner (pool grows to {meta['count']})"),
        on_grow_end=lambda result, meta: say(f"runner boot finished: {result}"),
        on_shrink=lambda meta: say(f"a runner went away (pool shrinks to {meta['count']})"),
    )
    with pool:
        results: list[str] = []
        lock = threading.Lock()

        def job(i: int) -> None:
            found, runner, pid = flame.call(pool, count_primes, 60_000 + 1_000 * i)
            line = f"job {i:2d}: {found} primes, on {runner} (pid {pid})"
            with lock:
                results.append(line)
            say(line)

        threads = [threading.Thread(target=job, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        say(f"while the burst runs: {pool!r}")
        for t in threads:
            t.join()
        say(f"burst done: {pool!r}")
        say("waiting for the idle runners to shut down...")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            stats = pool.stats()
            if stats.runners == 0 and stats.booting == 0 and stats.retiring == 0:
                break
            time.sleep(0.25)
        say(f"idle again: {pool!r}")
    say("pool stopped; nothing left running")


if __name__ == "__main__":
    main()
