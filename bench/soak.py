"""Soak flame under chaos: many callers, while runners are SIGKILLed and SIGSTOPped at random.

``python -m bench.soak --seconds N [--threads M] [--tasks K] [--seed S] [--json PATH]``

A ``ProcessBackend`` pool is driven for N seconds by M threads (``flame.call``) and K asyncio
tasks (``flame.acall``, all on one loop thread) with a seeded mix of calls: quick ones with a
known result, short sleeps, calls that raise a known exception, and calls whose small timeout
sometimes expires. Meanwhile a chaos thread picks one of the pool's runner processes every
0.3-1.0 s and sends it SIGKILL or SIGSTOP. A stopped runner must be found out by heartbeats
and killed by the pool.

At the end the callers are joined with a deadline, the pool is allowed to settle and is
stopped, and the script checks: wrong results, hung callers, leaked runner processes (alive
10 s after ``pool.stop()``, or SIGSTOPped and still there long after the heartbeat bound),
leaked slots (``in_flight``/``waiting`` not back to 0 once every caller is done), and
unexpected (non-flame) errors. Any of those non-zero makes the exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import flame

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
CANCEL_GRACE = 1.0
CALL_TIMEOUT = 10.0  # every call is bounded; the "timeout" kind uses smaller ones
HUNG_SLACK = 5.0  # a call taking longer than its timeout + this is a hung caller
BOOT_TIMEOUT = 10.0
# a SIGSTOPped runner still there this long after the signal leaked. Heartbeats find out a
# runner frozen after its handshake (within HEARTBEAT_TIMEOUT: the "lived" figures show it,
# and tests/test_wire.py holds that bound); one frozen before or *during* its handshake is
# only found out by boot_timeout. Holding a socket does not tell the two apart (a runner
# frozen mid-handshake holds one), so the leak check uses the larger bound for both.
STOP_LEAK_AFTER = max(HEARTBEAT_TIMEOUT, BOOT_TIMEOUT) + 5.0
STOP_LEAK_AFTER_BOOTING = BOOT_TIMEOUT + 5.0
STOP_DEADLINE = 10.0  # runner processes must be gone this long after pool.stop()


# -- the work (runs on the runners) ----------------------------------------------------------------
class SoakError(Exception):
    """The exception the "raise" calls raise on purpose."""


def double(x: int) -> int:
    return x * 2


def nap(seconds: float, token: int) -> int:
    time.sleep(seconds)
    return token


def fail(token: int) -> int:
    raise SoakError(f"soak-{token}")


# -- runner processes, from /proc -----------------------------------------------------------------
Proc = tuple[int, int]  # (pid, start time in clock ticks): a pid that cannot be reused unseen


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def runner_procs() -> list[Proc]:
    """This process's children whose command line contains ``flame runner``."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        st = _stat(pid)
        if st is None or st[0] != me or st[1] == "Z":
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"flame runner" in cmd:
            out.append((pid, st[2]))
    return sorted(out)


def state_of(proc: Proc) -> str | None:
    """The process's state letter (``Z`` for a zombie), or None if it is gone."""
    st = _stat(proc[0])
    if st is None or st[2] != proc[1]:
        return None
    return st[1]


def alive(proc: Proc) -> bool:
    return state_of(proc) not in (None, "Z")


