"""The pool's decision core: state + event -> actions, with no I/O, no awaits, no clock.

``Scaler`` holds what a pool knows (its runners and their load, the callers waiting in FIFO
order) and answers every event with the list of things to do. Time comes in with each event
(``now``, monotonic seconds). The async shell in ``flame._pool`` carries the actions out; this
split lets the rules be tested exhaustively on their own (see tests/test_scaling.py).

Every event but ``stop`` ends by settling the pool: callers whose deadline passed fail, free
slots are handed out, missing runners are booted, and a ``Wake`` tells the shell when to
``tick`` next (the earliest caller deadline, and the end of a boot debounce).

The rules (SPEC "Pool rules", plus where we do better than FLAME):

* a caller goes to the ready runner with the fewest calls in flight, if below
  ``max_concurrency`` (among equals, the oldest runner); otherwise it waits, first in,
  first out;
* runners are booted while (booting + ready + retiring) < ``max`` and the waiting callers are
  not covered by the runners already booting (while work is in flight, ``boot_ahead`` free
  slots are kept in reserve on top of that), and always up to ``min``; a retiring runner
  still counts towards ``max`` until it is gone, so the pool can never exceed ``max``
  processes;
* a runner that comes up takes waiting callers, up to ``max_concurrency``; callers whose
  deadline passed or who withdrew are skipped;
* a failed boot blocks new boots for ``retry_debounce`` seconds; the callers no ready or
  booting runner can serve fail at once with the boot's error;
* a runner asking to go idle is let go when it is beyond ``min`` (after
  ``idle_shutdown_after``), or, being one of the ``min``, after ``min_idle_shutdown_after``;
  a ``min`` runner that idled down is not replaced until the next caller arrives (otherwise
  an idle pool would recycle its ``min`` runners forever);
* a single-use runner is retired after its call; dead and retired runners are replaced while
  the pool is below ``min``;
* hooks: ``on_grow_start`` / ``on_grow_end`` for boots beyond ``min`` (ready + booting), the
  end also when the boot fails or the runner was retired while booting; ``on_shrink`` when a
  booted runner goes. Their ``count`` is the runner count (retiring ones included) after it.

Why an event costs the same with ten waiting callers or a million (issue 17): nothing here
scans the waiters or the runners on an ordinary event. The state is indexed as it changes:

* waiters: an ``OrderedDict`` in arrival order (O(1) to add, withdraw, or take the first),
  and a heap of ``(deadline, seq, id)``. Settling pops only the deadlines that passed
  (O(log n) each) and peeks the heap top for the ``Wake``. A withdrawn or served waiter's
  entry is not searched for: it is dropped when it reaches the top (lazy deletion), and the
  heap is rebuilt when stale entries outnumber live ones, so it stays O(waiters).
* runners: a heap of ``(in_flight, id)`` over the ready runners with a free slot, also with
  lazy deletion (an entry counts while the runner is ready with that load). Its top is the
  least busy runner, and the lowest id breaks ties. Ids only grow and runners are stored in
  id order, so this is the "first of the least busy" of a scan in storage order.
* counters kept with every change: runners per state, calls in flight, free slots on ready
  runners. The boot demand, ``count`` and ``in_flight`` are read from them in O(1).

So ``request``, ``withdraw``, ``release``, ``take`` and ``tick`` cost O(log n) plus O(log n)
for each caller they assign or fail. ``stop``, and a failed boot that fails k callers, cost
what they hand out. ``RunnerView`` and ``WaiterView`` are the core's own records: read them,
never change them from outside (the indexes would go stale). ``_audit`` checks every index
against a recount, for the tests.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


class RState(enum.Enum):
    BOOTING = "booting"
    READY = "ready"
    RETIRING = "retiring"


@dataclass(slots=True)
class RunnerView:
    id: int
    state: RState = RState.BOOTING
    in_flight: int = 0
    idle_since: float = 0.0
    grew: bool = False  # booted beyond min: on_grow_start was sent, on_grow_end is due


@dataclass(slots=True)
class WaiterView:
    id: int
    deadline: float | None
    seq: int = 0  # arrival number: FIFO order, and which deadline-heap entry is its own


# -- actions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assign:
    waiter: int
    runner: int


@dataclass(frozen=True)
class Boot:
    runner: int


@dataclass(frozen=True)
class Retire:
    runner: int


@dataclass(frozen=True)
class Keep:
    runner: int
    retry_after: float  # -1: do not ask again until busy and idle again


class FailKind(enum.Enum):
    TIMEOUT = "timeout"
    BOOT = "boot"
    CLOSED = "closed"


@dataclass(frozen=True)
class Fail:
    waiter: int
    kind: FailKind
    cause: BaseException | None = None


@dataclass(frozen=True)
class Hook:
    name: str  # "on_grow_start", "on_grow_end", "on_shrink"
    count: int
    result: object = None


@dataclass(frozen=True)
class Wake:
    at: float  # call tick() at this time


Action = Assign | Boot | Retire | Keep | Fail | Hook | Wake


#: stale heap entries tolerated beyond twice the live ones before a heap is rebuilt
_SLACK = 32


@dataclass
class Scaler:
    min: int
    max: int
    max_concurrency: int
    single_use: bool = False
    idle_shutdown_after: float | None = 30.0
    min_idle_shutdown_after: float | None = None
    boot_ahead: int = 0
    retry_debounce: float = 1.0

    runners: dict[int, RunnerView] = field(default_factory=dict)
    waiters: OrderedDict[int, WaiterView] = field(default_factory=OrderedDict)
    stopping: bool = False
    boot_blocked_until: float = -math.inf
    #: a min runner idled down (min_idle_shutdown_after): min is not restored until work comes
    min_released: bool = False
    _next_runner: int = 0
    _settled_at: float = -math.inf  # when _settle last ran (see _quiet)

    # -- the indexes (derived from runners and waiters; see the module docstring) -------------
    _ready: dict[int, RunnerView] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _booting: int = field(default=0, init=False, repr=False, compare=False)
    _retiring: int = field(default=0, init=False, repr=False, compare=False)
    _calls: int = field(default=0, init=False, repr=False, compare=False)  # in flight, all runners
    _free: int = field(default=0, init=False, repr=False, compare=False)  # slots on ready runners
    _load: list[tuple[int, int]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _deadlines: list[tuple[float, int, int]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _seq: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._reindex()

    # -- queries ----------------------------------------------------------------------------
    def count(self, *states: RState) -> int:
        """Runners in any of ``states`` (all of them if none is given), in O(1)."""
        if not states:
            return len(self.runners)
        return sum(self._in_state(s) for s in set(states))

    def in_flight(self) -> int:
        """Calls (and placed children) in flight on every runner, in O(1)."""
        return self._calls

    def _in_state(self, state: RState) -> int:
        if state is RState.READY:
            return len(self._ready)
        return self._booting if state is RState.BOOTING else self._retiring

    def _least_busy(self) -> RunnerView | None:
        """The ready runner with a free slot and the fewest calls (the oldest such), if any."""
        load, ready = self._load, self._ready
        while load:
            calls, rid = load[0]
            r = ready.get(rid)
            if r is not None and r.in_flight == calls:
                return r
            heapq.heappop(load)  # stale: the runner's load changed, or it is no longer ready
        return None

    # -- events -------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        return self._settle(now)

    def request(self, waiter: int, deadline: float | None, now: float) -> list[Action]:
        """A caller wants a slot."""
        if self.stopping:
            return [Fail(waiter, FailKind.CLOSED)]
        self.min_released = False
        old = self.waiters.get(waiter)
        if old is not None:  # the same id again: it keeps its place, with the new deadline
            old.deadline = deadline
            w = old
        else:
            self._seq += 1
            w = self.waiters[waiter] = WaiterView(waiter, deadline, self._seq)
        if deadline is not None:
            self._push_deadline(w)
        return self._settle(now)

    def take(self, now: float) -> int | None:
        """The hot path of ``request``: a caller wants a slot, no one is queued before it and
        no boot can follow. Returns the runner whose slot it gets, or ``None`` (then the
        caller goes through :meth:`request`). Same outcome as ``request`` + ``_settle``."""
        if not self._quiet(now) or self.min_released:
            return None
        best = self._least_busy()
        if best is None:
            return None
        self._occupy(best)
        return best.id

    def withdraw(self, waiter: int, now: float) -> list[Action]:
        """A waiting caller gave up (cancelled, or its own deadline timer fired)."""
        self.waiters.pop(waiter, None)  # its deadline entry goes stale
        return self._settle(now)

    def release(self, runner: int, now: float) -> list[Action]:
        """A call (or a placed child) on ``runner`` ended and gave its slot back."""
        r = self.runners.get(runner)
        if r is None:
            return self._settle(now)
        self._vacate(r)
        if r.in_flight == 0:
            r.idle_since = now
        actions: list[Action] = []
        if self.single_use and r.state is RState.READY:
            self._move(r, RState.RETIRING)
            actions.append(Retire(runner))
        elif self._quiet(now):
            return actions  # the hot path: what _settle would do is already done
        return actions + self._settle(now)

    def _quiet(self, now: float) -> bool:
        """Whether taking or freeing one slot leaves ``_settle`` nothing to do: no waiter to
        serve, no boot_ahead reserve (the only boot rule that counts busy slots), not
        stopping, and no debounce in force (else it would repeat its Wake). The boots wanted
        are then the same as after the last settling, which issued them."""
        return not (
            self.waiters
            or self.boot_ahead
            or self.stopping
            or self._settled_at < self.boot_blocked_until  # boots were held back since
        )

    def runner_up(self, runner: int, now: float) -> list[Action]:
        r = self.runners.get(runner)
        if r is None or r.state is RState.READY:
            return self._settle(now)
        actions: list[Action] = []
        if r.state is RState.BOOTING:
            r.idle_since = now
            self._move(r, RState.READY)
            if self.stopping:
                self._move(r, RState.RETIRING)
                actions.append(Retire(runner))
        if r.grew:  # also when it was retired while booting (stop) and came up anyway
            r.grew = False
            actions.append(Hook("on_grow_end", len(self.runners), "ok"))
        return actions + self._settle(now)

    def boot_failed(self, runner: int, error: BaseException, now: float) -> list[Action]:
        r = self._drop(runner)
        actions: list[Action] = []
        if r is not None and r.grew:
            actions.append(Hook("on_grow_end", len(self.runners), error))
        self.boot_blocked_until = now + self.retry_debounce
        if not self._ready:
            # the newest waiters beyond what the booting runners cover fail, oldest first
            uncovered = len(self.waiters) - self._booting * self.max_concurrency
            if uncovered > 0:
                tail = list(itertools.islice(reversed(self.waiters), uncovered))
                for wid in reversed(tail):
                    del self.waiters[wid]
                    actions.append(Fail(wid, FailKind.BOOT, error))
        return actions + self._settle(now)

    def runner_gone(self, runner: int, now: float) -> list[Action]:
        """A runner is gone (exited, died, or was stopped); one still booting counts as a
        failed boot."""
        r = self.runners.get(runner)
        if r is not None and r.state is RState.BOOTING:
            return self.boot_failed(runner, RuntimeError("runner went away while booting"), now)
        actions: list[Action] = []
        if self._drop(runner) is not None:
            actions.append(Hook("on_shrink", len(self.runners)))
        return actions + self._settle(now)

    def idle_request(self, runner: int, now: float) -> list[Action]:
        """The runner has been idle (and its idle check passed): may it shut down?"""
        return self._idle(runner, now) + self._settle(now)

    def _idle(self, runner: int, now: float) -> list[Action]:
        r = self.runners.get(runner)
        if r is None or r.state is not RState.READY:
            return []
        if r.in_flight:
            return [Keep(runner, -1.0)]
        beyond = len(self._ready) + self._booting > self.min
        limit = self.idle_shutdown_after if beyond else self.min_idle_shutdown_after
        if limit is None:
            return [Keep(runner, -1.0)]
        idle_for = now - r.idle_since
        if idle_for >= limit - min(0.5, limit * 0.25):
            self._move(r, RState.RETIRING)
            if not beyond:
                self.min_released = True  # an idle pool may go below min, until work comes
            return [Retire(runner)]
        return [Keep(runner, limit - idle_for)]

    def retire(self, runner: int, now: float) -> list[Action]:
        """The shell wants this runner gone (it lost it, or a call on it got stuck)."""
        r = self.runners.get(runner)
        if r is None or r.state is RState.RETIRING:
            return self._settle(now)
        self._move(r, RState.RETIRING)
        return [Retire(runner), *self._settle(now)]

    def tick(self, now: float) -> list[Action]:
        return self._settle(now)

    def stop(self, now: float) -> list[Action]:
        self.stopping = True
        actions: list[Action] = [Fail(w, FailKind.CLOSED) for w in self.waiters]
        self.waiters.clear()
        self._deadlines.clear()
        for r in self.runners.values():
            if r.state is not RState.RETIRING:
                self._move(r, RState.RETIRING)
                actions.append(Retire(r.id))
        self._compact()
        return actions

    # -- the common part of every event ---------------------------------------------------------
    def _settle(self, now: float) -> list[Action]:
        self._settled_at = now
        actions: list[Action] = []
        waiters, deadlines = self.waiters, self._deadlines
        # 1. callers whose deadline passed are skipped (failed with a timeout), in FIFO order
        if deadlines and deadlines[0][0] <= now:
            expired: list[tuple[int, int]] = []
            while deadlines and deadlines[0][0] <= now:
                entry = heapq.heappop(deadlines)
                if self._live(entry):
                    expired.append((entry[1], entry[2]))
            expired.sort()
            for _, wid in expired:
                if waiters.pop(wid, None) is not None:  # (a waiter's entry may repeat)
                    actions.append(Fail(wid, FailKind.TIMEOUT))
        # 2. hand out free slots, first in first out, least busy runner first
        while waiters:
            best = self._least_busy()
            if best is None:
                break
            wid, _ = waiters.popitem(last=False)
            self._occupy(best)
            actions.append(Assign(wid, best.id))
        if self.stopping:
            return actions
        # 3. boot what is missing (after a failed boot: once the debounce is over)
        wanted = self._boots_wanted()
        if wanted and now < self.boot_blocked_until:
            actions.append(Wake(self.boot_blocked_until))
            wanted = 0
        for _ in range(wanted):
            rid = self._next_runner
            self._next_runner += 1
            grew = len(self._ready) + self._booting >= self.min
            self._add(RunnerView(rid, grew=grew))
            actions.append(Boot(rid))
            if grew:
                actions.append(Hook("on_grow_start", len(self.runners)))
        # 4. the earliest deadline among waiters, so the shell can skip them on time
        while deadlines:
            if self._live(deadlines[0]):
                actions.append(Wake(deadlines[0][0]))
                break
            heapq.heappop(deadlines)  # stale: served, withdrawn, or its deadline changed
        self._compact()
        return actions

    def _boots_wanted(self) -> int:
        room = self.max - len(self.runners)
        if room <= 0:
            return 0
        mc = self.max_concurrency
        booting = self._booting
        below_min = 0 if self.min_released else max(0, self.min - len(self._ready) - booting)
        # the slots left once the booting runners are up and every waiter took one
        free = booting * mc - len(self.waiters) + self._free
        busy = self.waiters or self._calls
        reserve = self.boot_ahead if busy else 0
        for_demand = max(0, -((free - reserve) // mc))  # ceil((reserve - free) / mc)
        return min(room, max(below_min, for_demand))

    # -- keeping the indexes (every change of a runner's state or load goes through these) ----
    def _add(self, r: RunnerView) -> None:
        self.runners[r.id] = r
        self._enter(r)
        self._calls += r.in_flight

    def _drop(self, runner: int) -> RunnerView | None:
        r = self.runners.pop(runner, None)
        if r is not None:
            self._leave(r)
            self._calls -= r.in_flight
        return r

    def _move(self, r: RunnerView, state: RState) -> None:
        self._leave(r)
        r.state = state
        self._enter(r)

    def _enter(self, r: RunnerView) -> None:
        if r.state is RState.READY:
            self._ready[r.id] = r
            self._free += self.max_concurrency - r.in_flight
            self._push_load(r)
        elif r.state is RState.BOOTING:
            self._booting += 1
        else:
            self._retiring += 1

    def _leave(self, r: RunnerView) -> None:
        if r.state is RState.READY:
            del self._ready[r.id]  # its load entries go stale
            self._free -= self.max_concurrency - r.in_flight
        elif r.state is RState.BOOTING:
            self._booting -= 1
        else:
            self._retiring -= 1

    def _occupy(self, r: RunnerView) -> None:
        """One more call on ``r`` (a ready runner with a free slot)."""
        r.in_flight += 1
        self._calls += 1
        self._free -= 1
        self._push_load(r)

    def _vacate(self, r: RunnerView) -> None:
        """One call fewer on ``r`` (in any state; a release of an idle runner is a no-op)."""
        if r.in_flight <= 0:
            return
        r.in_flight -= 1
        self._calls -= 1
        if r.state is RState.READY:
            self._free += 1
            self._push_load(r)

    def _push_load(self, r: RunnerView) -> None:
        if r.in_flight >= self.max_concurrency:
            return  # full: not a candidate until a slot frees
        heapq.heappush(self._load, (r.in_flight, r.id))
        if len(self._load) > 2 * len(self._ready) + _SLACK:
            self._rebuild_load()

    def _push_deadline(self, w: WaiterView) -> None:
        assert w.deadline is not None
        heapq.heappush(self._deadlines, (w.deadline, w.seq, w.id))

    def _compact(self) -> None:
        """Rebuild a heap whose stale entries outnumber its live ones (plus some slack).

        A rebuild costs the live entries and at least halves the heap, so it is paid for by
        the pushes and removals since the last one: O(1) amortized per event."""
        if len(self._load) > 2 * len(self._ready) + _SLACK:
            self._rebuild_load()
        if len(self._deadlines) > 2 * len(self.waiters) + _SLACK:
            self._rebuild_deadlines()

    def _live(self, entry: tuple[float, int, int]) -> bool:
        """Whether a deadline-heap entry is its waiter's current deadline."""
        w = self.waiters.get(entry[2])
        return w is not None and w.seq == entry[1] and w.deadline == entry[0]

    def _rebuild_load(self) -> None:
        mc = self.max_concurrency
        self._load = [(r.in_flight, r.id) for r in self._ready.values() if r.in_flight < mc]
        heapq.heapify(self._load)

    def _rebuild_deadlines(self) -> None:
        self._deadlines = [
            (w.deadline, w.seq, w.id) for w in self.waiters.values() if w.deadline is not None
        ]
        heapq.heapify(self._deadlines)

    def _reindex(self) -> None:
        """Build every index from ``runners`` and ``waiters`` (at construction)."""
        self._ready = {}
        self._booting = self._retiring = self._calls = self._free = 0
        for r in self.runners.values():
            self._enter(r)
            self._calls += r.in_flight
        self._rebuild_load()
        for w in self.waiters.values():
            self._seq += 1
            w.seq = self._seq
        self._rebuild_deadlines()

    def _audit(self) -> None:
        """Check every index against a recount from ``runners`` and ``waiters`` (O(n), for
        tests): raises AssertionError on the first disagreement."""
        mc = self.max_concurrency
        by_state = {s: [r for r in self.runners.values() if r.state is s] for s in RState}
        ready = by_state[RState.READY]
        assert list(self.runners) == sorted(self.runners), "runners out of id order"
        assert [r.id for r in ready] == sorted(self._ready), "ready index"
        assert all(self._ready[r.id] is r for r in ready), "ready index holds other views"
        assert self._booting == len(by_state[RState.BOOTING]), "booting count"
        assert self._retiring == len(by_state[RState.RETIRING]), "retiring count"
        assert self._calls == sum(r.in_flight for r in self.runners.values()), "in-flight count"
        assert self._free == sum(mc - r.in_flight for r in ready), "free-slot count"
        assert all(0 <= r.in_flight <= mc for r in self.runners.values()), "load out of range"
        live_load = {
            e for e in self._load if e[1] in self._ready and self._ready[e[1]].in_flight == e[0]
        }
        want_load = {(r.in_flight, r.id) for r in ready if r.in_flight < mc}
        assert live_load == want_load, "load heap misses a candidate runner"
        assert len(self._load) <= 2 * len(self._ready) + _SLACK, "load heap not compacted"
        assert _is_heap(self._load), "load heap order"
        seqs = [w.seq for w in self.waiters.values()]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "waiters out of FIFO order"
        assert all(self.waiters[w].id == w for w in self.waiters), "waiter keyed by another id"
        live_dl = {e for e in self._deadlines if self._live(e)}
        want_dl = {
            (w.deadline, w.seq, w.id) for w in self.waiters.values() if w.deadline is not None
        }
        assert live_dl == want_dl, "deadline heap misses a waiter"
        assert len(self._deadlines) <= 2 * len(self.waiters) + _SLACK, "deadline heap not compacted"
        assert _is_heap(self._deadlines), "deadline heap order"


def _is_heap(h: Sequence[tuple[float, ...]]) -> bool:
    return all(h[(i - 1) // 2] <= h[i] for i in range(1, len(h)))
