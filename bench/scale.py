"""The pool at batch scale (issue 17): the scaling core's cost per event, and real batches.

**The core alone** (``flame._scaling.Scaler``, no I/O), against the core as it was before it
was indexed (the reference model in ``tests/helpers/parent/scaling_reference.py``), both measured in
this run:

* *churn*: a pool of ``R`` runners with ``max_concurrency=4``, every slot taken, ``W``
  callers waiting (each with a deadline, as every ``acall`` has). Each cycle sends six
  events: a slot is released (the first caller in line takes it), a caller arrives, a
  caller with a short deadline arrives, a caller in the middle of the queue withdraws, time
  passes and a tick fails the short one, and another caller arrives; so ``W`` stays put.
  Figure: CPU microseconds per event (the median over 15 samples of a sample's CPU time,
  of the measuring thread, over its events; CPU rather than wall time so that what the OS
  gives other processes on a shared machine is not counted), for ``W`` = 10 ... 1,000,000
  and ``R`` = 1 ... 10,000. Every cell of the indexed core is built first and the cells are
  sampled in turns. The old core costs O(W + R) per event: it is measured up to
  ``W`` = 100,000 only (at a million waiters one event would take most of a second).
* *burst*: ``N`` callers arrive at once on a full pool of 2 runners x 4 slots (as in the
  issue), then every slot frees ``N`` times until all are served: CPU microseconds per
  event, over the ``2N`` events. The old core is O(N) per event, so O(N^2) per burst: it is
  measured up to ``N`` = 2,000.
* the bytes the indexed core holds per waiting caller (tracemalloc, 100,000 waiting).

**Real batches, through the public API only** (also in ``python -m bench``; ``--core`` leaves
them out):

* ``asyncio.gather`` of ``N`` trivial ``flame.acall`` (N = 2,000 and 20,000) through a
  ``LocalBackend`` pool (2 runners x 4 slots) and a ``ProcessBackend`` pool (4 runners x 8
  slots): wall time, the parent's CPU time, and for the process pool the runners' own CPU
  time (the busiest runner's is the floor: no batch can finish faster than the runner
  that does the most work);
* 100,000 ``flame.cast`` drained by a 4-runner ``ProcessBackend`` pool: the same figures,
  from the first cast to the last one done;
* parent RSS per caller waiting in the queue: 20,000 ``acall`` (or ``cast``) queued behind
  the only slot of a ``LocalBackend`` pool, against 20,000 plain asyncio tasks waiting;
* 200 idle ``ProcessBackend`` runners (``min=max=200``): the parent's CPU per second spent
  on their heartbeats while nothing else happens, and the parent's RSS per runner.

Each real run is a fresh interpreter (``python -m bench.scale --child ...``), so that memory
and threads left by one do not touch the next; one that fails or takes longer than 20
minutes gives a FAILED row, and the others still run.

``python -m bench.scale`` runs all of it and prints a matrix per core; ``--plot PATH``
writes the log-log plot of the churn figures (matplotlib, from the ``bench`` extra);
``--json PATH`` writes every figure; ``--smoke`` uses tiny sizes (figures mean nothing);
``--core`` leaves the real batches out.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import flame
from flame._scaling import Scaler

from .harness import (
    Counts,
    Figure,
    failed,
    figure,
    interleaved,
    relate,
    rss_bytes,
    settled_rss,
    skipped,
)
from .work import count_one, counted_after, hold_until_released, noop, pid_after, release_held

CORE_GROUP = "scaling core, churn: CPU µs per event (R runners x 4 slots, all busy; W waiting)"
BURST_GROUP = "scaling core, burst: CPU µs per event (N callers on 2 runners x 4 slots, served)"
REAL_GROUP = "pool at batch scale (public API)"
IDLE_GROUP = "idle runners: parent cost"

MC = 4  # slots per runner in the churn figures
WAITERS = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
RUNNERS = (1, 10, 100, 1_000, 10_000)
OLD_MAX_WAITERS = 100_000  # the old core is O(W) per event: not measured beyond this
BURSTS = (1_000, 2_000, 10_000, 100_000, 1_000_000)
OLD_MAX_BURST = 2_000  # the old core is O(N^2) per burst
FAR = 1e9  # deadlines that never pass during a measurement
DT = 1e-3  # simulated seconds per churn cycle
EVENTS_PER_CYCLE = 6
SAMPLE_SECONDS = 0.025  # each churn sample runs about this long
OLD_SAMPLES = 3  # the old core's samples per cell (one takes up to a second at W = 100,000)

#: the core's figures are CPU time of the measuring thread: on a shared machine, the time the
#: OS gives other processes would otherwise land in whichever sample it hits
_clock = time.thread_time

REFERENCE = (
    Path(__file__).resolve().parent.parent / "tests" / "helpers" / "parent" / "scaling_reference.py"
)


@dataclass(frozen=True)
class Sizes:
    waiters: tuple[int, ...]
    runners: tuple[int, ...]
    bursts: tuple[int, ...]
    samples: int
    gathers: tuple[int, ...]  # acalls per gather
    casts: int
    queued: int  # callers queued for the memory figures
    held: int  # waiters in the core's memory figure
    idle_runners: int
    idle_seconds: float


FULL = Sizes(WAITERS, RUNNERS, BURSTS, 15, (2_000, 20_000), 100_000, 20_000, 100_000, 200, 10.0)
SMOKE = Sizes((10, 1_000), (1, 10), (100,), 1, (50, 200), 200, 200, 1_000, 4, 1.0)


def sizes_for(counts: Counts) -> Sizes:
    return SMOKE if counts.smoke else FULL


# -- the two cores ---------------------------------------------------------------------------------
def reference_module() -> ModuleType | None:
    """The old core (``tests/helpers/parent/scaling_reference.py``), or None outside a checkout."""
    if not REFERENCE.exists():
        return None
    spec = importlib.util.spec_from_file_location("flame_bench_scaling_reference", REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def busy_pool(waiters: int, runners: int, mc: int = MC) -> Scaler:
    """A core with ``runners`` ready runners, every slot taken, and ``waiters`` queued, built
    through its events, as a shell would (deadlines grow with arrival, like ``acall``'s)."""
    core = Scaler(min=runners, max=runners, max_concurrency=mc, idle_shutdown_after=None)
    core.start(0.0)
    for rid in range(runners):
        core.runner_up(rid, 0.0)
    for wid in range(runners * mc + waiters):
        core.request(wid, FAR + wid, 0.0)
    assert len(core.waiters) == waiters and core.in_flight() == runners * mc
    return core


def as_reference(core: Scaler, ref: ModuleType) -> Any:
    """The old core in the same state as ``core`` (built directly: through its own events
    a queue of 100,000 would take O(W^2))."""
    runners = {
        r.id: ref._RunnerView(r.id, r.state, r.in_flight, r.idle_since, r.grew)
        for r in core.runners.values()
    }
    waiters = OrderedDict((w.id, ref._WaiterView(w.id, w.deadline)) for w in core.waiters.values())
    return ref.ReferenceScaler(
        min=core.min,
        max=core.max,
        max_concurrency=core.max_concurrency,
        idle_shutdown_after=core.idle_shutdown_after,
        runners=runners,
        waiters=waiters,
        _next_runner=core._next_runner,
    )


class Churn:
    """Drives the six-event churn cycle on one core; the queue keeps its length."""

    def __init__(self, core: Any, waiters: int, runners: int, seed: int = 1) -> None:
        self.core = core
        self.waiters = waiters
        self.runners = runners
        self.rng = random.Random(seed)
        self.next_id = runners * MC + waiters
        self.far: list[int] = list(range(runners * MC, self.next_id))  # far-deadline callers
        self.now = 0.0
        self.cycles = 0  # per sample, set by the first call of sample()

    def plan(self, cycles: int) -> list[tuple[int, int, int, int, int]]:
        """Who does what in the next ``cycles`` cycles (drawn before timing)."""
        out = []
        half = max(1, self.waiters // 2)
        for _ in range(cycles):
            a, b, d = self.next_id, self.next_id + 1, self.next_id + 2
            self.next_id += 3
            self.far += (a, d)
            # a caller that arrived half a queue ago: still waiting, in the middle
            out.append((self.rng.randrange(self.runners), a, b, self.far[-2 - half], d))
        return out

    def run(self, plan: Sequence[tuple[int, int, int, int, int]]) -> float:
        """Seconds per event over ``plan``."""
        core, now = self.core, self.now
        release, request, withdraw, tick = core.release, core.request, core.withdraw, core.tick
        t = _clock()
        for r, a, b, c, d in plan:
            now += DT
            release(r, now)
            request(a, FAR + a, now)
            request(b, now + DT / 2, now)
            withdraw(c, now)
            now += DT
            tick(now)
            request(d, FAR + d, now)
        elapsed = _clock() - t
        self.now = now
        return elapsed / (len(plan) * EVENTS_PER_CYCLE)

    def sample(self, k: int) -> list[float]:
        """``k`` samples of seconds per event, each about ``SAMPLE_SECONDS`` long (a sampler
        for ``harness.interleaved``)."""
        if not self.cycles:  # calibrate on one cycle, not kept
            per_cycle = self.run(self.plan(1)) * EVENTS_PER_CYCLE
            self.cycles = max(1, min(2000, int(SAMPLE_SECONDS / max(per_cycle, 1e-9))))
        out = [self.run(self.plan(self.cycles)) for _ in range(k)]
        if len(self.core.waiters) != self.waiters:  # every withdrawal hit a waiting caller
            raise RuntimeError(f"churn drifted: {len(self.core.waiters)} != {self.waiters}")
        return out


def held_per_waiter(waiters: int) -> float:
    """Bytes the indexed core holds per waiting caller (tracemalloc, over a pool built with
    ``waiters`` waiting on 10 busy runners, against the same pool with none)."""
    import gc
    import tracemalloc

    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        empty = busy_pool(0, 10)
        gc.collect()
        base = tracemalloc.get_traced_memory()[0] - before
        del empty
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        full = busy_pool(waiters, 10)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        del full
    finally:
        tracemalloc.stop()
    return (held - base) / waiters


def burst(core: Any, n: int) -> float:
    """Seconds per event: ``n`` callers arrive on a full pool, then are served one by one."""
    release, request = core.release, core.request
    rids = [r.id for r in core.runners.values()]
    base = core.in_flight()
    t = _clock()
    for i in range(n):
        request(base + i, 30.0 + i * 1e-6, 0.0)
    for i in range(n):
        release(rids[i % len(rids)], 1e-6 * i)
    elapsed = _clock() - t
    if core.waiters:
        raise RuntimeError("burst left callers waiting")
    return elapsed / (2 * n)


def bench_core(counts: Counts) -> list[Figure]:
    """Churn and burst figures for both cores (µs per event). For each runner count, the
    cores for every waiter count are built first, then sampled in turns (15 rounds of about
    25 ms each for the indexed core), so that a noisy spell on the machine hits them all
    alike; the old core gets 3 rounds (its figures are orders of magnitude apart)."""
    sz = sizes_for(counts)
    ref = reference_module()
    figs: list[Figure] = []
    got: dict[tuple[int, int, str], Figure] = {}
    new = {(w, r): Churn(busy_pool(w, r), w, r) for r in sz.runners for w in sz.waiters}
    _sample_in_turns(got, "indexed", new, sz.samples)
    del new
    if ref is not None:
        for r in sz.runners:
            old = {
                (w, r): Churn(as_reference(busy_pool(w, r), ref), w, r)
                for w in sz.waiters
                if w <= OLD_MAX_WAITERS
            }
            _sample_in_turns(got, "old", old, min(sz.samples, OLD_SAMPLES))
            del old
    for r in sz.runners:
        for w in sz.waiters:
            fast, slow = got[(w, r, "indexed")], got.get((w, r, "old"))
            if slow is not None:
                figs += [slow, relate(fast, slow)]
                continue
            if ref is not None:
                why = "O(W) per event: capped"
                figs.append(skipped(CORE_GROUP, f"W={w:,} R={r:,}: old core", why, "µs"))
            figs.append(fast)
    figs += flatness(figs)
    figs.append(
        _one(
            CORE_GROUP,
            f"indexed core: bytes held per waiting caller (W={sz.held:,})",
            held_per_waiter(sz.held),
            "B",
        )
    )
    bursts = min(sz.samples, 3)
    for n in sz.bursts:
        new = figure(
            BURST_GROUP,
            f"N={n:,}: indexed core",
            _us([burst(busy_pool(0, 2), n) for _ in range(bursts)]),
            "µs",
        )
        if ref is None or n > OLD_MAX_BURST:
            if ref is not None:
                figs.append(skipped(BURST_GROUP, f"N={n:,}: old core", "O(N^2): capped", "µs"))
            figs.append(new)
            continue
        old = figure(
            BURST_GROUP,
            f"N={n:,}: old core",
            _us([burst(as_reference(busy_pool(0, 2), ref), n) for _ in range(bursts)]),
            "µs",
        )
        figs += [old, relate(new, old)]
    return figs


def _sample_in_turns(
    out: dict[tuple[int, int, str], Figure],
    kind: str,
    churns: dict[tuple[int, int], Churn],
    n: int,
) -> None:
    """``n`` samples of each churn, taken in turns (``harness.interleaved``), as figures."""
    samples = interleaved([c.sample for c in churns.values()], n, rounds=n)
    for (w, r), ts in zip(churns, samples, strict=True):
        out[(w, r, kind)] = figure(CORE_GROUP, f"W={w:,} R={r:,}: {kind} core", _us(ts), "µs")


def _cells(figs: Sequence[Figure]) -> dict[tuple[int, int, str], float]:
    """The churn medians by (waiters, runners, "indexed" or "old")."""
    cells = {}
    for f in figs:
        if f.group != CORE_GROUP or f.median is None or not f.name.startswith("W="):
            continue
        size, core = f.name.split(": ")
        w, r = (int(p.split("=")[1].replace(",", "")) for p in size.split())
        cells[(w, r, core.split()[0])] = f.median
    return cells


def spreads(figs: Sequence[Figure]) -> tuple[dict[int, float], dict[int, float]]:
    """The indexed core's max/min ratio of the churn medians: for each R over
    W = 1,000 ... 1,000,000, and for each W over R = 10 ... 10,000."""
    cells = {(w, r): v for (w, r, k), v in _cells(figs).items() if k == "indexed"}
    ws, rs = sorted({w for w, _ in cells}), sorted({r for _, r in cells})
    over_w, over_r = {}, {}
    for r in rs:
        if vals := [cells[(w, r)] for w in ws if w >= 1000 and (w, r) in cells]:
            over_w[r] = max(vals) / min(vals)
    for w in ws:
        if vals := [cells[(w, r)] for r in rs if r >= 10 and (w, r) in cells]:
            over_r[w] = max(vals) / min(vals)
    return over_w, over_r


def flatness(figs: Sequence[Figure]) -> list[Figure]:
    """The done-when of issue 17 as two figures: the worst of :func:`spreads` over W (at
    any R) and over R (at any W)."""
    over_w, over_r = spreads(figs)
    worst_w = max(over_w.values(), default=math.nan)
    worst_r = max(over_r.values(), default=math.nan)
    return [
        _one(CORE_GROUP, "indexed core: worst max/min over W >= 1,000 (target <= 2)", worst_w, "x"),
        _one(CORE_GROUP, "indexed core: worst max/min over R >= 10 (target <= 2)", worst_r, "x"),
    ]


def _us(seconds: list[float]) -> list[float]:
    return [s * 1e6 for s in seconds]


# -- real batches, each in a fresh interpreter ---------------------------------------------------
CHILD_TIMEOUT = 1200.0  # seconds: a run that takes longer is reported as failed
PROCESS_RUNNERS, PROCESS_SLOTS = 4, 8
LOCAL_RUNNERS, LOCAL_SLOTS = 2, 4


def _cpu_since(pids: Sequence[int], before: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(before, _cpu_of(pids), strict=True)]


def _cpu_of(pids: Sequence[int]) -> list[float]:
    """CPU seconds (user + system) each process has used so far (Linux ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / tick)
    return out


async def _runner_pids(pool: flame.Pool, runners: int) -> list[int]:
    """Every runner's pid: ``runners`` calls made together land one on each (least busy)."""
    for hold in (0.3, 1.0, 3.0):
        pids = await asyncio.gather(*(flame.acall(pool, pid_after, hold) for _ in range(runners)))
        if len(set(pids)) == runners:
            return sorted(pids)
    raise RuntimeError(f"could not reach each of the {runners} runners: {pids}")


def _pool(name: str, backend: str, runners: int, slots: int, **opts: Any) -> flame.Pool:
    return flame.Pool(
        name,
        min=runners,
        max=runners,
        max_concurrency=slots,
        backend=flame.LocalBackend() if backend == "local" else flame.ProcessBackend(),
        boot_timeout=600.0,  # callers wait for a slot with this deadline (none passes)
        idle_shutdown_after=None,
        **opts,
    )


async def _gather(backend: str, n: int) -> dict[str, Any]:
    runners, slots = (
        (LOCAL_RUNNERS, LOCAL_SLOTS) if backend == "local" else (PROCESS_RUNNERS, PROCESS_SLOTS)
    )
    async with _pool(f"bench-scale-{backend}", backend, runners, slots) as pool:
        pids = await _runner_pids(pool, runners) if backend == "process" else []
        await asyncio.gather(*(flame.acall(pool, noop) for _ in range(runners * slots)))
        cpu0, rcpu0 = time.process_time(), _cpu_of(pids)
        t = time.perf_counter()
        results = await asyncio.gather(*(flame.acall(pool, noop) for _ in range(n)))
        wall = time.perf_counter() - t
        cpu, rcpu = time.process_time() - cpu0, _cpu_since(pids, rcpu0)
    if results != [1] * n:
        raise RuntimeError("gather returned wrong results")
    return {"wall": wall, "cpu": cpu, "runner_cpu": rcpu}


async def _casts(n: int) -> dict[str, Any]:
    async with _pool("bench-scale-cast", "process", PROCESS_RUNNERS, PROCESS_SLOTS) as pool:
        pids = await _runner_pids(pool, PROCESS_RUNNERS)
        cpu0, rcpu0 = time.process_time(), _cpu_of(pids)
        rss0 = rss_bytes()
        t = time.perf_counter()
        for _ in range(n):
            flame.cast(pool, count_one)
        issued = time.perf_counter() - t
        peak, seen_busy = rss_bytes(), False
        while True:  # drained: nothing in flight or waiting, once the casts got under way
            s = pool.stats()
            busy = s.in_flight or s.waiting
            seen_busy = seen_busy or bool(busy)
            if seen_busy and not busy:
                wall = time.perf_counter() - t
                counts = await asyncio.gather(
                    *(flame.acall(pool, counted_after, 0.3) for _ in range(PROCESS_RUNNERS))
                )
                if sum(c for _, c in counts) >= n and len({p for p, _ in counts}) == len(pids):
                    break
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.02)
        cpu, rcpu = time.process_time() - cpu0, _cpu_since(pids, rcpu0)
    return {"wall": wall, "issued": issued, "cpu": cpu, "runner_cpu": rcpu, "peak_rss": peak - rss0}


async def _queued(kind: str, n: int) -> dict[str, Any]:
    """Parent RSS per caller waiting in the queue (``acall`` or ``cast``), against the same
    number of plain asyncio tasks waiting on an event."""
    event = asyncio.Event()
    before = settled_rss()
    plain = [asyncio.ensure_future(event.wait()) for _ in range(n)]
    await asyncio.sleep(0)  # let them reach their wait
    per_task = (settled_rss() - before) / n
    event.set()
    await asyncio.gather(*plain)
    del plain
    async with _pool("bench-scale-queued", "local", 1, 1) as pool:
        hold = asyncio.ensure_future(flame.acall(pool, hold_until_released))
        while pool.stats().in_flight < 1:  # noqa: ASYNC110 (no event tells a slot is taken)
            await asyncio.sleep(0.01)
        before = settled_rss()
        calls = []
        if kind == "acall":
            calls = [asyncio.ensure_future(flame.acall(pool, noop)) for _ in range(n)]
        else:
            for _ in range(n):
                flame.cast(pool, noop)
        while pool.stats().waiting < n:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        per_caller = (settled_rss() - before) / n
        release_held()
        await hold
        await asyncio.gather(*calls)
        while pool.stats().waiting or pool.stats().in_flight:  # noqa: ASYNC110 (casts)
            await asyncio.sleep(0.01)
    return {"task": per_task, "queued": per_caller}


def _idle(n: int, seconds: float) -> dict[str, Any]:
    flame.configure(failsafe_timeout=600.0)  # n runners booting at once on few cores
    with flame.Pool("bench-scale-idle-0", min=0, max=1, backend=flame.ProcessBackend()):
        base = settled_rss()
        c = time.process_time()
        time.sleep(seconds)
        cpu0 = (time.process_time() - c) / seconds
        t = time.perf_counter()
        with _pool("bench-scale-idle", "process", n, 1) as pool:
            boot = time.perf_counter() - t
            if pool.stats().runners != n:
                raise RuntimeError(f"only {pool.stats().runners} of {n} runners came up")
            time.sleep(2.0)  # the boots' aftermath (handshakes, first heartbeats)
            rss = settled_rss()
            c = time.process_time()
            time.sleep(seconds)
            cpu = (time.process_time() - c) / seconds
    return {"boot": boot, "rss_per_runner": (rss - base) / n, "cpu_idle": cpu0, "cpu": cpu}


def child(kind: str, n: int, seconds: float) -> dict[str, Any]:
    if kind in ("local", "process"):
        return asyncio.run(_gather(kind, n))
    if kind == "cast":
        return asyncio.run(_casts(n))
    if kind == "idle":
        return _idle(n, seconds)
    if kind in ("queued-acall", "queued-cast"):
        return asyncio.run(_queued(kind.split("-")[1], n))
    raise ValueError(f"unknown child run {kind!r}")


def _run_child(kind: str, n: int, seconds: float = 0.0) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.scale", "--child", kind, "--n", str(n)]
    cmd += ["--seconds", str(seconds)]
    try:
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=CHILD_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"did not finish within {CHILD_TIMEOUT:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{' '.join(cmd[1:])} exited {proc.returncode}: {tail}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _one(group: str, name: str, value: float, unit: str = "s") -> Figure:
    return figure(group, name, [value], unit)


def bench_real(counts: Counts) -> list[Figure]:
    """The real batches (one sample each: each is long, and its own median over many
    calls); a run that fails gives a FAILED row and the others still run."""
    sz = sizes_for(counts)
    figs: list[Figure] = []
    for backend, runners, slots in (
        ("local", LOCAL_RUNNERS, LOCAL_SLOTS),
        ("process", PROCESS_RUNNERS, PROCESS_SLOTS),
    ):
        walls: dict[int, Figure] = {}
        for n in sz.gathers:
            label = f"gather {n:,} acall, {backend} {runners}x{slots}"
            try:
                r = _run_child(backend, n)
            except Exception as exc:
                figs.append(failed(REAL_GROUP, f"{label}: wall", exc))
                continue
            wall = walls[n] = _one(REAL_GROUP, f"{label}: wall", r["wall"])
            rows = [wall, _one(REAL_GROUP, f"{label}: parent CPU", r["cpu"])]
            if r["runner_cpu"]:
                floor = _one(
                    REAL_GROUP, f"{label}: busiest runner's CPU (floor)", max(r["runner_cpu"])
                )
                rows = [floor, relate(wall, floor), rows[1]]
                rows.append(
                    _one(REAL_GROUP, f"{label}: runners' CPU, summed", sum(r["runner_cpu"]))
                )
            figs += rows
        small, big = sz.gathers[0], sz.gathers[-1]
        if small in walls and big in walls:
            ratio = walls[big].median / walls[small].median  # type: ignore[operator]
            figs.append(
                _one(
                    REAL_GROUP,
                    f"gather {big:,} / {small:,} acall, {backend}: wall ratio (target <= 15)",
                    ratio,
                    "x",
                )
            )
    label = f"{sz.casts:,} cast drained, process {PROCESS_RUNNERS}x{PROCESS_SLOTS}"
    try:
        r = _run_child("cast", sz.casts)
        floor = _one(REAL_GROUP, f"{label}: busiest runner's CPU (floor)", max(r["runner_cpu"]))
        figs += [
            floor,
            relate(_one(REAL_GROUP, f"{label}: wall, first cast to last done", r["wall"]), floor),
            _one(REAL_GROUP, f"{label}: issuing the casts (caller's thread)", r["issued"]),
            _one(REAL_GROUP, f"{label}: parent CPU", r["cpu"]),
            _one(REAL_GROUP, f"{label}: runners' CPU, summed", sum(r["runner_cpu"])),
            _one(REAL_GROUP, f"{label}: parent RSS peak per cast", r["peak_rss"] / sz.casts, "B"),
        ]
    except Exception as exc:
        figs.append(failed(REAL_GROUP, f"{label}: wall", exc))
    for kind in ("acall", "cast"):
        label = f"parent RSS per queued {kind} ({sz.queued:,} waiting, local 1x1)"
        try:
            r = _run_child(f"queued-{kind}", sz.queued)
            task = _one(
                REAL_GROUP,
                f"parent RSS per plain asyncio task waiting ({sz.queued:,}, {kind} run)",
                r["task"],
                "B",
            )
            figs += [task, relate(_one(REAL_GROUP, label, r["queued"], "B"), task)]
        except Exception as exc:
            figs.append(failed(REAL_GROUP, label, exc, "B"))
    label = f"{sz.idle_runners} idle process runners"
    try:
        r = _run_child("idle", sz.idle_runners, sz.idle_seconds)
        figs += [
            _one(IDLE_GROUP, f"{label}: booting them all (pool start)", r["boot"]),
            _one(IDLE_GROUP, f"{label}: parent RSS per runner", r["rss_per_runner"] / 1024, "KiB"),
            _one(
                IDLE_GROUP,
                "parent CPU, idle pool without runners (% of a core)",
                100 * r["cpu_idle"],
                "%",
            ),
            _one(IDLE_GROUP, f"{label}: parent CPU (% of a core)", 100 * r["cpu"], "%"),
            _one(
                IDLE_GROUP,
                f"{label}: parent CPU per runner-second (heartbeats)",
                1e6 * (r["cpu"] - r["cpu_idle"]) / sz.idle_runners,
                "µs",
            ),
        ]
    except Exception as exc:
        figs.append(failed(IDLE_GROUP, f"{label}: parent RSS per runner", exc, "KiB"))
    return figs


def bench_scale(counts: Counts) -> list[Figure]:
    """Everything: the core's figures, then the real batches."""
    return bench_core(counts) + bench_real(counts)


def failures(figs: Sequence[Figure]) -> list[str]:
    """The groups with a FAILED row (a real batch that raised or timed out)."""
    return sorted({f.group for f in figs if f.note and f.note.startswith("FAILED")})


# -- output ---------------------------------------------------------------------------------------
def matrix(figs: Sequence[Figure]) -> str:
    """The churn figures as a grid: a row per runner count, a column per waiter count, each
    cell ``indexed / old`` in µs per event."""
    cells = _cells(figs)
    ws = sorted({w for w, _, _ in cells})
    rs = sorted({r for _, r, _ in cells})
    head = f"{'µs/event':>10} | " + " | ".join(f"W={w:<,}".rjust(15) for w in ws)
    lines = [head + "   (indexed / old core)", "-" * len(head)]
    for r in rs:
        row = []
        for w in ws:
            new, old = cells.get((w, r, "indexed")), cells.get((w, r, "old"))
            cell = "" if new is None else f"{new:.1f}"
            cell += f" / {old:.0f}" if old is not None else " / -"
            row.append(cell.rjust(15))
        lines.append(f"{'R=' + format(r, ','):>10} | " + " | ".join(row))
    over_w, over_r = spreads(figs)
    lines.append(
        "indexed core, max/min over W >= 1,000: "
        + ", ".join(f"R={r:,}: {v:.2f}x" for r, v in over_w.items())
    )
    by_w = [f"W={w:,}: {v:.2f}x" for w, v in over_r.items()]
    lines.append("indexed core, max/min over R >= 10: " + ", ".join(by_w))
    return "\n".join(lines)


def plot(figs: Sequence[Figure], path: str) -> None:
    """A log-log plot of the churn figures: µs per event against waiters, a line per runner
    count, the indexed core solid and the old one dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for (w, r, core), us in _cells(figs).items():
        series.setdefault((core, r), []).append((w, us))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runners = sorted({r for _, r in series})
    for i, r in enumerate(runners):
        for core, style in (("indexed", "-o"), ("old", "--x")):
            pts = sorted(series.get((core, r), []))
            if pts:
                ax.plot(
                    [w for w, _ in pts],
                    [us for _, us in pts],
                    style,
                    color=colors[i % len(colors)],
                    label=f"{core} core, {r:,} runner{'s' if r > 1 else ''}",
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("callers waiting (W)")
    ax.set_ylabel("CPU µs per event (median)")
    ax.set_title("flame scaling core: cost per event (churn, 4 slots per runner, all busy)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    from .harness import FULL as FULL_COUNTS
    from .harness import SMOKE as SMOKE_COUNTS
    from .harness import table, write_json

    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--core", action="store_true", help="the core only, no real batches")
    parser.add_argument("--plot", metavar="PNG", help="write the churn figures' log-log plot")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.seconds)))
        return 0
    counts = SMOKE_COUNTS if args.smoke else FULL_COUNTS
    t = time.perf_counter()
    figs = bench_core(counts) if args.core else bench_scale(counts)
    print(table(figs, f"bench.scale, {os.cpu_count()} cores, {time.perf_counter() - t:.0f} s"))
    print()
    print(matrix(figs))
    if args.plot:
        plot(figs, args.plot)
    if args.json:
        write_json(figs, args.json)
    bad = failures(figs)
    if bad:
        print(f"FAILED: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
