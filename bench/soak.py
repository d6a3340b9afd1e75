"""Soak flame under chaos: many callers, while runners are killed, frozen and cut off at random.

``python -m bench.soak --seconds N [--threads M] [--tasks K] [--seed S] [--json PATH]
[--partitions | --no-partitions]``

A ``ProcessBackend`` pool is driven for N seconds by M threads (``flame.call``) and K asyncio
tasks (``flame.acall``, all on one loop thread) with a seeded mix of calls: quick ones with a
known result, short sleeps, calls that raise a known exception, and calls whose small timeout
sometimes expires. Meanwhile a chaos thread picks one of the pool's runner processes every
0.3-1.0 s and sends it SIGKILL or SIGSTOP. A stopped runner must be found out by heartbeats
and killed by the pool.

With ``--partitions`` (the default where network namespaces can be made: root, ``ip`` and
``nft``; ``--no-partitions`` to turn it off) each runner starts in a network namespace of its
own, joined to the parent by a veth pair on a bridge (``tests/helpers/parent/netns.py``), and the
chaos thread has a third kind of fault: it cuts a settled runner off, silently (its veth set
down, or nftables dropping every packet in its namespace), some for less than the heartbeat
timeout (to be ridden out), some for longer (both sides must notice: the runner leaves by
itself, its calls fail with ``RunnerLost``); another thread heals each cut when its time is
up. A runner cut off for longer than the heartbeat bound and still alive is a leak, and so
is a namespace left after the run.

At the end the callers are joined with a deadline, the pool is allowed to settle and is
stopped, and the script checks: wrong results, hung callers, leaked runner processes (alive
10 s after ``pool.stop()``, or SIGSTOPped and still there long after the heartbeat bound),
leaked slots (``in_flight``/``waiting`` not back to 0 once every caller is done), and
unexpected (non-flame) errors. Any of those non-zero makes the exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
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
# partitions (--partitions): a third kind of fault, on a runner whose TCP connection to the
# parent is SETTLED_FOR old (normally past its handshake: heartbeats are the bound then; one
# cut during its handshake gives up after the handshake timeout, 5 s). Short ones are well
# under the heartbeat timeout; a long one outlasts PARTITION_LEAK_AFTER, by which the runner
# must be gone (it noticed the silent parent and left, or the pool, having noticed, killed it).
SETTLED_FOR = 0.5
SHORT_PARTITION = (0.3, 1.0)
PARTITION_LEAK_AFTER = HEARTBEAT_TIMEOUT + 3.0
LONG_PARTITION = (PARTITION_LEAK_AFTER + 0.5, PARTITION_LEAK_AFTER + 2.0)


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
    partitions: str = "off"  # "on", or "off (why)"
    partition_counts: dict[str, int] = field(default_factory=dict)
    partition_leaks: list[str] = field(default_factory=list)
    partition_lived_max_s: float = 0.0  # longest a runner cut off for good lived after the cut
    leaked_namespaces: list[str] = field(default_factory=list)
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
        self.lock = threading.RLock()
        self.partitions: Partitions | None = None  # with --partitions: a third kind of fault
        self.partition_due = False  # drawn, but no runner could be cut off yet

    def scan(self) -> list[Proc]:
        procs = runner_procs()
        with self.lock:
            self.seen.update(procs)
        return procs

    def check_stopped(self, now: float) -> None:
        with self.lock:
            self._check_stopped(now)

    def _check_stopped(self, now: float) -> None:
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
        """Inject a fault every 0.3-1.0 s until told to stop (a partition drawn when no
        runner can be cut off waits for one); watch the SIGSTOPped runners (every 50 ms, so
        their lifetimes are measured closely) until each is gone or leaked."""
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
            else:
                self.partition()
            time.sleep(0.05)

    def fault(self) -> None:
        with self.lock:
            self._fault()

    def partition(self) -> None:
        """Cut a runner off if one is due and one can be (else try again on the next tick:
        runners fit to cut off are often all frozen or just booted)."""
        with self.lock:
            parts = self.partitions
            if not self.partition_due or parts is None:
                return
            if parts.inject(time.monotonic(), frozen={p[0] for p in self.stopped}):
                self.faults["partition"] += 1
                self.partition_due = False

    def _fault(self) -> None:
        # only runners not already frozen (or cut off): a second fault would teach nothing
        parts = self.partitions
        cut_off = parts.cut_off() if parts is not None else set()
        procs = [
            p
            for p in self.scan()
            if p not in self.stopped and p not in self.stop_leaks and p[0] not in cut_off
        ]
        # draw even when there is no target, so the sequence depends on the seed only
        kinds = ("SIGKILL", "SIGSTOP") if parts is None else ("SIGKILL", "SIGSTOP", "partition")
        pick, sig = self.rng.random(), self.rng.choice(kinds)
        if sig == "partition":
            self.partition_due = True
            self.partition()
            return
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


# -- partitions ----------------------------------------------------------------------------------
def _netns() -> Any:
    """The network-namespace helpers shared with tests/test_partition.py."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from helpers.parent import netns

    return netns


