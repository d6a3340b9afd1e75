"""The parent's memory: RSS growth per idle runner and per call in flight.

Each sample runs in a fresh interpreter (``python -m bench.memory``), so that memory freed
by earlier benchmarks and kept by the allocator does not hide the growth. The child prints
one JSON object; the parent turns the samples into figures (KiB, medians over samples):

* per idle runner: RSS with a started ``min=8`` pool minus RSS with a started ``min=0``
  pool, over 8, each measured once the pool is ready and after a garbage collection;
* per call in flight: 64 ``flame.acall`` of a sleeping function on one runner with
  ``max_concurrency=64`` (RSS delta over 64), against 64 asyncio tasks that only sleep;
  and the same with 64 threads doing ``flame.call``, against 64 threads that only sleep
  (a thread's stack and state are what a sync caller pays anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import flame

from .harness import Counts, Figure, figure, relate, settled_rss
from .work import noop, sleep_for

GROUP = "parent memory (RSS growth)"
RUNNERS = 8
IN_FLIGHT = 64
HOLD = 1.5  # seconds each in-flight call sleeps: long enough to measure while they wait


def _wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the in-flight calls never all started")
        time.sleep(0.01)


def _per_idle_runner() -> float:
    """Bytes of parent RSS per idle runner (min=8 pool vs min=0 pool)."""
    with flame.Pool("bench-mem-0", min=0, max=1, backend=flame.ProcessBackend()):
        before = settled_rss()
        with flame.Pool(
            "bench-mem-8", min=RUNNERS, max=RUNNERS, backend=flame.ProcessBackend()
        ) as pool:
            _wait_until(lambda: pool.stats().runners == RUNNERS)
            after = settled_rss()
    return (after - before) / RUNNERS


def _threads(target: Callable[[], object], ready: Callable[[], bool]) -> float:
    """Bytes of RSS per thread while IN_FLIGHT threads run ``target``."""
    before = settled_rss()
    threads = [threading.Thread(target=target, daemon=True) for _ in range(IN_FLIGHT)]
    for th in threads:
        th.start()
    _wait_until(ready)
    after = settled_rss()
    for th in threads:
        th.join()
    return (after - before) / IN_FLIGHT


async def _tasks(make: Callable[[], Awaitable[object]], ready: Callable[[], bool]) -> float:
    """Bytes of RSS per task while IN_FLIGHT asyncio tasks run ``make()``."""
    before = settled_rss()
    tasks = [asyncio.ensure_future(make()) for _ in range(IN_FLIGHT)]
    while not ready():  # noqa: ASYNC110 (polls pool.stats(), which has no event to wait on)
        await asyncio.sleep(0.01)
    after = settled_rss()
    await asyncio.gather(*tasks)
    return (after - before) / IN_FLIGHT


def _per_call() -> dict[str, float]:
    out: dict[str, float] = {}
    count = [0]
    lock = threading.Lock()

    def plain_sleep() -> None:
        with lock:
            count[0] += 1
        time.sleep(HOLD)

    out["thread"] = _threads(plain_sleep, lambda: count[0] == IN_FLIGHT)
    with flame.Pool(
        "bench-mem-calls",
        min=1,
        max=1,
        max_concurrency=IN_FLIGHT,
        backend=flame.ProcessBackend(),
    ) as pool:
        flame.call(pool, noop)

        def busy() -> bool:
            return pool.stats().in_flight == IN_FLIGHT

        out["call"] = _threads(lambda: flame.call(pool, sleep_for, HOLD), busy)

        async def tasks() -> None:
            await flame.acall(pool, noop)
            count[0] = 0

            async def plain() -> None:
                count[0] += 1
                await asyncio.sleep(HOLD)

            out["task"] = await _tasks(plain, lambda: count[0] == IN_FLIGHT)
            out["acall"] = await _tasks(lambda: flame.acall(pool, sleep_for, HOLD), busy)

        asyncio.run(tasks())
    return out


def measure() -> dict[str, float]:
    """One sample, in this process: bytes per idle runner and per thread/task/call."""
    return {"runner": _per_idle_runner(), **_per_call()}


def bench_memory(counts: Counts) -> list[Figure]:
    samples: list[dict[str, float]] = []
    for _ in range(counts.memory_runs):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.memory"],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"python -m bench.memory exited {proc.returncode}: {tail}")
        samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def kib(key: str, name: str) -> Figure:
        return figure(GROUP, name, [s[key] / 1024 for s in samples], unit="KiB")

    thread = kib("thread", f"per thread, {IN_FLIGHT} threads only sleeping")
    call = relate(kib("call", f"per call in flight, {IN_FLIGHT} threads in flame.call"), thread)
    task = kib("task", f"per task, {IN_FLIGHT} asyncio tasks only sleeping")
    acall = relate(kib("acall", f"per call in flight, {IN_FLIGHT} tasks in flame.acall"), task)
    runner = kib("runner", f"per idle runner (Pool min={RUNNERS} vs min=0)")
    return [runner, thread, call, task, acall]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.parse_args()
    print(json.dumps(measure()))


if __name__ == "__main__":
    main()