def connected(pid: int) -> bool:
    """Whether the runner holds a socket, i.e. has dialled its parent (else it is booting)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                return True
        except OSError:
            continue
    return False


# -- figures --------------------------------------------------------------------------------------
@dataclass
class Figures:
    seconds: float = 0.0
    threads: int = 0
    tasks: int = 0
    seed: int = 0
    calls: int = 0
    calls_ok: int = 0
    calls_by_kind: dict[str, int] = field(default_factory=dict)
    typed_errors: dict[str, int] = field(default_factory=dict)
    unexpected_errors: list[str] = field(default_factory=list)
    wrong_results: list[str] = field(default_factory=list)
    late_calls: list[str] = field(default_factory=list)
    hung_callers: int = 0
    max_call_s: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    stopped_runner_leaks: list[str] = field(default_factory=list)
    stopped_lifetime_max_s: dict[str, float] = field(default_factory=dict)
    leaked_runners: list[int] = field(default_factory=list)
    zombies_after_stop: list[int] = field(default_factory=list)
    leaked_slots: dict[str, int] = field(default_factory=dict)
    stats_before_stop: dict[str, int] = field(default_factory=dict)
    runners_seen: int = 0
    passed: bool = False


class Tally:
    """Thread-safe counters shared by every caller."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.ok = 0
        self.kinds: Counter[str] = Counter()
        self.typed: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.wrong: list[str] = []
        self.late: list[str] = []
        self.max_call = 0.0

    def record(self, kind: str, outcome: str, detail: str, took: float, bound: float) -> None:
        with self.lock:
            self.calls += 1
            self.kinds[kind] += 1
            self.max_call = max(self.max_call, took)
            if took > bound + HUNG_SLACK:
                self.late.append(f"{kind} took {took:.1f}s (timeout {bound:g}s)")
            if outcome == "ok":
                self.ok += 1
            elif outcome == "typed":
                self.typed[detail] += 1
            elif outcome == "wrong":
                self.wrong.append(f"{kind}: {detail}")
            else:
                self.unexpected.append(f"{kind}: {detail}")


# -- one call: plan it, make it, judge it -------------------------------------------------------
@dataclass
class Plan:
    kind: str
    fn: Callable[..., int]
    args: tuple[Any, ...]
    timeout: float
    expect: int | None  # the result, or None for the "raise" kind


def plan(rng: random.Random) -> Plan:
    r = rng.random()
    token = rng.randrange(1_000_000)
    if r < 0.45:
        return Plan("quick", double, (token,), CALL_TIMEOUT, token * 2)
    if r < 0.70:
        return Plan("sleep", nap, (rng.uniform(0.01, 0.3), token), CALL_TIMEOUT, token)
    if r < 0.85:
        return Plan("raise", fail, (token,), CALL_TIMEOUT, None)
    # a sleep with a timeout that sometimes expires
    return Plan("timeout", nap, (rng.uniform(0.1, 0.8), token), rng.uniform(0.2, 0.8), token)


def judge(p: Plan, result: Any, exc: BaseException | None) -> tuple[str, str]:
    """("ok" | "typed" | "wrong" | "unexpected", detail)."""
    if exc is None:
        if p.expect is None:
            return "wrong", f"expected SoakError, got result {result!r}"
        if result != p.expect:
            return "wrong", f"expected {p.expect!r}, got {result!r}"
        return "ok", ""
    if isinstance(exc, SoakError):
        if p.expect is None and str(exc) == f"soak-{p.args[0]}":
            return "ok", ""
        return "wrong", f"unexpected {exc!r}"
    if isinstance(exc, flame.CallTimeout):
        return "typed", "CallTimeout"
    if isinstance(exc, flame.RunnerLost):
        return "typed", "RunnerLost"
    if isinstance(exc, flame.BootError):
        return "typed", "BootError"
    if isinstance(exc, flame.FlameError):
        return "typed", f"other:{type(exc).__name__}"
    return "unexpected", f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