def partitions_unavailable() -> str | None:
    """Why runners cannot be put in network namespaces here, or None."""
    try:
        return _netns().unavailable()  # type: ignore[no-any-return]
    except Exception as exc:  # e.g. run from a copy without tests/
        return f"cannot load the namespace helpers: {exc!r}"


@dataclass
class Cut:
    proc: Proc
    handle: Any  # helpers.parent.netns.WatchedHandle; .netns is the runner's namespace
    mode: str  # "link" or "drop"
    at: float
    until: float
    long: bool
    gone_at: float | None = None
    leaked: bool = False
    interrupted: bool = False  # healed early: the run was over


class Partitions:
    """Cuts runners off (each lives in a namespace of its own) and heals them, at random."""

    def __init__(self, seed: int, backend: Any) -> None:
        self.rng = random.Random(f"{seed}-partitions")
        self.netns = _netns()
        self.backend = backend
        self.stop = threading.Event()
        self.active: dict[int, Cut] = {}
        self.done: list[Cut] = []
        self.counts: Counter[str] = Counter()
        self.leaks: list[str] = []
        self.settled: dict[int, float] = {}  # pid -> first seen connected
        self.lock = threading.Lock()
        self.closed = False  # no more cuts (the run is over)

    def dialled(self, pid: int) -> bool:
        """Whether the runner has a TCP connection to the parent (seen in its namespace)."""
        try:
            with open(f"/proc/{pid}/net/tcp") as fh:
                table = self.netns.parse_tcp(fh.read())
        except OSError:
            return False
        parent = self.backend.bridge.address
        return any(t.remote[0] == parent and t.state == "ESTABLISHED" for t in table)

    def cut_off(self) -> set[int]:
        with self.lock:
            return set(self.active)

    def run(self) -> None:
        """Watch the runners cut off (every 50 ms) and heal each cut when its time is up;
        when told to stop, heal every cut still in place. The chaos thread injects them."""
        try:
            while not self.stop.is_set():
                self.watch(time.monotonic())
                time.sleep(0.05)
        finally:
            with self.lock:
                self.closed = True
                left = list(self.active.values())
            for cut in left:
                cut.interrupted = True
                self.heal(cut, time.monotonic())

    def watch(self, now: float) -> None:
        live = self.backend.live()
        for pid in live:
            if pid not in self.settled and self.dialled(pid):
                self.settled[pid] = now
        for pid in [p for p in self.settled if p not in live]:
            del self.settled[pid]
        for cut in list(self.active.values()):
            if cut.gone_at is None and not alive(cut.proc):
                cut.gone_at = now
            if cut.long and cut.gone_at is None and not cut.leaked:
                if now - cut.at > PARTITION_LEAK_AFTER:
                    cut.leaked = True
                    self.leaks.append(
                        f"pid {cut.proc[0]} cut off ({cut.mode}) and still alive after "
                        f"{PARTITION_LEAK_AFTER:g}s"
                    )
            if now >= cut.until:
                self.heal(cut, now)

    def inject(self, now: float, frozen: set[int]) -> bool:
        """Cut one settled runner off (not one of ``frozen``); False if there was none."""
        live = self.backend.live()
        candidates = sorted(
            pid
            for pid in live
            if pid not in self.active
            and pid not in frozen
            and now - self.settled.get(pid, now) >= SETTLED_FOR
        )
        if not candidates:
            return False
        pick, mode, long = self.rng.random(), self.rng.choice(("link", "drop")), self.rng.random()
        duration = self.rng.uniform(*(LONG_PARTITION if long < 0.5 else SHORT_PARTITION))
        pid = candidates[int(pick * len(candidates))]
        handle, st = live[pid], _stat(pid)
        if st is None or st[1] in ("Z", "T"):
            return False
        with self.lock:  # (so that run() heals every cut made)
            if self.closed:
                return False
            if long < 0.5:
                # the pool may not kill it before the leak bound: it must leave by itself
                handle.patience = PARTITION_LEAK_AFTER + 1.0
            try:
                handle.netns.cut(mode)
            except Exception:  # the runner (and its namespace) went away meanwhile
                handle.patience = 0.0
                return False
            cut = Cut((pid, st[2]), handle, mode, now, now + duration, long < 0.5)
            self.active[pid] = cut
        self.counts["injected"] += 1
        self.counts[f"{mode} ({'long' if cut.long else 'short'})"] += 1
        return True

    def heal(self, cut: Cut, now: float) -> None:
        cut.handle.netns.heal(check=False)
        cut.handle.patience = 0.0
        if cut.gone_at is None and not alive(cut.proc):
            cut.gone_at = now
        with self.lock:
            self.active.pop(cut.proc[0], None)
        self.done.append(cut)

    def figures(self) -> tuple[dict[str, int], float]:
        """Outcome counts (once every runner is gone) and the longest a runner cut off for
        good lived after its cut."""
        counts = Counter(self.counts)
        lived = 0.0
        for cut in self.done:
            code = cut.handle.returncode
            if cut.interrupted and cut.gone_at is None:
                counts["healed early (end of run)"] += 1
            elif cut.long:
                if cut.gone_at is not None:
                    lived = max(lived, cut.gone_at - cut.at)
                if code == 205:  # ExitCode.PARENT_LOST
                    counts["long: left by itself (exit 205)"] += 1
                else:
                    counts[f"long: ended otherwise (exit {code})"] += 1
            elif cut.gone_at is None:
                counts["short: ridden out (same runner)"] += 1
            else:
                counts["short: runner lost"] += 1
        return dict(sorted(counts.items())), lived


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


