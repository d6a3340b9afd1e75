"""The peers: loky, Ray and Dask, measured the way flame's own figures are.

Each peer is measured only if it can be imported (``pip install -e '.[bench]'`` installs
them all); otherwise its rows say so and the run goes on. Peers are imported lazily, inside
the functions here, so importing this module stays cheap for runners. Every peer is shut
down in a ``finally``, and a peer that fails at run time gives rows saying why, not an
error. Each function returns figures for several groups (round trip, throughput, cold
start), each related to the baseline of its group passed in ``bases``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from .harness import (
    COLD,
    INSTALL_HINT,
    RT,
    Counts,
    Figure,
    failed,
    figure,
    have,
    relate,
    sample,
    skipped,
    throughput_group,
)
from .work import noop, noop_arg


class Echo:
    """The Ray actor of the round-trip benchmark (wrapped with ``ray.remote`` lazily)."""

    def noop(self) -> int:
        return 1


def _why(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def _failed(rows: list[tuple[str, str]], exc: BaseException) -> list[Figure]:
    return [failed(group, name, exc) for group, name in rows]


def _related(fig: Figure, bases: dict[str, Figure]) -> Figure:
    base = bases.get(fig.group)
    return relate(fig, base) if base is not None else fig


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep peers' warnings and log chatter out of the table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Undo what a peer leaves behind in this process: environment variables and signal
    handlers. Dask leaves ``MALLOC_TRIM_THRESHOLD_=65536`` (and ``OMP_NUM_THREADS``,
    ``PYTHONHASHSEED``...) in ``os.environ``, which every process started afterwards
    inherits, flame's runners included (their 1 MB receives got 2-3x slower); Ray leaves
    ``RAY_*`` variables, ``PYTHONBREAKPOINT`` and a SIGTERM handler."""
    env = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(env)
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


# -- loky ---------------------------------------------------------------------------------------
def bench_loky(counts: Counts, bases: dict[str, Figure]) -> list[Figure]:
    tp = throughput_group(counts.outstanding)
    rows = [
        (RT, "loky get_reusable_executor(1).submit().result()"),
        (tp, f"loky get_reusable_executor(2).map, {counts.outstanding} calls"),
    ]
    if not have("loky"):
        return [skipped(g, n, INSTALL_HINT) for g, n in rows]
    from loky import get_reusable_executor

    figs: list[Figure] = []
    ex: Any = None
    try:
        with _quiet():
            ex = get_reusable_executor(max_workers=1)
            ex.submit(noop).result()
            figs.append(
                figure(
                    *rows[0],
                    sample(
                        lambda: ex.submit(noop).result(),
                        counts.round_trips,
                        counts.round_trip_budget,
                    ),
                )
            )
            ex = get_reusable_executor(max_workers=2)
            list(ex.map(noop_arg, range(counts.outstanding)))
            figs.append(
                figure(
                    *rows[1],
                    sample(
                        lambda: list(ex.map(noop_arg, range(counts.outstanding))),
                        counts.throughput_runs,
                    ),
                )
            )
    except Exception as exc:
        figs += _failed(rows[len(figs) :], exc)
    finally:
        if ex is not None:
            with _quiet(), contextlib.suppress(Exception):
                ex.shutdown(wait=True)
    return [_related(f, bases) for f in figs]


# -- Ray ----------------------------------------------------------------------------------------
def _ray_init() -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        configure_logging=True,
    )


