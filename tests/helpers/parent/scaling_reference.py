"""The slow reference model of the pool's decision core: ``flame._scaling.Scaler`` as it was
before issue 17 (commit f578713), kept here verbatim so that the fast core can be compared
with it on random histories (tests/test_scaling.py) and measured against it (bench/scale.py).

It re-settles the whole pool on every event: it scans every waiter for passed deadlines and
for the earliest one, scans every runner for the least busy, and sums over runners for the
boot demand. That makes it easy to read and check, and O(waiters + runners) per event. Do
not "fix" it: it is the baseline. It shares only the action and state types with the core.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from flame._scaling import (
    Action,
    Assign,
    Boot,
    Fail,
    FailKind,
    Hook,
    Keep,
    Retire,
    RState,
    Wake,
)


@dataclass
class _RunnerView:
    id: int
    state: RState = RState.BOOTING
    in_flight: int = 0
    idle_since: float = 0.0
    grew: bool = False


@dataclass
class _WaiterView:
    id: int
    deadline: float | None


@dataclass
class ReferenceScaler:
    min: int
    max: int
    max_concurrency: int
    single_use: bool = False
    idle_shutdown_after: float | None = 30.0
    min_idle_shutdown_after: float | None = None
    boot_ahead: int = 0
    retry_debounce: float = 1.0

    runners: dict[int, _RunnerView] = field(default_factory=dict)
    waiters: OrderedDict[int, _WaiterView] = field(default_factory=OrderedDict)
    stopping: bool = False
    boot_blocked_until: float = -math.inf
    #: a min runner idled down (min_idle_shutdown_after): min is not restored until work comes
    min_released: bool = False
    _next_runner: int = 0
    _settled_at: float = -math.inf  # when _settle last ran (see _quiet)

    # -- queries ----------------------------------------------------------------------------
    def count(self, *states: RState) -> int:
        if not states:
            return len(self.runners)
        return sum(1 for r in self.runners.values() if r.state in states)

    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.runners.values())

    def _least_busy(self) -> _RunnerView | None:
        """The ready runner with a free slot and the fewest calls (the first such), if any."""
        best: _RunnerView | None = None
        for r in self.runners.values():
            if r.state is RState.READY and r.in_flight < self.max_concurrency:
                if best is None or r.in_flight < best.in_flight:
                    best = r
        return best

    # -- events -------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        return self._settle(now)

    def request(self, waiter: int, deadline: float | None, now: float) -> list[Action]:
        """A caller wants a slot."""
        if self.stopping:
            return [Fail(waiter, FailKind.CLOSED)]
        self.min_released = False
        self.waiters[waiter] = _WaiterView(waiter, deadline)
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
        best.in_flight += 1
        return best.id

    def withdraw(self, waiter: int, now: float) -> list[Action]:
        """A waiting caller gave up (cancelled, or its own deadline timer fired)."""
        self.waiters.pop(waiter, None)
        return self._settle(now)

    def release(self, runner: int, now: float) -> list[Action]:
        """A call (or a placed child) on ``runner`` ended and gave its slot back."""
        r = self.runners.get(runner)
        if r is None:
            return self._settle(now)
        r.in_flight = max(0, r.in_flight - 1)
        if r.in_flight == 0:
            r.idle_since = now
        actions: list[Action] = []
        if self.single_use and r.state is RState.READY:
            r.state = RState.RETIRING
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
            r.state = RState.READY
            r.idle_since = now
            if self.stopping:
                r.state = RState.RETIRING
                actions.append(Retire(runner))
        if r.grew:  # also when it was retired while booting (stop) and came up anyway
            r.grew = False
            actions.append(Hook("on_grow_end", self.count(), "ok"))
        return actions + self._settle(now)

    def boot_failed(self, runner: int, error: BaseException, now: float) -> list[Action]:
        r = self.runners.pop(runner, None)
        actions: list[Action] = []
        if r is not None and r.grew:
            actions.append(Hook("on_grow_end", self.count(), error))
        self.boot_blocked_until = now + self.retry_debounce
        if self.count(RState.READY) == 0:
            covered = self.count(RState.BOOTING) * self.max_concurrency
            live = list(self.waiters)
            for wid in live[covered:]:
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
        if self.runners.pop(runner, None) is not None:
            actions.append(Hook("on_shrink", self.count()))
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
        live = self.count(RState.READY, RState.BOOTING)
        beyond = live > self.min
        limit = self.idle_shutdown_after if beyond else self.min_idle_shutdown_after
        if limit is None:
            return [Keep(runner, -1.0)]
        idle_for = now - r.idle_since
        if idle_for >= limit - min(0.5, limit * 0.25):
            r.state = RState.RETIRING
            if not beyond:
                self.min_released = True  # an idle pool may go below min, until work comes
            return [Retire(runner)]
        return [Keep(runner, limit - idle_for)]

    def retire(self, runner: int, now: float) -> list[Action]:
        """The shell wants this runner gone (it lost it, or a call on it got stuck)."""
        r = self.runners.get(runner)
        if r is None or r.state is RState.RETIRING:
            return self._settle(now)
        r.state = RState.RETIRING
        return [Retire(runner), *self._settle(now)]

    def tick(self, now: float) -> list[Action]:
        return self._settle(now)

    def stop(self, now: float) -> list[Action]:
        self.stopping = True
        actions: list[Action] = [Fail(w, FailKind.CLOSED) for w in self.waiters]
        self.waiters.clear()
        for r in self.runners.values():
            if r.state is not RState.RETIRING:
                r.state = RState.RETIRING
                actions.append(Retire(r.id))
        return actions

    # -- the common part of every event ---------------------------------------------------------
    def _settle(self, now: float) -> list[Action]:
        self._settled_at = now
        actions: list[Action] = []
        # 1. callers whose deadline passed are skipped (failed with a timeout)
        for wid, w in list(self.waiters.items()):
            if w.deadline is not None and w.deadline <= now:
                del self.waiters[wid]
                actions.append(Fail(wid, FailKind.TIMEOUT))
        # 2. hand out free slots, first in first out, least busy runner first
        while self.waiters:
            best = self._least_busy()
            if best is None:
                break
            wid, _ = self.waiters.popitem(last=False)
            best.in_flight += 1
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
            grew = self.count(RState.READY, RState.BOOTING) >= self.min
            self.runners[rid] = _RunnerView(rid, grew=grew)
            actions.append(Boot(rid))
            if grew:
                actions.append(Hook("on_grow_start", self.count()))
        # 4. the earliest deadline among waiters, so the shell can skip them on time
        deadlines = [w.deadline for w in self.waiters.values() if w.deadline is not None]
        if deadlines:
            actions.append(Wake(min(deadlines)))
        return actions

    def _boots_wanted(self) -> int:
        room = self.max - self.count()
        if room <= 0:
            return 0
        mc = self.max_concurrency
        booting = self.count(RState.BOOTING)
        below_min = max(0, self.min - self.count(RState.READY) - booting)
        if self.min_released:
            below_min = 0
        # the slots left once the booting runners are up and every waiter took one
        free = booting * mc - len(self.waiters)
        free += sum(mc - r.in_flight for r in self.runners.values() if r.state is RState.READY)
        busy = self.waiters or any(r.in_flight for r in self.runners.values())
        reserve = self.boot_ahead if busy else 0
        for_demand = max(0, math.ceil((reserve - free) / mc))
        return min(room, max(below_min, for_demand))