def soak(
    seconds: float, threads: int, tasks: int, seed: int, partitions: bool | None = None
) -> Figures:
    """Run the soak. ``partitions``: None means on where network namespaces can be made."""
    fig = Figures(seconds=seconds, threads=threads, tasks=tasks, seed=seed)
    why_not = None if partitions is False else partitions_unavailable()
    if partitions and why_not is not None:
        raise SystemExit(f"--partitions: {why_not}")
    if partitions is False or why_not is not None:
        fig.partitions = "off" if partitions is False else f"off ({why_not})"
        _run(fig, flame.ProcessBackend(), with_partitions=False)
        return fig
    netns = _netns()
    with contextlib.ExitStack() as stack:
        bridge = netns.Bridge()
        stack.callback(bridge.close)
        bridge.create()
        tmp = tempfile.mkdtemp(prefix="flame-soak-")
        stack.callback(shutil.rmtree, tmp, True)
        backend = netns.NetnsPerRunnerBackend(bridge, netns.write_wrapper(tmp))
        fig.partitions = "on"
        _run(fig, backend, with_partitions=True)
    # every runner's namespace is deleted when the pool stops it; what is left leaked
    fig.leaked_namespaces = netns.leftovers()
    for name in fig.leaked_namespaces:  # leave the machine clean all the same
        kind = ("netns", "del") if name.startswith("flame-") else ("link", "del")
        netns.run("ip", *kind, name, check=False)
    fig.passed = fig.passed and not fig.leaked_namespaces
    return fig


