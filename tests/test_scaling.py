"""Unit and property tests of the pool's pure decision core, ``flame._scaling.Scaler``.

``Sim`` plays the async shell of ``flame._pool``: it feeds the core events with a simulated
clock, carries out the actions it gets back on its own *model* of the pool (runner states,
calls in flight, the FIFO queue of waiters), and checks every SPEC "Pool rules" invariant on
each action and after each event. The example tests below drive it by hand; the hypothesis
state machine and the seeded soak drive it with random event sequences.

Every event a ``Sim`` sends also goes to the slow reference model
(``helpers.parent.scaling_reference``: the core as it was before it was indexed, issue 17), and the
two must answer with the same actions, in the same order, and end in the same state; the
core's indexes are audited against a recount after each event. The last part of this file
does the same on larger pools (dozens of runners, hundreds of waiters), where the indexes
have more to get wrong.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

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
    Scaler,
    Wake,
)
from helpers.parent.scaling_reference import ReferenceScaler

DEBOUNCE = 1.0
B, R, X = RState.BOOTING, RState.READY, RState.RETIRING


class BootBoom(Exception):
    """The error a simulated boot fails with."""


def canon(actions: list[Action]) -> list[Any]:
    """Actions, with each exception replaced by its type and message (so that two cores'
    ``RuntimeError("runner went away while booting")`` compare equal)."""

    def plain(v: object) -> object:
        return (type(v), str(v)) if isinstance(v, BaseException) else v

    out: list[Any] = []
    for a in actions:
        if isinstance(a, Fail):
            out.append((Fail, a.waiter, a.kind, plain(a.cause)))
        elif isinstance(a, Hook):
            out.append((Hook, a.name, a.count, plain(a.result)))
        else:
            out.append(a)
    return out


def state_of(core: Scaler | ReferenceScaler) -> tuple[Any, ...]:
    """What a core knows, as plain values: comparable between the core and the reference."""
    runners = [(r.id, r.state, r.in_flight, r.idle_since, r.grew) for r in core.runners.values()]
    waiters = [(w.id, w.deadline) for w in core.waiters.values()]
    return (
        runners,
        waiters,
        core.stopping,
        core.boot_blocked_until,
        core.min_released,
        core._next_runner,
        core._settled_at,
    )


def same_event(core: Scaler, ref: ReferenceScaler, method: str, *args: Any) -> Any:
    """Send one event to the core and to the reference; both must answer alike and agree on
    the state after it (and the core's indexes on a recount). Returns the core's answer."""
    got = getattr(core, method)(*args)
    want = getattr(ref, method)(*args)
    if method == "take":
        assert got == want, (method, args, got, want)
    else:
        assert canon(got) == canon(want), (method, args, got, want)
    assert state_of(core) == state_of(ref), (method, args)
    assert (core.count(), core.count(R), core.count(B), core.count(X), core.in_flight()) == (
        ref.count(),
        ref.count(R),
        ref.count(B),
        ref.count(X),
        ref.in_flight(),
    )
    core._audit()
    return got


class Sim:
    """A model shell around a ``Scaler``: mirrors what the core decided, checks the rules."""

    def __init__(self, **cfg: Any) -> None:
        self.s = Scaler(**cfg)
        self.ref = ReferenceScaler(**cfg)
        self.min: int = self.s.min
        self.min_released = False  # a min runner idled down: min waits for the next caller
        self.max: int = self.s.max
        self.mc: int = self.s.max_concurrency
        self.k: int = self.s.boot_ahead
        self.now = 0.0
        self.queue: list[int] = []  # live waiters, arrival order
        self.deadline: dict[int, float | None] = {}
        self.outcome: dict[int, Action] = {}  # waiter -> its one Assign or Fail
        self.state: dict[int, RState] = {}
        self.inflight: dict[int, int] = {}
        self.idle_since: dict[int, float] = {}
        self.was_ready: set[int] = set()
        self.grew: set[int] = set()  # on_grow_start sent, on_grow_end not yet
        self.served: set[int] = set()  # single use: released at least once
        self.ever_booted: set[int] = set()
        self.blocked_until = -math.inf
        self.stopped = False
        self.next_waiter = 0
        self.history: list[tuple[str, object, list[Action]]] = []
        self.boots = 0
        self.max_seen = 0
        self.run("start", None, lambda: self.ev("start", self.now))

    # -- views of the model -------------------------------------------------------------------
    def ids(self, *states: RState) -> list[int]:
        return [r for r, st_ in self.state.items() if st_ in states]

    def n(self, *states: RState) -> int:
        return len(self.ids(*states))

    def live(self) -> int:
        return self.n(R, B)

    def needs(self, less_booting: int = 0) -> list[str]:
        """What the pool, as modelled, still lacks (the reasons a boot is due)."""
        booting = self.n(B) - less_booting
        ready = self.n(R)
        out = []
        if ready + booting < self.min and not self.min_released:
            out.append("min")
        if len(self.queue) > booting * self.mc:
            out.append("waiters")
        busy = bool(self.queue) or any(self.inflight.values())
        if self.k > 0 and busy:
            free = sum(self.mc - self.inflight[r] for r in self.ids(R))
            free += booting * self.mc - len(self.queue)
            if free < self.k:
                out.append("ahead")
        return out

    # -- events ---------------------------------------------------------------------------------
    def ev(self, method: str, *args: Any) -> list[Action]:
        """One event, to the core and to the reference model (which must agree)."""
        acts: list[Action] = same_event(self.s, self.ref, method, *args)
        return acts

    def advance(self, dt: float) -> None:
        self.now += dt

    def request(self, deadline_in: float | None = None) -> list[Action]:
        w = self.next_waiter
        self.next_waiter += 1
        dl = None if deadline_in is None else self.now + deadline_in
        self.deadline[w] = dl
        if self.stopped:
            acts = self.ev("request", w, dl, self.now)
            assert acts == [Fail(w, FailKind.CLOSED)]
            self.outcome[w] = acts[0]
            self.history.append(("request", w, acts))
            return acts
        self.min_released = False
        self.queue.append(w)
        return self.run("request", w, lambda: self.ev("request", w, dl, self.now))

    def withdraw(self, w: int) -> list[Action]:
        if w in self.queue:
            self.queue.remove(w)
            self.outcome[w] = Fail(w, FailKind.TIMEOUT)  # the caller gave up on its own
        return self.run("withdraw", w, lambda: self.ev("withdraw", w, self.now))

    def release(self, r: int) -> list[Action]:
        assert self.inflight[r] > 0, "the shell only releases slots it was given"
        self.inflight[r] -= 1
        if self.inflight[r] == 0:
            self.idle_since[r] = self.now
        self.served.add(r)
        return self.run("release", r, lambda: self.ev("release", r, self.now))

    def runner_up(self, r: int) -> list[Action]:
        # a runner retired while booting (stop) may still come up: the shell's race
        assert r not in self.was_ready and self.state[r] in (B, X)
        if self.state[r] is B:
            self.state[r] = R  # when stopping, the core retires it at once (checked in run)
            self.idle_since[r] = self.now
        self.was_ready.add(r)
        return self.run("runner_up", r, lambda: self.ev("runner_up", r, self.now))

    def boot_failed(self, r: int, error: BaseException | None = None) -> list[Action]:
        assert r not in self.was_ready and self.state[r] in (B, X)
        err = error if error is not None else BootBoom(f"runner {r} failed to boot")
        self._forget(r)
        self.blocked_until = self.now + DEBOUNCE
        return self.run("boot_failed", r, lambda: self.ev("boot_failed", r, err, self.now), err)

    def runner_gone(self, r: int) -> list[Action]:
        booting = self.state[r] is B
        self._forget(r)
        if booting:  # the core treats it as a failed boot
            self.blocked_until = self.now + DEBOUNCE
            return self.run("boot_failed", r, lambda: self.ev("runner_gone", r, self.now), None)
        return self.run("runner_gone", r, lambda: self.ev("runner_gone", r, self.now))

    def idle_request(self, r: int) -> list[Action]:
        expected: Action | None = None
        if self.state.get(r) is R:
            if self.inflight[r]:
                expected = Keep(r, -1.0)
            else:
                beyond = self.live() > self.min
                limit = self.s.idle_shutdown_after if beyond else self.s.min_idle_shutdown_after
                idle_for = self.now - self.idle_since[r]
                if limit is None:
                    expected = Keep(r, -1.0)
                elif idle_for >= limit - min(0.5, limit * 0.25):
                    expected = Retire(r)
                    if not beyond:
                        self.min_released = True
                else:
                    expected = Keep(r, limit - idle_for)
        acts = self.run("idle_request", r, lambda: self.ev("idle_request", r, self.now))
        mine = [a for a in acts if isinstance(a, Keep | Retire) and a.runner == r]
        if expected is None:
            assert mine == []
        else:
            assert mine == [expected], (mine, expected)
            if isinstance(expected, Keep) and expected.retry_after != -1:
                assert expected.retry_after > 0
        return acts

    def retire(self, r: int) -> list[Action]:
        return self.run("retire", r, lambda: self.ev("retire", r, self.now))

    def tick(self, dt: float = 0.0) -> list[Action]:
        self.now += dt
        return self.run("tick", None, lambda: self.ev("tick", self.now))

    def stop(self) -> list[Action]:
        self.stopped = True
        return self.run("stop", None, lambda: self.ev("stop", self.now))

    def _forget(self, r: int) -> None:
        del self.state[r]
        self.inflight.pop(r, None)  # its calls are lost (RunnerLost, in the shell)

    # -- carrying out and checking one event's actions --------------------------------------------
    def run(
        self, kind: str, subject: Any, call: Any, error: BaseException | None = None
    ) -> list[Action]:
        waiting, covered, ready = len(self.queue), self.n(B) * self.mc, self.n(R)
        acts: list[Action] = call()
        self.history.append((kind, subject, acts))
        grow_end = shrink = 0
        boot_fails: list[int] = []
        for i, a in enumerate(acts):
            if isinstance(a, Assign):
                assert not self.stopped
                assert self.queue and a.waiter == self.queue[0], f"not FIFO: {a} {self.queue}"
                dl = self.deadline[a.waiter]
                assert dl is None or dl > self.now, f"{a} after the deadline {dl}"
                assert self.state.get(a.runner) is R, a
                assert self.inflight[a.runner] < self.mc
                least = min(self.inflight[r] for r in self.ids(R))
                assert self.inflight[a.runner] == least, f"{a} is not the least busy runner"
                if self.s.single_use:
                    assert a.runner not in self.served, "single-use runner reused"
                self.queue.pop(0)
                self.inflight[a.runner] += 1
                assert a.waiter not in self.outcome
                self.outcome[a.waiter] = a
            elif isinstance(a, Fail):
                assert a.waiter in self.queue and a.waiter not in self.outcome, a
                if a.kind is FailKind.TIMEOUT:
                    dl = self.deadline[a.waiter]
                    assert dl is not None and dl <= self.now, a
                elif a.kind is FailKind.CLOSED:
                    assert kind == "stop"
                else:
                    assert kind == "boot_failed", a
                    assert self.n(R) == 0, "BOOT failure while a ready runner can serve"
                    if error is not None:
                        assert a.cause is error
                    else:
                        assert isinstance(a.cause, RuntimeError)
                    boot_fails.append(a.waiter)
                self.queue.remove(a.waiter)
                self.outcome[a.waiter] = a
            elif isinstance(a, Boot):
                assert not self.stopped, "boot while stopping"
                assert self.now >= self.blocked_until, "boot inside the retry debounce"
                assert a.runner not in self.ever_booted
                assert len(self.state) < self.max, "boot past max"
                beyond_min = self.live() >= self.min
                self.ever_booted.add(a.runner)
                self.state[a.runner] = B
                self.inflight[a.runner] = 0
                self.boots += 1
                nxt = acts[i + 1] if i + 1 < len(acts) else None
                if beyond_min:
                    assert nxt == Hook("on_grow_start", len(self.state)), (a, nxt)
                    self.grew.add(a.runner)
                else:
                    assert not (isinstance(nxt, Hook) and nxt.name == "on_grow_start"), (
                        "on_grow_start for a boot up to min"
                    )
            elif isinstance(a, Retire):
                st_ = self.state.get(a.runner)
                assert st_ in (R, B), a
                if kind == "release":
                    assert self.s.single_use and a.runner == subject and st_ is R
                elif kind == "idle_request":
                    assert a.runner == subject and st_ is R and self.inflight[a.runner] == 0
                elif kind in ("retire", "runner_up"):
                    assert a.runner == subject
                    assert kind == "retire" or self.stopped
                else:
                    assert kind == "stop", (kind, a)
                self.state[a.runner] = X
            elif isinstance(a, Keep):
                assert kind == "idle_request" and a.runner == subject
            elif isinstance(a, Hook):
                if a.name == "on_grow_start":
                    prev = acts[i - 1] if i else None
                    assert isinstance(prev, Boot) and prev.runner in self.grew
                elif a.name == "on_grow_end":
                    assert subject in self.grew, f"on_grow_end for a min boot: {a}"
                    if kind == "runner_up":
                        assert a.result == "ok"
                    else:
                        assert kind == "boot_failed"
                        if error is not None:
                            assert a.result is error
                        else:
                            assert isinstance(a.result, RuntimeError)
                    assert a.count == len(self.state), a
                    grow_end += 1
                else:
                    assert a.name == "on_shrink", a
                    assert kind == "runner_gone" and subject in self.was_ready
                    assert a.count == len(self.state), a
                    shrink += 1
            else:
                assert isinstance(a, Wake), a
                assert a.at > self.now, a
        # hooks: exactly once per event that calls for them
        if kind in ("runner_up", "boot_failed") and subject in self.grew:
            assert grow_end == 1, acts
            self.grew.discard(subject)
        else:
            assert grow_end == 0, acts
        assert shrink == (1 if kind == "runner_gone" else 0), acts
        if kind == "boot_failed" and ready == 0:
            # exactly the waiters the booting runners left cannot cover fail, the newest ones
            assert len(boot_fails) == max(0, waiting - covered), acts
            assert len(self.queue) <= covered
            assert all(w < f for w in self.queue for f in boot_fails)
        else:
            assert boot_fails == []
        self.check(kind, acts)
        return acts

    # -- invariants after every event ---------------------------------------------------------
    def check(self, kind: str, acts: list[Action]) -> None:
        s = self.s
        # the model and the core agree on everything
        assert {r: v.state for r, v in s.runners.items()} == self.state
        assert {r: v.in_flight for r, v in s.runners.items()} == self.inflight
        assert list(s.waiters) == self.queue
        assert s.boot_blocked_until == self.blocked_until
        # never past max (booting and retiring ones counted), never past max_concurrency
        assert len(self.state) <= self.max
        self.max_seen = max(self.max_seen, len(self.state))
        assert all(v <= self.mc for v in self.inflight.values())
        if self.s.single_use:
            assert all(self.state[r] is X for r in self.served if r in self.state)
        if self.stopped:
            assert not self.queue and self.n(R, B) == 0
            assert not any(isinstance(a, Boot) for a in acts)
            return
        # no live waiter is past its deadline once an event has seen that time
        for w in self.queue:
            dl = self.deadline[w]
            assert dl is None or dl > self.now, f"waiter {w} outlived its deadline"
        # no waiter waits while a ready runner has a free slot
        if self.queue:
            assert all(self.inflight[r] >= self.mc for r in self.ids(R))
        # the shell is told when to come back for the earliest deadline
        deadlines = [d for w in self.queue if (d := self.deadline[w]) is not None]
        if deadlines:
            assert Wake(min(deadlines)) in acts, ("no Wake for a deadline", acts)
        # enough boots: min kept, waiters covered, boot_ahead reserve kept ...
        wants = self.needs()
        if wants and len(self.state) < self.max:
            assert self.now < self.blocked_until, f"boot due ({wants}) but none issued"
            assert Wake(self.blocked_until) in acts, ("no Wake for the debounce", acts)
        # ... and no more than that
        if any(isinstance(a, Boot) for a in acts):
            assert self.needs(less_booting=1), f"needless boot: {acts}"

    # -- liveness: let every boot finish and every call end --------------------------------------
    def drain(self) -> None:
        for _ in range(500):
            short = not self.stopped and self.live() < self.min and not self.min_released
            if not self.queue and not self.ids(B) and not short:
                break
            for r in self.ids(B):
                self.runner_up(r)
            for r in [r for r in self.ids(X) if r not in self.was_ready]:
                self.boot_failed(r)
            for r, n in list(self.inflight.items()):
                for _ in range(n):
                    if r in self.inflight:
                        self.release(r)
            for r in self.ids(X):
                if self.inflight.get(r) == 0:
                    self.runner_gone(r)
            self.tick(2 * DEBOUNCE)
        assert not self.queue, "waiters left after every boot and call finished"
        assert all(w in self.outcome for w in range(self.next_waiter))
        if not self.stopped and not self.min_released:
            assert self.live() >= self.min


def of(acts: list[Action], kind: type) -> list[Any]:
    return [a for a in acts if isinstance(a, kind)]


# == example-based tests, one rule at a time =================================================


def test_idle_pool_with_min_zero_boots_nothing() -> None:
    sim = Sim(min=0, max=3, max_concurrency=2, boot_ahead=2)
    assert sim.history[0][2] == []
    assert sim.tick(100) == []
    assert sim.state == {}


def test_start_boots_min_without_grow_hooks() -> None:
    sim = Sim(min=2, max=4, max_concurrency=1)
    assert sim.history[0][2] == [Boot(0), Boot(1)]
    assert sim.runner_up(0) == []
    assert sim.runner_up(1) == []


def test_thirty_waiters_on_three_runners_of_two() -> None:
    sim = Sim(min=0, max=3, max_concurrency=2)
    for _ in range(30):
        sim.request()
    assert sim.boots == 3 and sim.ids(B) == [0, 1, 2]
    assigned = []
    for r in (0, 1, 2):
        assigned += of(sim.runner_up(r), Assign)
    assert assigned == [Assign(w, w // 2) for w in range(6)]
    assert len(sim.queue) == 24
    # slots free in some order: the next waiter in line takes each one
    rng = random.Random(1)
    order = []
    while any(sim.inflight.values()):
        r = rng.choice([r for r, n in sim.inflight.items() if n])
        order += [a.waiter for a in of(sim.release(r), Assign)]
    assert order == list(range(6, 30))
    assert sim.boots == 3 and sim.max_seen == 3
    assert all(isinstance(sim.outcome[w], Assign) for w in range(30))


def test_booting_runners_cover_waiters() -> None:
    sim = Sim(min=0, max=5, max_concurrency=3)
    assert of(sim.request(), Boot) == [Boot(0)]
    assert of(sim.request(), Boot) == []
    assert of(sim.request(), Boot) == []
    assert of(sim.request(), Boot) == [Boot(1)]  # 4 waiters > 1 booting * 3
    sim.withdraw(0)
    sim.withdraw(1)
    assert of(sim.request(), Boot) == []  # 3 waiters, 2 booting
    acts = sim.runner_up(1)
    assert of(acts, Assign) == [Assign(2, 1), Assign(3, 1), Assign(4, 1)]


def test_least_busy_runner_is_chosen() -> None:
    sim = Sim(min=3, max=3, max_concurrency=3)
    for r in range(3):
        sim.runner_up(r)
    got = [of(sim.request(), Assign)[0].runner for _ in range(4)]
    assert got == [0, 1, 2, 0]  # ties go to the first runner
    sim.release(1)  # loads: 0 -> 2, 1 -> 0, 2 -> 1
    assert of(sim.request(), Assign) == [Assign(4, 1)]
    assert of(sim.request(), Assign) == [Assign(5, 1)]
    assert of(sim.request(), Assign) == [Assign(6, 2)]


def test_full_pool_queues_then_release_serves_first_in_line() -> None:
    sim = Sim(min=1, max=1, max_concurrency=1)
    sim.runner_up(0)
    assert of(sim.request(), Assign) == [Assign(0, 0)]
    sim.request()
    sim.request()
    assert sim.queue == [1, 2]
    assert of(sim.release(0), Assign) == [Assign(1, 0)]
    assert of(sim.release(0), Assign) == [Assign(2, 0)]


def test_deadline_fails_waiter_and_wake_is_asked_for() -> None:
    sim = Sim(min=1, max=1, max_concurrency=1)
    sim.runner_up(0)
    sim.request()
    acts = sim.request(deadline_in=5.0)
    assert Wake(5.0) in acts
    assert sim.tick(4.9) == [Wake(5.0)]
    assert sim.tick(0.1) == [Fail(1, FailKind.TIMEOUT)]
    assert sim.queue == []


def test_expired_and_withdrawn_waiters_are_skipped_by_a_new_runner() -> None:
    sim = Sim(min=0, max=1, max_concurrency=3)
    sim.request(deadline_in=1.0)
    sim.request()
    sim.request()
    sim.request()
    sim.withdraw(2)
    sim.advance(1.0)
    acts = sim.runner_up(0)
    assert of(acts, Fail) == [Fail(0, FailKind.TIMEOUT)]
    assert of(acts, Assign) == [Assign(1, 0), Assign(3, 0)]


def test_boot_failure_fails_the_waiters_booting_runners_cannot_cover() -> None:
    sim = Sim(min=0, max=3, max_concurrency=2)
    for _ in range(5):
        sim.request()
    assert sim.ids(B) == [0, 1, 2]
    err = BootBoom("no capacity")
    acts = sim.boot_failed(0, err)
    assert acts[0] == Hook("on_grow_end", 2, err)
    # two booting runners cover 4 waiters: the newest one fails at once
    assert of(acts, Fail) == [Fail(4, FailKind.BOOT, err)]
    assert sim.queue == [0, 1, 2, 3]
    acts = sim.boot_failed(1, err)
    assert of(acts, Fail) == [Fail(2, FailKind.BOOT, err), Fail(3, FailKind.BOOT, err)]
    acts = sim.boot_failed(2, err)
    assert of(acts, Fail) == [Fail(0, FailKind.BOOT, err), Fail(1, FailKind.BOOT, err)]
    assert sim.state == {} and sim.queue == []


def test_boot_failure_with_a_ready_runner_keeps_waiters_and_retries_after_debounce() -> None:
    sim = Sim(min=1, max=2, max_concurrency=1)
    sim.runner_up(0)
    sim.request()
    sim.request()  # waits, boots runner 1
    assert sim.ids(B) == [1]
    sim.advance(3.0)
    acts = sim.boot_failed(1)
    assert of(acts, Fail) == []
    assert Wake(4.0) in acts and of(acts, Boot) == []
    assert of(sim.tick(0.5), Boot) == []  # still inside the debounce
    assert of(sim.request(), Boot) == []
    acts = sim.tick(0.5)
    assert of(acts, Boot) == [Boot(2)]


def test_min_boot_failure_is_retried_after_debounce() -> None:
    sim = Sim(min=1, max=1, max_concurrency=1)
    acts = sim.boot_failed(0)
    assert acts == [Wake(1.0)]  # no hook: min boots are not "growth"
    assert sim.tick(0.5) == [Wake(1.0)]
    assert sim.tick(0.5) == [Boot(1)]


def test_deadline_wake_is_kept_while_boots_are_blocked() -> None:
    sim = Sim(min=0, max=2, max_concurrency=1)
    sim.request()
    sim.request(deadline_in=0.5)  # covered by its own boot
    sim.boot_failed(1)  # waiter 1 was the newest, waiter 0 keeps runner 0 ...
    acts = sim.request(deadline_in=0.3)
    # ... a new waiter is not covered, boots are blocked for 1 s, yet its deadline comes first
    assert Wake(0.3) in acts and Wake(1.0) in acts


def test_every_event_fails_expired_waiters() -> None:
    sim = Sim(min=1, max=1, max_concurrency=1, idle_shutdown_after=None)
    sim.runner_up(0)
    sim.request()
    sim.request(deadline_in=2.0)
    sim.advance(2.0)
    acts = sim.idle_request(0)  # a runner asking to idle (busy: kept) still settles the pool
    assert acts == [Keep(0, -1.0), Fail(1, FailKind.TIMEOUT)]
    sim.request(deadline_in=1.0)
    sim.advance(1.0)
    assert sim.retire(7) == [Fail(2, FailKind.TIMEOUT)]  # unknown runner: a no-op, but settles


def test_runner_retired_while_booting_still_reports_its_grow_end() -> None:
    sim = Sim(min=0, max=2, max_concurrency=1)
    assert sim.request() == [Boot(0), Hook("on_grow_start", 1)]
    sim.stop()
    # the boot finished before the shell could cancel it: the growth still ends "ok"
    assert sim.runner_up(0) == [Hook("on_grow_end", 1, "ok")]
    assert sim.runner_gone(0) == [Hook("on_shrink", 0)]


def test_hooks_report_growth_beyond_min_and_shrink() -> None:
    sim = Sim(min=1, max=3, max_concurrency=1)
    sim.runner_up(0)
    sim.request()
    acts = sim.request()
    assert acts == [Boot(1), Hook("on_grow_start", 2)]
    assert sim.runner_up(1)[0] == Hook("on_grow_end", 2, "ok")
    acts = sim.runner_gone(0)
    assert acts[0] == Hook("on_shrink", 1)
    # below min? no: runner 1 is up, so no replacement
    assert of(acts, Boot) == []


def test_dead_runner_is_replaced_while_below_min() -> None:
    sim = Sim(min=2, max=3, max_concurrency=1)
    sim.runner_up(0)
    sim.runner_up(1)
    acts = sim.runner_gone(0)
    assert acts == [Hook("on_shrink", 1), Boot(2)]


def test_single_use_runner_retires_after_its_call_and_min_is_kept() -> None:
    sim = Sim(min=1, max=2, max_concurrency=1, single_use=True)
    sim.runner_up(0)
    assert of(sim.request(), Assign) == [Assign(0, 0)]
    acts = sim.release(0)
    assert acts == [Retire(0), Boot(1)]  # a replacement for min, not growth: no hook
    sim.runner_up(1)
    assert of(sim.request(), Assign) == [Assign(1, 1)]


def test_single_use_at_max_waits_for_the_retired_runner_to_go() -> None:
    sim = Sim(min=1, max=1, max_concurrency=1, single_use=True)
    sim.runner_up(0)
    sim.request()
    sim.request()
    assert sim.release(0) == [Retire(0)]  # max=1: the retiring runner still counts
    acts = sim.runner_gone(0)
    assert acts == [Hook("on_shrink", 0), Boot(1)]
    assert of(sim.runner_up(1), Assign) == [Assign(1, 1)]


def test_idle_runner_beyond_min_retires_after_idle_shutdown_after() -> None:
    sim = Sim(min=1, max=2, max_concurrency=1, idle_shutdown_after=10.0)
    sim.runner_up(0)
    sim.request()
    sim.request()
    sim.runner_up(1)
    sim.release(1)
    sim.advance(5.0)
    assert sim.idle_request(1) == [Keep(1, 5.0)]
    sim.advance(5.0)
    assert sim.idle_request(1) == [Retire(1)]
    sim.release(0)
    sim.advance(100.0)
    assert sim.idle_request(0) == [Keep(0, -1.0)]  # a min runner: never by default


def test_min_runner_retires_after_min_idle_shutdown_after() -> None:
    sim = Sim(min=1, max=1, max_concurrency=1, min_idle_shutdown_after=60.0)
    sim.runner_up(0)
    sim.advance(30.0)
    assert sim.idle_request(0) == [Keep(0, 30.0)]
    sim.advance(30.0)
    assert sim.idle_request(0)[0] == Retire(0)


def test_min_runner_idled_down_is_replaced_only_when_work_comes() -> None:
    sim = Sim(min=1, max=2, max_concurrency=1, min_idle_shutdown_after=10.0)
    sim.runner_up(0)
    sim.advance(10.0)
    acts = sim.idle_request(0)
    assert acts[0] == Retire(0)
    assert not of(acts, Boot), "an idle pool must not recycle its min runner"
    sim.runner_gone(0)
    assert not of(sim.tick(100.0), Boot)
    acts = sim.request()
    assert of(acts, Boot), "the next caller brings the pool back up"


def test_never_retire_a_runner_with_calls_in_flight() -> None:
    sim = Sim(min=0, max=1, max_concurrency=2, idle_shutdown_after=0.0)
    sim.request()
    sim.runner_up(0)
    sim.advance(50.0)
    assert sim.idle_request(0) == [Keep(0, -1.0)]
    sim.release(0)
    assert sim.idle_request(0) == [Retire(0)]


def test_idle_shutdown_none_keeps_runners() -> None:
    sim = Sim(min=0, max=1, max_concurrency=1, idle_shutdown_after=None)
    sim.request()
    sim.runner_up(0)
    sim.release(0)
    sim.advance(1e6)
    assert sim.idle_request(0) == [Keep(0, -1.0)]


def test_stop_fails_waiters_retires_everyone_and_boots_nothing_after() -> None:
    sim = Sim(min=1, max=3, max_concurrency=1)
    sim.runner_up(0)
    sim.request()
    sim.request()  # boots 1
    sim.request()  # boots 2
    acts = sim.stop()
    assert of(acts, Fail) == [Fail(1, FailKind.CLOSED), Fail(2, FailKind.CLOSED)]
    assert sorted(a.runner for a in of(acts, Retire)) == [0, 1, 2]
    sim.boot_failed(1)  # the shell cancels the boots of retired runners
    sim.boot_failed(2)
    assert sim.request() == [Fail(3, FailKind.CLOSED)]
    sim.release(0)
    assert of(sim.runner_gone(0), Boot) == []
    assert of(sim.tick(10), Boot) == []


def test_retire_keeps_counting_towards_max() -> None:
    sim = Sim(min=0, max=2, max_concurrency=1)
    sim.request()
    sim.request()
    sim.runner_up(0)
    sim.runner_up(1)
    assert sim.retire(0)[0] == Retire(0)
    assert sim.retire(0) == []
    sim.request()
    assert sim.boots == 2 and len(sim.queue) == 1  # at max, with runner 0 retiring
    acts = sim.runner_gone(0)  # its call is lost; now there is room
    assert of(acts, Boot) == [Boot(2)]


def test_boot_ahead_boots_before_runners_are_full() -> None:
    sim = Sim(min=0, max=3, max_concurrency=2, boot_ahead=1)
    assert of(sim.request(), Boot) == [Boot(0)]
    # the waiter is covered, but no slot would be left over for the next caller
    sim.runner_up(0)
    assert of(sim.history[-1][2], Boot) == []  # one free slot left: enough
    acts = sim.request()
    assert of(acts, Assign) == [Assign(1, 0)]
    assert of(acts, Boot) == [Boot(1)]  # no free slot left: boot ahead
    sim.runner_up(1)
    sim.request()
    sim.request()
    assert sim.ids(B) == [2]
    sim.runner_up(2)
    sim.request()
    sim.request()
    assert sim.boots == 3 and sim.max_seen == 3  # never past max


def test_boot_ahead_reserve_comes_on_top_of_waiters() -> None:
    sim = Sim(min=0, max=10, max_concurrency=2, boot_ahead=3)
    acts = sim.request()
    # one slot for the waiter plus three in reserve: two runners of two slots
    assert of(acts, Boot) == [Boot(0), Boot(1)]


def test_boot_ahead_idle_pool_boots_nothing_after_work() -> None:
    sim = Sim(min=0, max=3, max_concurrency=1, boot_ahead=2, idle_shutdown_after=1.0)
    sim.request()
    sim.runner_up(0)
    assert sim.boots == 3  # one for the waiter, two in reserve
    sim.release(0)
    for r in sim.ids(B):
        sim.runner_up(r)
    sim.advance(5.0)
    for r in sim.ids(R):
        sim.idle_request(r)
    assert sim.n(R, B) == 0
    assert sim.tick(100.0) == []


# == random event sequences =====================================================================

DTS = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0, 1.5, 3.0, 10.0, 40.0]


def random_config(rng: random.Random) -> dict[str, Any]:
    mx = rng.randint(1, 4)
    return {
        "min": rng.randint(0, mx),
        "max": mx,
        "max_concurrency": rng.randint(1, 3),
        "single_use": rng.random() < 0.25,
        "idle_shutdown_after": rng.choice([None, 0.0, 1.0, 5.0, 30.0]),
        "min_idle_shutdown_after": rng.choice([None, None, 2.0, 20.0]),
        "boot_ahead": rng.choice([0, 0, 1, 2, 5]),
    }


def random_step(sim: Sim, rng: random.Random) -> None:
    """One event a real shell could send, picked at random."""
    choices: list[Any] = [
        lambda: sim.request(rng.choice([None, *DTS])),
        lambda: sim.tick(rng.choice(DTS)),
        lambda: sim.advance(rng.choice(DTS)),
    ]
    if sim.next_waiter:
        choices.append(lambda: sim.withdraw(rng.randrange(sim.next_waiter + 1)))
    busy = [r for r, n in sim.inflight.items() if n]
    if busy:
        choices += [lambda: sim.release(rng.choice(busy))] * 3
    if sim.ids(B):
        choices += [lambda: sim.runner_up(rng.choice(sim.ids(B)))] * 2
    failing = [r for r in sim.ids(B, X) if r not in sim.was_ready]
    if failing:
        choices.append(lambda: sim.boot_failed(rng.choice(failing)))
        choices.append(lambda: sim.runner_up(rng.choice(failing)))
    up = [r for r in sim.ids(R, X, B) if r in sim.was_ready or sim.state[r] is B]
    if up:
        choices.append(lambda: sim.runner_gone(rng.choice(up)))
    if sim.ids(R):
        choices.append(lambda: sim.idle_request(rng.choice(sim.ids(R))))
        choices.append(lambda: sim.retire(rng.choice(sim.ids(R, B))))
    if not sim.stopped and rng.random() < 0.01:
        choices = [sim.stop]
    rng.choice(choices)()


@pytest.mark.parametrize("seed", range(40))
def test_random_sequences(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(10):
        sim = Sim(**random_config(rng))
        try:
            for _ in range(150):
                random_step(sim, rng)
            sim.drain()
        except AssertionError:
            for line in sim.history[-15:]:
                print(line)
            raise


def check_take_agrees(core: Scaler, now: float) -> None:
    """``take`` (the callers' hot path) hands out exactly the slot ``request`` would, with the
    same resulting state, and changes nothing when it declines."""
    fast, slow = copy.deepcopy(core), copy.deepcopy(core)
    before = copy.deepcopy(core)
    rid = fast.take(now)
    fast._audit()
    if rid is None:
        assert fast == before, "take declined but changed the state"
        return
    acts = slow.request(10**6, None, now)
    assert acts == [Assign(10**6, rid)], (rid, acts)
    slow._settled_at = fast._settled_at  # bookkeeping of when _settle ran, not state
    assert fast == slow


@pytest.mark.parametrize("seed", range(20))
def test_take_agrees_with_request(seed: int) -> None:
    rng = random.Random(1000 + seed)
    for _ in range(5):
        sim = Sim(**random_config(rng))
        for _ in range(150):
            random_step(sim, rng)
            check_take_agrees(sim.s, sim.now)


# == the same, as a hypothesis state machine (shrinks failures to a minimal sequence) ==========


class ScalerMachine(RuleBasedStateMachine):
    sim: Sim

    @initialize(
        mx=st.integers(1, 4),
        mn=st.integers(0, 4),
        mc=st.integers(1, 3),
        single_use=st.booleans(),
        idle=st.sampled_from([None, 0.0, 1.0, 5.0, 30.0]),
        min_idle=st.sampled_from([None, 2.0, 20.0]),
        ahead=st.sampled_from([0, 1, 2, 5]),
    )
    def setup(
        self,
        mx: int,
        mn: int,
        mc: int,
        single_use: bool,
        idle: float | None,
        min_idle: float | None,
        ahead: int,
    ) -> None:
        self.sim = Sim(
            min=min(mn, mx),
            max=mx,
            max_concurrency=mc,
            single_use=single_use,
            idle_shutdown_after=idle,
            min_idle_shutdown_after=min_idle,
            boot_ahead=ahead,
        )

    @rule(dl=st.none() | st.sampled_from(DTS))
    def request(self, dl: float | None) -> None:
        self.sim.request(dl)

    @precondition(lambda self: self.sim.next_waiter > 0)
    @rule(i=st.integers(0, 100))
    def withdraw(self, i: int) -> None:
        self.sim.withdraw(i % (self.sim.next_waiter + 1))

    @precondition(lambda self: any(self.sim.inflight.values()))
    @rule(i=st.integers(0, 100))
    def release(self, i: int) -> None:
        busy = [r for r, n in self.sim.inflight.items() if n]
        self.sim.release(busy[i % len(busy)])

    @precondition(lambda self: any(r not in self.sim.was_ready for r in self.sim.ids(B, X)))
    @rule(i=st.integers(0, 100))
    def runner_up(self, i: int) -> None:
        ids = [r for r in self.sim.ids(B, X) if r not in self.sim.was_ready]
        self.sim.runner_up(ids[i % len(ids)])

    @precondition(lambda self: any(r not in self.sim.was_ready for r in self.sim.ids(B, X)))
    @rule(i=st.integers(0, 100))
    def boot_failed(self, i: int) -> None:
        ids = [r for r in self.sim.ids(B, X) if r not in self.sim.was_ready]
        self.sim.boot_failed(ids[i % len(ids)])

    @precondition(lambda self: bool(self.sim.state))
    @rule(i=st.integers(0, 100))
    def runner_gone(self, i: int) -> None:
        ids = [r for r in self.sim.state if r in self.sim.was_ready or self.sim.state[r] is B]
        if ids:
            self.sim.runner_gone(ids[i % len(ids)])

    @precondition(lambda self: bool(self.sim.ids(R)))
    @rule(i=st.integers(0, 100))
    def idle_request(self, i: int) -> None:
        ids = self.sim.ids(R)
        self.sim.idle_request(ids[i % len(ids)])

    @precondition(lambda self: bool(self.sim.ids(R, B)))
    @rule(i=st.integers(0, 100))
    def retire(self, i: int) -> None:
        ids = self.sim.ids(R, B)
        self.sim.retire(ids[i % len(ids)])

    @rule(dt=st.sampled_from(DTS))
    def tick(self, dt: float) -> None:
        self.sim.tick(dt)

    @rule(dt=st.sampled_from(DTS))
    def advance(self, dt: float) -> None:
        self.sim.advance(dt)

    @precondition(lambda self: not self.sim.stopped)
    @rule(go=st.integers(0, 9))
    def stop(self, go: int) -> None:
        if go == 0:
            self.sim.stop()

    @invariant()
    def bounded(self) -> None:
        if hasattr(self, "sim"):
            assert len(self.sim.s.runners) <= self.sim.max

    def teardown(self) -> None:
        if hasattr(self, "sim"):
            self.sim.drain()


ScalerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScalerMachine = ScalerMachine.TestCase


# == the indexed core against the reference model, on larger pools =============================
#
# ``Sim`` keeps pools small (max <= 4) so that its rule checks stay readable. The indexes
# (load heap, deadline heap, counters, their compaction) have more to get wrong with many
# runners, deep queues, bursts of callers and withdrawals from the middle of the queue; so
# here a plain driver sends the same valid events to both cores and ``same_event`` compares.

OPS = ("burst", "withdraw", "release", "release_all", "up", "fail", "gone", "idle", "retire")
OPS += ("tick", "advance", "take", "stop")


class Twin:
    """Sends one shell-valid event at a time to a ``Scaler`` and a ``ReferenceScaler``."""

    def __init__(self, **cfg: Any) -> None:
        self.core = Scaler(**cfg)
        self.ref = ReferenceScaler(**cfg)
        self.now = 0.0
        self.next_waiter = 0
        self.was_up: set[int] = set()
        self.events = 0
        self.ev("start", self.now)

    def ev(self, method: str, *args: Any) -> Any:
        self.events += 1
        return same_event(self.core, self.ref, method, *args)

    def ids(self, pick: Any) -> list[int]:
        return [r.id for r in self.core.runners.values() if pick(r)]

    def step(self, op: str, n: int) -> None:
        """Event ``op``, its choices (which runner, how many callers, what deadline) made
        from ``n``; an event that is not valid in this state becomes a tick."""
        core = self.core
        dt = DTS[n % len(DTS)]
        if op == "burst":
            for i in range(1 + n % 40):
                dl = None if (n + i) % 3 == 0 else self.now + DTS[(n + i) % len(DTS)]
                self.ev("request", self.next_waiter, dl, self.now)
                self.next_waiter += 1
            return
        if op == "withdraw" and self.next_waiter:
            live = list(core.waiters)
            w = live[n % len(live)] if live and n % 4 else n % self.next_waiter
            self.ev("withdraw", w, self.now)
            return
        if op in ("release", "release_all"):
            busy = self.ids(lambda r: r.in_flight > 0)
            if busy:
                r = busy[n % len(busy)]
                for _ in range(core.runners[r].in_flight if op == "release_all" else 1):
                    self.ev("release", r, self.now)
                return
        if op == "up":
            booting = self.ids(lambda r: r.state is B)
            if booting:
                for r in booting[: 1 + n % 4]:  # several come up in a row
                    self.was_up.add(r)
                    self.ev("runner_up", r, self.now)
                return
        if op == "fail":
            never = self.ids(lambda r: r.id not in self.was_up and r.state is not R)
            if never:
                self.ev("boot_failed", never[n % len(never)], BootBoom("no"), self.now)
                return
        if op == "gone":
            gone = self.ids(lambda r: r.id in self.was_up or r.state is B)
            if gone:
                self.ev("runner_gone", gone[n % len(gone)], self.now)
                return
        if op in ("idle", "retire"):
            ready = self.ids(lambda r: r.state is R)
            if ready:
                self.ev(
                    "idle_request" if op == "idle" else "retire", ready[n % len(ready)], self.now
                )
                return
        if op == "take":
            self.ev("take", self.now)
            return
        if op == "advance":
            self.now += dt
            return
        if op == "stop" and n % 50 == 0:
            self.ev("stop", self.now)
            return
        self.now += dt
        self.ev("tick", self.now)


def big_config(n: int) -> dict[str, Any]:
    mx = 1 + n % 60
    return {
        "min": (n // 7) % (mx + 1),
        "max": mx,
        "max_concurrency": 1 + (n // 11) % 6,
        "single_use": (n // 13) % 5 == 0,
        "idle_shutdown_after": [None, 0.0, 1.0, 5.0, 30.0][(n // 17) % 5],
        "min_idle_shutdown_after": [None, None, 2.0, 20.0][(n // 19) % 4],
        "boot_ahead": [0, 0, 1, 3, 8][(n // 23) % 5],
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg=st.integers(0, 10**6),
    ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 10**6)), max_size=120),
)
def test_indexed_core_matches_reference_on_random_histories(
    cfg: int, ops: list[tuple[str, int]]
) -> None:
    twin = Twin(**big_config(cfg))
    for op, n in ops:
        twin.step(op, n)


@pytest.mark.parametrize("seed", range(4))
def test_indexed_core_matches_reference_on_long_histories(seed: int) -> None:
    """Longer seeded histories, weighted towards bursts and releases, so that queues reach
    hundreds of waiters."""
    rng = random.Random(5000 + seed)
    twin = Twin(**big_config(rng.randrange(10**6)))
    weights = [6, 2, 6, 2, 3, 1, 1, 1, 1, 2, 2, 2, 0]
    for _ in range(500):
        twin.step(rng.choices(OPS, weights)[0], rng.randrange(10**6))
    twin.ev("stop", twin.now)


def test_heaps_are_compacted_under_churn() -> None:
    """Served and withdrawn waiters leave stale deadline entries, and every change of a
    runner's load a stale load entry: both heaps are rebuilt before the stale entries
    outnumber the live ones (``_audit`` checks the bound after every event), and the
    answers stay the reference's."""
    twin = Twin(min=20, max=20, max_concurrency=6, idle_shutdown_after=None)
    twin.step("up", 3)
    while any(r.state is B for r in twin.core.runners.values()):
        twin.step("up", 3)
    rng = random.Random(7)
    rebuilt = {"load": 0, "deadlines": 0}
    for name in rebuilt:
        method = getattr(twin.core, f"_rebuild_{name}")

        def counting(method: Any = method, name: str = name) -> None:
            rebuilt[name] += 1
            method()

        setattr(twin.core, f"_rebuild_{name}", counting)
    for _ in range(30):
        # callers queue up behind full runners, each one's deadline earlier than the last,
        # so the served ones' entries sink below the live ones instead of reaching the top
        for i in range(60):
            twin.ev("request", twin.next_waiter, twin.now + 1000.0 - i, twin.now)
            twin.next_waiter += 1
        for _ in range(40):  # slots free one at a time, each taken by the next in line
            twin.step("release", rng.randrange(10**6))
        for _ in range(10):  # and some leave from the middle of the queue
            twin.step("withdraw", 1 + rng.randrange(10**6) * 4)
    while twin.core.waiters:
        twin.step("release_all", rng.randrange(10**6))
    for _ in range(3):  # no queue: the hot path fills every slot, then all are freed
        while twin.ev("take", twin.now) is not None:
            pass
        while twin.core.in_flight():
            twin.step("release", rng.randrange(10**6))
    assert rebuilt["load"] > 0 and rebuilt["deadlines"] > 0, rebuilt
