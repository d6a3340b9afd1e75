"""Payloads of 1, 10 and 100 MB in both directions, as ``bytes`` and as a NumPy array.

Parent to runner: ``flame.call(pool, payload_size, payload)`` with the payload built in the
parent beforehand. Runner to parent: ``flame.call(pool, make_payload, kind, size)``, so the
runner builds it; the same ``make_payload`` is also timed in the parent and reported on its
own row, so the reader can see what creating the payload costs (nothing is subtracted).
Each transfer is related to ``ProcessPoolExecutor(1)`` doing the same, and reported as
time and as MB/s (payload size over median time).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import flame

from .harness import (
    INSTALL_HINT,
    MB,
    Counts,
    Figure,
    each,
    figure,
    have,
    interleaved,
    relate,
    sample,
    skipped,
)
from .harness import with_rate as rated
from .work import make_payload, noop, payload_size

GROUP = "payloads (MB/s = size / median time)"
KINDS = ("bytes", "ndarray")


def _pair(
    label: str, size: int, runs: int, ppe: Callable[[], object], ours: Callable[[], object]
) -> list[Figure]:
    ppe_times, our_times = interleaved([each(ppe), each(ours)], runs, rounds=runs)
    base = rated(figure(GROUP, f"ProcessPoolExecutor(1): {label}", ppe_times), size)
    fig = rated(figure(GROUP, f"flame.call: {label}", our_times), size)
    return [base, relate(fig, base)]


def _to_runner(
    ex: concurrent.futures.Executor, pool: flame.Pool, label: str, payload: Any, runs: int
) -> list[Figure]:
    size = payload_size(payload)
    # warm both sides for this size (allocator, first large frame)
    ex.submit(payload_size, payload).result()
    flame.call(pool, payload_size, payload)
    return _pair(
        label,
        size,
        runs,
        lambda: ex.submit(payload_size, payload).result(),
        lambda: flame.call(pool, payload_size, payload),
    )


def _one_size(
    ex: concurrent.futures.Executor, pool: flame.Pool, kind: str, size_mb: int, runs: int
) -> list[Figure]:
    size = size_mb * MB
    to_runner = f"{size_mb} MB {kind} parent -> runner"
    local = f"make_payload({kind}, {size_mb} MB) in the parent"
    from_runner = f"{size_mb} MB {kind} runner -> parent"
    if kind == "ndarray" and not have("numpy"):
        return [skipped(GROUP, name, INSTALL_HINT) for name in (to_runner, local, from_runner)]
    figs = _to_runner(ex, pool, to_runner, make_payload(kind, size), runs)
    figs.append(rated(figure(GROUP, local, sample(lambda: make_payload(kind, size), runs)), size))
    ex.submit(make_payload, kind, size).result()
    flame.call(pool, make_payload, kind, size)
    figs += _pair(
        from_runner,
        size,
        runs,
        lambda: ex.submit(make_payload, kind, size).result(),
        lambda: flame.call(pool, make_payload, kind, size),
    )
    return figs


def bench_payloads(counts: Counts) -> list[Figure]:
    figs: list[Figure] = []
    with (
        concurrent.futures.ProcessPoolExecutor(1) as ex,
        flame.Pool("bench-payload", min=1, max=1, backend=flame.ProcessBackend()) as pool,
    ):
        ex.submit(noop).result()
        flame.call(pool, noop)
        for kind in KINDS:
            for size_mb in counts.payload_sizes_mb:
                figs += _one_size(ex, pool, kind, size_mb, counts.payload_runs(size_mb))
    return figs