def _run(fig: Figures, backend: flame.Backend, *, with_partitions: bool) -> None:
    flame.configure(
        heartbeat_interval=HEARTBEAT_INTERVAL,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        cancel_grace=CANCEL_GRACE,
    )
    seed, threads, tasks = fig.seed, fig.threads, fig.tasks
    tally = Tally()
    chaos = Chaos(seed)
    parts = Partitions(seed, backend) if with_partitions else None
    chaos.partitions = parts
    pool = flame.Pool(
        "soak",
        min=1,
        max=3,
        max_concurrency=4,
        backend=backend,
        idle_shutdown_after=2.0,
        boot_timeout=BOOT_TIMEOUT,
        shutdown_timeout=2.0,
    )
    pool.start()
    until = time.monotonic() + fig.seconds
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
    part_thread = threading.Thread(
        target=parts.run if parts else lambda: None, name="soak-partitions", daemon=True
    )
    for w in workers:
        w.start()
    chaos_thread.start()
    part_thread.start()

    # -- the run itself; then stop the chaos and join every caller with a deadline
    while time.monotonic() < until:
        time.sleep(min(0.5, max(0.0, until - time.monotonic())))
        chaos.scan()
    chaos.stop.set()  # no more faults; it keeps watching the SIGSTOPped runners
    if parts is not None:
        parts.stop.set()  # no more cuts; it heals what is still cut off
    part_thread.join()
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
    if parts is not None:
        fig.partition_counts, lived = parts.figures()
        fig.partition_lived_max_s = round(lived, 2)
        fig.partition_leaks = list(parts.leaks)

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
        or fig.partition_leaks
    )


def report(fig: Figures) -> str:
    lines = [
        f"flame {flame.__version__} soak: {fig.seconds:g}s, {fig.threads} threads + "
        f"{fig.tasks} tasks, seed {fig.seed}, partitions {fig.partitions}",
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
    row("faults injected", sum(fig.faults.get(k, 0) for k in ("SIGKILL", "SIGSTOP", "partition")))
    for k, v in fig.faults.items():
        row(f"  {k}", v)
    for k, s in fig.stopped_lifetime_max_s.items():
        row(f"SIGSTOPped ({k}) lived, max s", f"{s:.2f}")
    if fig.partitions == "on":
        row("partitions injected", fig.partition_counts.get("injected", 0))
        for k, v in fig.partition_counts.items():
            if k != "injected":
                row(f"  {k}", v)
        row("cut off for good: lived, max s", f"{fig.partition_lived_max_s:.2f}")
    row("runner processes seen", fig.runners_seen)
    lines.append("")
    row("unexpected errors", len(fig.unexpected_errors), True)
    row("wrong results", len(fig.wrong_results), True)
    row("hung callers", fig.hung_callers, True)
    row("leaked runners (after stop)", len(fig.leaked_runners), True)
    row("leaked runners (SIGSTOP not killed)", len(fig.stopped_runner_leaks), True)
    row("leaked slots", sum(fig.leaked_slots.values()), True)
    if fig.partitions == "on":
        row("leaked runners (partition unnoticed)", len(fig.partition_leaks), True)
        row("leaked namespaces", len(fig.leaked_namespaces), True)
    if fig.zombies_after_stop:
        row("unreaped runners (zombies)", len(fig.zombies_after_stop))
    details = [
        ("unexpected", fig.unexpected_errors),
        ("wrong", fig.wrong_results),
        ("late (hung) call", fig.late_calls),
        ("leaked runner pid", [str(p) for p in fig.leaked_runners]),
        ("SIGSTOPped runner not killed", fig.stopped_runner_leaks),
        ("partitioned runner not gone", fig.partition_leaks),
        ("leaked namespace", fig.leaked_namespaces),
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
    parser.add_argument(
        "--partitions",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="put each runner in a network namespace and cut them off at random (default: "
        "on where namespaces can be made: root, ip, nft)",
    )
    args = parser.parse_args(argv)
    fig = soak(args.seconds, args.threads, args.tasks, args.seed, args.partitions)
    print(report(fig), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(asdict(fig), fh, indent=2)
    return 0 if fig.passed else 1


if __name__ == "__main__":
    sys.exit(main())