# -- callers --------------------------------------------------------------------------------------
class Callers:
    def __init__(self, pool: flame.Pool, tally: Tally, until: float, seed: int) -> None:
        self.pool = pool
        self.tally = tally
        self.until = until
        self.seed = seed

    def thread_main(self, i: int) -> None:
        rng = random.Random(f"{self.seed}-thread-{i}")
        while time.monotonic() < self.until:
            p = plan(rng)
            t0 = time.monotonic()
            result: Any = None
            exc: BaseException | None = None
            try:
                result = flame.call(self.pool, p.fn, *p.args, timeout=p.timeout)
            except Exception as e:  # judged below
                exc = e
            took = time.monotonic() - t0
            outcome, detail = judge(p, result, exc)
            self.tally.record(p.kind, outcome, detail, took, p.timeout)

    async def task_main(self, i: int) -> None:
        rng = random.Random(f"{self.seed}-task-{i}")
        while time.monotonic() < self.until:
            p = plan(rng)
            t0 = time.monotonic()
            result: Any = None
            exc: BaseException | None = None
            try:
                result = await flame.acall(self.pool, p.fn, *p.args, timeout=p.timeout)
            except Exception as e:  # judged below
                exc = e
            took = time.monotonic() - t0
            outcome, detail = judge(p, result, exc)
            self.tally.record(p.kind, outcome, detail, took, p.timeout)


# -- chaos ----------------------------------------------------------------------------------------
class Chaos:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"{seed}-chaos")
        self.stop = threading.Event()
        self.faults: Counter[str] = Counter()
        self.stopped: dict[Proc, tuple[float, bool]] = {}  # SIGSTOPped -> (when, connected)
        self.stop_leaks: dict[Proc, str] = {}
        self.lifetimes: dict[str, float] = {}  # longest a SIGSTOPped runner lived, by state
        self.seen: set[Proc] = set()
        self.lock = threading.Lock()

    def scan(self) -> list[Proc]:
        procs = runner_procs()
        with self.lock:
            self.seen.update(procs)
        return procs

    def check_stopped(self, now: float) -> None:
        for proc, (at, was_connected) in list(self.stopped.items()):
            state = "connected" if was_connected else "booting"
            bound = STOP_LEAK_AFTER if was_connected else STOP_LEAK_AFTER_BOOTING
            if not alive(proc):
                del self.stopped[proc]
                self.lifetimes[state] = max(self.lifetimes.get(state, 0.0), now - at)
            elif now - at > bound:
                self.stop_leaks[proc] = (
                    f"pid {proc[0]} ({state} when stopped) alive after {bound:g}s"
                )
                del self.stopped[proc]

    def run(self) -> None:
        """Inject a fault every 0.3-1.0 s until told to stop; watch the SIGSTOPped runners
        (every 50 ms, so their lifetimes are measured closely) until each is gone or leaked."""
        next_fault = time.monotonic() + self.rng.uniform(0.3, 1.0)
        while True:
            now = time.monotonic()
            self.check_stopped(now)
            if self.stop.is_set():
                if not self.stopped:
                    return
            elif now >= next_fault:
                self.fault()
                next_fault = now + self.rng.uniform(0.3, 1.0)
            time.sleep(0.05)

    def fault(self) -> None:
        # only runners not already frozen: a second fault on them would teach nothing
        procs = [p for p in self.scan() if p not in self.stopped and p not in self.stop_leaks]
        # draw even when there is no target, so the sequence depends on the seed only
        pick, sig = self.rng.random(), self.rng.choice(("SIGKILL", "SIGSTOP"))
        if not procs:
            self.faults["skipped (no unfrozen runner)"] += 1
            return
        proc = procs[int(pick * len(procs))]
        if state_of(proc) is None:
            return
        was_connected = connected(proc[0])
        try:
            os.kill(proc[0], getattr(signal, sig))
        except ProcessLookupError:
            return
        self.faults[sig] += 1
        if sig == "SIGSTOP":
            self.stopped[proc] = (time.monotonic(), was_connected)
            self.faults[f"SIGSTOP ({'connected' if was_connected else 'booting'})"] += 1


# -- the run ---------------------------------------------------------------------------------
def _stats(pool: flame.Pool) -> dict[str, int]:
    s = pool.stats()
    return {
        "runners": s.runners,
        "booting": s.booting,
        "retiring": s.retiring,
        "in_flight": s.in_flight,
        "waiting": s.waiting,
    }