def bench_ray(counts: Counts, bases: dict[str, Figure]) -> list[Figure]:
    """Ray's rows. The first ``ray.init`` is also the first cold-start sample."""
    tp = throughput_group(counts.outstanding)
    rows = [
        (RT, "ray task .remote() + ray.get"),
        (RT, "ray actor method .remote() + ray.get"),
        (tp, f"ray {counts.outstanding} tasks .remote(), then ray.get"),
        (COLD, "ray.init(num_cpus=2) + first task"),
    ]
    if not have("ray"):
        return [skipped(g, n, INSTALL_HINT) for g, n in rows]
    import ray

    def cold() -> float:
        t = time.perf_counter()
        try:
            _ray_init()
            ray.get(ray.remote(noop).remote())
            return time.perf_counter() - t
        finally:
            ray.shutdown()

    figs: list[Figure] = []
    try:
        with _quiet():
            t = time.perf_counter()
            try:
                _ray_init()
            except Exception as exc:
                return [skipped(g, n, f"ray cannot run here: {_why(exc)}") for g, n in rows]
            rnoop = ray.remote(noop)
            ray.get(rnoop.remote())
            colds = [time.perf_counter() - t]
            figs.append(
                figure(
                    *rows[0],
                    sample(
                        lambda: ray.get(rnoop.remote()),
                        counts.round_trips,
                        counts.round_trip_budget,
                    ),
                )
            )
            actor: Any = ray.remote(Echo).remote()
            ray.get(actor.noop.remote())
            figs.append(
                figure(
                    *rows[1],
                    sample(
                        lambda: ray.get(actor.noop.remote()),
                        counts.round_trips,
                        counts.round_trip_budget,
                    ),
                )
            )
            ray.kill(actor)
            rnoop_arg = ray.remote(noop_arg)

            def burst() -> None:
                ray.get([rnoop_arg.remote(i) for i in range(counts.outstanding)])

            burst()
            figs.append(figure(*rows[2], sample(burst, counts.throughput_runs)))
            ray.shutdown()
            colds += [cold() for _ in range(counts.ray_cold_runs - 1)]
            figs.append(figure(*rows[3], colds))
    except Exception as exc:
        figs += _failed(rows[len(figs) :], exc)
    finally:
        with _quiet(), contextlib.suppress(Exception):
            ray.shutdown()
    return [_related(f, bases) for f in figs]


# -- Dask ---------------------------------------------------------------------------------------
def _dask(workers: int) -> tuple[Any, Any]:
    """A local Dask cluster of ``workers`` single-threaded worker processes, and its client."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    try:
        return cluster, Client(cluster)
    except BaseException:
        cluster.close()
        raise


def _close(*things: Any) -> None:
    for thing in things:
        if thing is not None:
            with contextlib.suppress(Exception):
                thing.close()


def _with_dask(workers: int, fn: Callable[[Any], list[float]]) -> list[float]:
    cluster = client = None
    try:
        cluster, client = _dask(workers)
        return fn(client)
    finally:
        _close(client, cluster)


def bench_dask(counts: Counts, bases: dict[str, Figure]) -> list[Figure]:
    tp = throughput_group(counts.outstanding)
    rows = [
        (RT, "dask Client.submit(pure=False).result(), 1 worker"),
        (tp, f"dask client.map + gather, 2 workers, {counts.outstanding} calls"),
        (COLD, "dask LocalCluster(1 worker) + Client + first task"),
    ]
    if not have("distributed"):
        return [skipped(g, n, INSTALL_HINT) for g, n in rows]

    def round_trips(client: Any) -> list[float]:
        client.submit(noop, pure=False).result()
        return sample(
            lambda: client.submit(noop, pure=False).result(),
            counts.round_trips,
            counts.round_trip_budget,
        )

    def throughput(client: Any) -> list[float]:
        def run() -> None:
            client.gather(client.map(noop_arg, range(counts.outstanding), pure=False))

        client.wait_for_workers(2)
        run()
        return sample(run, counts.throughput_runs)

    def cold() -> float:
        cluster = client = None
        t = time.perf_counter()
        try:
            cluster, client = _dask(1)
            client.submit(noop, pure=False).result()
            return time.perf_counter() - t
        finally:
            _close(client, cluster)

    figs: list[Figure] = []
    try:
        with _quiet():
            figs.append(figure(*rows[0], _with_dask(1, round_trips)))
            figs.append(figure(*rows[1], _with_dask(2, throughput)))
            figs.append(figure(*rows[2], [cold() for _ in range(counts.cold_runs)]))
    except Exception as exc:
        figs += _failed(rows[len(figs) :], exc)
    return [_related(f, bases) for f in figs]
