"""The benchmark harness: figures, sampling, ratios, the table and the JSON file.

Every benchmark module returns :class:`Figure` objects built with the helpers here, so the
whole run prints as one table and dumps as one JSON list. Times are kept in seconds
(``unit="s"``) and shown in milliseconds; other units (``KiB``) are shown as they are.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

MB = 1_000_000
INSTALL_HINT = "pip install -e '.[bench]'"

# the groups that flame's own figures and the peers' share
RT = "warm round trip, sequential"
COLD = "cold start"


def throughput_group(outstanding: int) -> str:
    return f"throughput, {outstanding} calls outstanding"


@dataclass
class Figure:
    """One row of the table: a median with its min-max over ``samples`` runs."""

    group: str
    name: str
    median: float | None
    min: float | None
    max: float | None
    unit: str
    samples: int
    baseline: str | None = None
    ratio: float | None = None
    mb_per_s: float | None = None  # payload rows: payload size / median time
    note: str | None = None  # why the row has no figure (a peer not installed, ...)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Counts:
    """How much work each benchmark does: the full run's counts, or the smoke run's."""

    smoke: bool
    round_trips: int  # sequential calls per round-trip figure
    round_trip_budget: float  # seconds: a slow peer stops sampling after this long
    throughput_runs: int
    outstanding: int  # calls in flight per throughput run
    cold_runs: int
    ray_cold_runs: int  # ray.init takes seconds: fewer samples
    burst_runs: int
    payload_sizes_mb: tuple[int, ...]
    memory_runs: int

    def payload_runs(self, size_mb: int) -> int:
        if self.smoke:
            return 3
        return 30 if size_mb <= 1 else 10 if size_mb <= 10 else 5


FULL = Counts(
    smoke=False,
    round_trips=2000,
    round_trip_budget=10.0,
    throughput_runs=5,
    outstanding=256,
    cold_runs=7,
    ray_cold_runs=3,
    burst_runs=7,
    payload_sizes_mb=(1, 10, 100),
    memory_runs=3,
)
SMOKE = Counts(
    smoke=True,
    round_trips=20,
    round_trip_budget=2.0,
    throughput_runs=1,
    outstanding=32,
    cold_runs=1,
    ray_cold_runs=1,
    burst_runs=1,
    payload_sizes_mb=(1,),
    memory_runs=1,
)


# -- sampling -----------------------------------------------------------------------------------
def sample(fn: Callable[[], object], n: int, budget: float | None = None) -> list[float]:
    """Time ``n`` calls of ``fn``; stop early (after at least 5) once ``budget`` s are spent."""
    out: list[float] = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        if budget is not None and len(out) >= 5 and time.perf_counter() - start > budget:
            break
    return out


def interleaved(
    samplers: Sequence[Callable[[int], list[float]]], n: int, rounds: int
) -> list[list[float]]:
    """Samples of several subjects taken in turns, so that a noisy spell hits them all.

    Each sampler takes a count and returns that many times. ``n`` samples of each are
    taken in ``rounds`` rounds; the order of the subjects is reversed every other round.
    """
    rounds = max(1, min(rounds, n))
    out: list[list[float]] = [[] for _ in samplers]
    order = list(range(len(samplers)))
    for r in range(rounds):
        k = n * (r + 1) // rounds - n * r // rounds
        for i in order if r % 2 == 0 else reversed(order):
            out[i] += samplers[i](k)
    return out


def each(fn: Callable[[], object]) -> Callable[[int], list[float]]:
    """A sampler for :func:`interleaved`: ``k`` timed calls of ``fn``."""
    return lambda k: sample(fn, k)


def self_timed(fn: Callable[[], float]) -> Callable[[int], list[float]]:
    """A sampler for :func:`interleaved` from a function that times itself."""
    return lambda k: [fn() for _ in range(k)]


def figure(group: str, name: str, values: Iterable[float], unit: str = "s") -> Figure:
    vals = list(values)
    return Figure(group, name, statistics.median(vals), min(vals), max(vals), unit, len(vals))


def skipped(group: str, name: str, why: str, unit: str = "s") -> Figure:
    """A row without a figure: something it needs is missing."""
    return Figure(group, name, None, None, None, unit, 0, note=f"skipped ({why})")


def failed(group: str, name: str, exc: BaseException, unit: str = "s") -> Figure:
    """A row without a figure: its benchmark raised ``exc``."""
    lines = str(exc).strip().splitlines()
    why = f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__
    return Figure(group, name, None, None, None, unit, 0, note=f"FAILED ({why})")


def relate(fig: Figure, base: Figure) -> Figure:
    """Set ``fig``'s ratio to its median over ``base``'s (both measured in this run)."""
    fig.baseline = base.name
    if fig.median is not None and base.median:
        fig.ratio = fig.median / base.median
    return fig


def with_rate(fig: Figure, size_bytes: int) -> Figure:
    if fig.median:
        fig.mb_per_s = size_bytes / MB / fig.median
    return fig


def have(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def rss_bytes() -> int:
    """This process's resident set size (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


def settled_rss() -> int:
    """RSS after a full garbage collection and a short pause for background threads."""
    gc.collect()
    time.sleep(0.2)
    gc.collect()
    return rss_bytes()


# -- output -------------------------------------------------------------------------------------
def _num(value: float, unit: str) -> str:
    if unit == "s":
        ms = value * 1e3
        return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"
    return f"{value:.1f}"


def table(figs: list[Figure], header: str) -> str:
    """The one table: a row per figure, a separator line before each group.

    ``ratio`` is the row's median over its baseline's; a baseline row says ``base``, and a
    row's baseline is the ``base`` row above it in the same group.
    """
    bases = {f.baseline for f in figs if f.baseline}
    name_w = max([48, *(len(f.name) for f in figs)])
    cols = f"{'benchmark':<{name_w}} {'median':>10} {'min-max':>21} {'what':>4} {'ratio':>7} "
    cols += f"{'MB/s':>6}"
    lines = [header, cols, "=" * len(cols)]
    group = None
    for f in figs:
        if f.group != group:
            group = f.group
            lines.append(f"-- {group} " + "-" * max(0, len(cols) - len(group) - 4))
        unit = "ms" if f.unit == "s" else f.unit
        if f.median is None or f.min is None or f.max is None:
            lines.append(f"{f.name:<{name_w}} {f.note or 'no figure'}")
            continue
        span = f"{_num(f.min, f.unit)}-{_num(f.max, f.unit)}"
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "base" if f.name in bases else ""
        rate = f"{f.mb_per_s:.0f}" if f.mb_per_s is not None else ""
        lines.append(
            f"{f.name:<{name_w}} {_num(f.median, f.unit):>10} {span:>21} {unit:>4} {ratio:>7} "
            f"{rate:>6}".rstrip()
        )
    return "\n".join(lines)


def write_json(figs: list[Figure], path: str) -> None:
    with open(path, "w") as fh:
        json.dump([f.to_json() for f in figs], fh, indent=2)
        fh.write("\n")