def soak(seconds: float, threads: int, tasks: int, seed: int) -> Figures:
    flame.configure(
        heartbeat_interval=HEARTBEAT_INTERVAL,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        cancel_grace=CANCEL_GRACE,
    )
    fig = Figures(seconds=seconds, threads=threads, tasks=tasks, seed=seed)
    tally = Tally()
    chaos = Chaos(seed)
    pool = flame.Pool(
        "soak",
        min=1,
        max=3,
        max_concurrency=4,
        backend=flame.ProcessBackend(),
        idle_shutdown_after=2.0,
        boot_timeout=BOOT_TIMEOUT,
        shutdown_timeout=2.0,
    )
    pool.start()
    until = time.monotonic() + seconds
    callers = Callers(pool, tally, until, seed)

    workers = [
        threading.Thread(
            target=callers.thread_main, args=(i,), name=f"soak-thread-{i}", daemon=True
        )
        for i in range(threads)
    ]
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="soak-loop", daemon=True)
    loop_thread.start()

    async def spawn() -> list[asyncio.Task[None]]:
        return [asyncio.create_task(callers.task_main(i)) for i in range(tasks)]

    async_tasks = asyncio.run_coroutine_threadsafe(spawn(), loop).result()
    chaos_thread = threading.Thread(target=chaos.run, name="soak-chaos", daemon=True)
    for w in workers:
        w.start()
    chaos_thread.start()

    # -- the run itself; then stop the chaos and join every caller with a deadline
    while time.monotonic() < until:
        time.sleep(min(0.5, max(0.0, until - time.monotonic())))
        chaos.scan()
    chaos.stop.set()  # no more faults; it keeps watching the SIGSTOPped runners
    join_by = until + CALL_TIMEOUT + HUNG_SLACK
    for w in workers:
        w.join(max(0.0, join_by - time.monotonic()))

    async def pending_tasks() -> int:
        await asyncio.wait(async_tasks, timeout=max(0.0, join_by - time.monotonic()))
        return sum(not t.done() for t in async_tasks)

    hung_tasks = asyncio.run_coroutine_threadsafe(pending_tasks(), loop).result()
    fig.hung_callers = sum(w.is_alive() for w in workers) + hung_tasks

    # -- SIGSTOPped runners must have been killed by the pool (bounded: it flags leaks)
    chaos_thread.join()
    fig.stopped_runner_leaks = [chaos.stop_leaks[p] for p in sorted(chaos.stop_leaks)]
    fig.stopped_lifetime_max_s = {k: round(v, 2) for k, v in sorted(chaos.lifetimes.items())}

    # -- let cancellations be confirmed (or runners be declared lost), then look at the slots
    settle_by = time.monotonic() + HEARTBEAT_TIMEOUT + CANCEL_GRACE + 3.0
    stats = _stats(pool)
    while (stats["in_flight"] or stats["waiting"]) and time.monotonic() < settle_by:
        time.sleep(0.1)
        stats = _stats(pool)
    fig.stats_before_stop = stats
    fig.leaked_slots = {k: stats[k] for k in ("in_flight", "waiting") if stats[k]}

    # -- stop the pool; every runner process must be gone within STOP_DEADLINE
    chaos.scan()
    pool.stop()
    gone_by = time.monotonic() + STOP_DEADLINE
    seen = set(chaos.seen)
    while any(alive(p) for p in seen) and time.monotonic() < gone_by:
        time.sleep(0.1)
    fig.leaked_runners = sorted(p[0] for p in seen if alive(p))
    fig.zombies_after_stop = sorted(p[0] for p in seen if state_of(p) == "Z")
    for p in seen:  # clean up after a leak so this process can exit
        if alive(p):
            try:
                os.kill(p[0], signal.SIGKILL)
            except ProcessLookupError:
                pass
    fig.runners_seen = len(seen)

    if hung_tasks == 0:
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5.0)

    with tally.lock:
        fig.calls, fig.calls_ok, fig.max_call_s = tally.calls, tally.ok, tally.max_call
        fig.calls_by_kind = dict(sorted(tally.kinds.items()))
        fig.typed_errors = dict(sorted(tally.typed.items()))
        fig.unexpected_errors = list(tally.unexpected)
        fig.wrong_results = list(tally.wrong)
        fig.late_calls = list(tally.late)
    fig.hung_callers += len(fig.late_calls)
    fig.faults = dict(sorted(chaos.faults.items()))
    fig.passed = not (
        fig.wrong_results
        or fig.hung_callers
        or fig.leaked_runners
        or fig.stopped_runner_leaks
        or fig.leaked_slots
        or fig.unexpected_errors
    )
    return fig


