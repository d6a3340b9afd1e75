"""Run flame's benchmarks side by side with their baselines, in one process, and report.

``python -m bench`` runs every benchmark and prints a table of medians (with min-max) and
ratios against the baseline measured in the same run; ``--json PATH`` writes the figures.
``--smoke`` runs tiny counts so CI keeps the harness working; its figures mean nothing.
Peers (loky, Ray, Dask) are measured only when installed (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import flame


def noop() -> int:
    return 1


@dataclass
class Figure:
    name: str
    median_s: float
    min_s: float
    max_s: float
    samples: int
    baseline: str | None = None
    ratio: float | None = None


def sample(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def figure(name: str, times: list[float]) -> Figure:
    return Figure(name, statistics.median(times), min(times), max(times), len(times))


def bench_round_trip(n: int) -> list[Figure]:
    figs = []
    with concurrent.futures.ProcessPoolExecutor(1) as ex:
        ex.submit(noop).result()
        base = figure(
            "ProcessPoolExecutor(1).submit().result()", sample(lambda: ex.submit(noop).result(), n)
        )
    figs.append(base)
    with flame.Pool("bench-rt", max=1, backend=flame.ProcessBackend()) as pool:
        flame.call(pool, noop)
        figs.append(
            figure("flame.call (warm, sequential)", sample(lambda: flame.call(pool, noop), n))
        )

        async def arun() -> list[float]:
            await flame.acall(pool, noop)
            out = []
            for _ in range(n):
                t = time.perf_counter()
                await flame.acall(pool, noop)
                out.append(time.perf_counter() - t)
            return out

        figs.append(figure("flame.acall (warm, sequential)", asyncio.run(arun())))
    for f in figs[1:]:
        f.baseline, f.ratio = base.name, f.median_s / base.median_s
    return figs


def bench_cold_start(n: int) -> list[Figure]:
    base = figure(
        "python -c 'import flame'",
        sample(lambda: subprocess.run([sys.executable, "-c", "import flame"], check=True), n),
    )

    def cold() -> None:
        with flame.Pool("bench-cold", max=1, backend=flame.ProcessBackend()) as pool:
            flame.call(pool, noop)

    f = figure("empty pool -> first result", sample(cold, n))
    f.baseline, f.ratio = base.name, f.median_s / base.median_s
    return [base, f]


def bench_throughput(n: int, outstanding: int) -> list[Figure]:
    def ppe_run() -> None:
        with concurrent.futures.ProcessPoolExecutor(2) as ex:
            list(ex.map(noop_arg, range(outstanding)))

    base = figure(f"ProcessPoolExecutor(2).map, {outstanding} calls", sample(ppe_run, n))

    def flame_run() -> None:
        list(pool.map(noop_arg, range(outstanding)))

    with flame.Pool(
        "bench-tp", max=2, max_concurrency=128, backend=flame.ProcessBackend(), min=2
    ) as pool:
        flame_run()
        f = figure(f"pool.map over 2 runners, {outstanding} calls", sample(flame_run, n))
    f.baseline, f.ratio = base.name, f.median_s / base.median_s
    return [base, f]


def noop_arg(x: int) -> int:
    return x


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, for CI")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    n_rt, n_cold, n_tp = (20, 1, 1) if args.smoke else (2000, 5, 5)
    figs = []
    figs += bench_round_trip(n_rt)
    figs += bench_throughput(n_tp, 32 if args.smoke else 256)
    figs += bench_cold_start(n_cold)
    print(
        f"flame {flame.__version__} on {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores"
    )
    print(f"{'benchmark':<48} {'median':>10} {'min-max':>22} {'ratio':>16}")
    for f in figs:
        ratio = f"{f.ratio:.2f}x baseline" if f.ratio is not None else "(baseline)"
        span = f"{f.min_s * 1e3:.3f}-{f.max_s * 1e3:.3f} ms"
        print(f"{f.name:<48} {f.median_s * 1e3:8.3f}ms {span:>22} {ratio:>16}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(f) for f in figs], fh, indent=2)


if __name__ == "__main__":
    main()
