"""Run flame's benchmarks side by side with their baselines, in one process, and report.

``python -m bench`` runs every benchmark and prints one table of medians (with min-max)
and ratios against the baseline measured in the same run; ``--json PATH`` writes every
figure. ``--smoke`` runs tiny counts so CI keeps the harness working (its figures mean
nothing). Peers (loky, Ray, Dask) are measured only when installed
(``pip install -e '.[bench]'``); ``--no-peers`` leaves them out.

This module owns the core benchmarks (warm round trip, throughput, cold start) and the
order of the run; the others live in ``bench.peers``, ``bench.burst``, ``bench.payload``,
``bench.memory`` and ``bench.scale`` (the pool at batch scale: the scaling core's cost per
event, big batches, many idle runners). Runners import it as the app, so importing it does
nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import flame

from .harness import (
    COLD,
    FULL,
    RT,
    SMOKE,
    Counts,
    Figure,
    each,
    failed,
    figure,
    interleaved,
    relate,
    self_timed,
    skipped,
    table,
    throughput_group,
)
from .harness import write_json as dump
from .work import noop, noop_arg


def bench_round_trip(counts: Counts) -> list[Figure]:
    """PPE(1), flame.call and flame.acall, warm, in turns of 100 calls each."""
    n = counts.round_trips
    loop = asyncio.new_event_loop()
    try:
        with (
            concurrent.futures.ProcessPoolExecutor(1) as ex,
            flame.Pool("bench-rt", max=1, backend=flame.ProcessBackend()) as pool,
        ):
            ex.submit(noop).result()
            flame.call(pool, noop)

            async def acalls(k: int) -> list[float]:
                out = []
                for _ in range(k):
                    t = time.perf_counter()
                    await flame.acall(pool, noop)
                    out.append(time.perf_counter() - t)
                return out

            loop.run_until_complete(acalls(1))
            ppe, call, acall = interleaved(
                [
                    each(lambda: ex.submit(noop).result()),
                    each(lambda: flame.call(pool, noop)),
                    lambda k: loop.run_until_complete(acalls(k)),
                ],
                n,
                rounds=n // 100,
            )
    finally:
        loop.close()
    base = figure(RT, "ProcessPoolExecutor(1).submit().result()", ppe)
    return [
        base,
        relate(figure(RT, "flame.call (warm, sequential)", call), base),
        relate(figure(RT, "flame.acall (warm, sequential)", acall), base),
    ]


def bench_throughput(counts: Counts) -> list[Figure]:
    """PPE(2).map against pool.map over 2 runners (128 slots each), warm, in turns."""
    k = counts.outstanding
    group = throughput_group(k)
    with (
        concurrent.futures.ProcessPoolExecutor(2) as ex,
        flame.Pool(
            "bench-tp", min=2, max=2, max_concurrency=128, backend=flame.ProcessBackend()
        ) as pool,
    ):
        list(ex.map(noop_arg, range(k)))
        list(pool.map(noop_arg, range(k)))
        ppe, ours = interleaved(
            [
                each(lambda: list(ex.map(noop_arg, range(k)))),
                each(lambda: list(pool.map(noop_arg, range(k)))),
            ],
            counts.throughput_runs,
            rounds=counts.throughput_runs,
        )
    base = figure(group, f"ProcessPoolExecutor(2).map, {k} calls", ppe)
    return [base, relate(figure(group, f"pool.map over 2 runners, {k} calls", ours), base)]


def _import_flame() -> None:
    subprocess.run([sys.executable, "-c", "import flame"], check=True)


def _first_result(start: Callable[[], concurrent.futures.Executor]) -> float:
    """Seconds from creating an executor to its first result (its shutdown is not timed)."""
    t = time.perf_counter()
    ex = start()
    try:
        ex.submit(noop).result()
        elapsed = time.perf_counter() - t
    finally:
        ex.shutdown(wait=True)
    return elapsed


def _flame_first_result() -> float:
    """Seconds from an empty, started pool to its first result (its stop is not timed)."""
    with flame.Pool("bench-cold", max=1, backend=flame.ProcessBackend()) as pool:
        t = time.perf_counter()
        flame.call(pool, noop)
        return time.perf_counter() - t


def bench_cold_start(counts: Counts) -> list[Figure]:
    """``import flame`` in a new interpreter, against new pools and executors, in turns."""
    n = counts.cold_runs
    names = ["python -c 'import flame'", "flame: empty pool -> first result"]
    samplers = [each(_import_flame), self_timed(_flame_first_result)]
    missing = []
    for method in ("fork", "spawn"):
        name = f"ProcessPoolExecutor(1, {method}): new -> first result"
        if method not in multiprocessing.get_all_start_methods():
            missing.append(skipped(COLD, name, f"no {method} on this platform"))
            continue
        new = functools.partial(
            concurrent.futures.ProcessPoolExecutor,
            1,
            mp_context=multiprocessing.get_context(method),
        )
        names.append(name)
        samplers.append(self_timed(functools.partial(_first_result, new)))
    times = interleaved(samplers, n, rounds=n)
    base = figure(COLD, names[0], times[0])
    rows = [relate(figure(COLD, nm, ts), base) for nm, ts in zip(names, times, strict=True)]
    return [base, *rows[1:], *missing]


def _guarded(group: str, bench: Callable[[], list[Figure]], failures: list[str]) -> list[Figure]:
    """Run one of flame's benchmarks; if it fails, a row says so and ``failures`` grows
    (the traceback goes to stderr), and the run goes on."""
    try:
        return bench()
    except Exception as exc:
        traceback.print_exc()
        failures.append(group)
        return [failed(group, "(the whole group)", exc)]


def run(counts: Counts, peers: bool) -> tuple[list[Figure], list[str]]:
    """Every figure, in table order, and the groups of flame's benchmarks that failed."""
    from . import burst, payload, scale
    from . import memory as mem
    from . import peers as peer_mod

    fails: list[str] = []
    rt = _guarded(RT, lambda: bench_round_trip(counts), fails)
    tp = _guarded(throughput_group(counts.outstanding), lambda: bench_throughput(counts), fails)
    cold = _guarded(COLD, lambda: bench_cold_start(counts), fails)
    figs = [*rt, *tp, *cold]
    figs += _guarded(burst.GROUP, lambda: burst.bench_burst(counts), fails)
    figs += _guarded(payload.GROUP, lambda: payload.bench_payloads(counts), fails)
    figs += _guarded(mem.GROUP, lambda: mem.bench_memory(counts), fails)
    scaled = _guarded(scale.CORE_GROUP, lambda: scale.bench_scale(counts), fails)
    figs += scaled
    fails += [g for g in scale.failures(scaled) if g not in fails]
    if peers:
        # last, so that what a peer leaves in this process cannot touch flame's figures;
        # a peer that fails says so in its rows but does not fail the run
        bases = {f.group: f for f in (rt[0], tp[0], cold[0]) if f.median is not None}
        for bench in (peer_mod.bench_loky, peer_mod.bench_dask, peer_mod.bench_ray):
            with peer_mod.isolated():
                figs += bench(counts, bases)
    # one table: the peers' rows join their groups, and groups keep the order they came in
    order: dict[str, int] = {}
    for f in figs:
        order.setdefault(f.group, len(order))
    return sorted(figs, key=lambda f: order[f.group]), fails


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, for CI")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this file")
    parser.add_argument("--no-peers", action="store_true", help="leave loky, Ray and Dask out")
    args = parser.parse_args()
    counts = SMOKE if args.smoke else FULL
    t = time.perf_counter()
    figs, fails = run(counts, peers=not args.no_peers)
    header = (
        f"flame {flame.__version__} on {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores"
        f"{' (smoke: figures mean nothing)' if counts.smoke else ''}, "
        f"{time.perf_counter() - t:.0f} s"
    )
    print(table(figs, header))
    if args.json:
        dump(figs, args.json)
    if fails:
        print(f"FAILED: {', '.join(fails)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