def report(fig: Figures) -> str:
    lines = [
        f"flame {flame.__version__} soak: {fig.seconds:g}s, {fig.threads} threads + "
        f"{fig.tasks} tasks, seed {fig.seed}",
        "",
    ]

    def row(name: str, value: object, must_be_zero: bool = False) -> None:
        mark = ""
        if must_be_zero:
            mark = "  ok" if not value else "  FAIL"
        lines.append(f"  {name:<36} {value!s:>10}{mark}")

    kinds = ", ".join(f"{k} {v}" for k, v in fig.calls_by_kind.items())
    row("calls", fig.calls)
    lines.append(f"    by kind: {kinds}")
    row("calls ok", fig.calls_ok)
    row("typed errors", sum(fig.typed_errors.values()))
    for name in ("CallTimeout", "RunnerLost", "BootError"):
        row(f"  {name}", fig.typed_errors.get(name, 0))
    others = {k: v for k, v in fig.typed_errors.items() if k.startswith("other:")}
    row("  other flame errors", sum(others.values()))
    for k, v in others.items():
        row(f"    {k[6:]}", v)
    row("longest call (s)", f"{fig.max_call_s:.2f}")
    row("faults injected", fig.faults.get("SIGKILL", 0) + fig.faults.get("SIGSTOP", 0))
    for k, v in fig.faults.items():
        row(f"  {k}", v)
    for k, s in fig.stopped_lifetime_max_s.items():
        row(f"SIGSTOPped ({k}) lived, max s", f"{s:.2f}")
    row("runner processes seen", fig.runners_seen)
    lines.append("")
    row("unexpected errors", len(fig.unexpected_errors), True)
    row("wrong results", len(fig.wrong_results), True)
    row("hung callers", fig.hung_callers, True)
    row("leaked runners (after stop)", len(fig.leaked_runners), True)
    row("leaked runners (SIGSTOP not killed)", len(fig.stopped_runner_leaks), True)
    row("leaked slots", sum(fig.leaked_slots.values()), True)
    if fig.zombies_after_stop:
        row("unreaped runners (zombies)", len(fig.zombies_after_stop))
    details = [
        ("unexpected", fig.unexpected_errors),
        ("wrong", fig.wrong_results),
        ("late (hung) call", fig.late_calls),
        ("leaked runner pid", [str(p) for p in fig.leaked_runners]),
        ("SIGSTOPped runner not killed", fig.stopped_runner_leaks),
        ("zombie pid", [str(p) for p in fig.zombies_after_stop]),
    ]
    for label, items in details:
        for item in items[:10]:
            lines.append(f"    {label}: {item}")
        if len(items) > 10:
            lines.append(f"    ... and {len(items) - 10} more")
    if fig.leaked_slots:
        lines.append(f"    pool stats before stop: {fig.stats_before_stop}")
    lines += ["", "PASS" if fig.passed else "FAIL"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to drive calls")
    parser.add_argument("--threads", type=int, default=8, help="callers using flame.call")
    parser.add_argument("--tasks", type=int, default=8, help="asyncio tasks using flame.acall")
    parser.add_argument("--seed", type=int, default=0, help="seeds every random choice")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    fig = soak(args.seconds, args.threads, args.tasks, args.seed)
    print(report(fig), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(asdict(fig), fh, indent=2)
    return 0 if fig.passed else 1


if __name__ == "__main__":
    sys.exit(main())
