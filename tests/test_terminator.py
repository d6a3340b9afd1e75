"""The terminator's rules on a clock the test turns: idle ask and KEEP, single use, drain on
SHUTDOWN and on parent loss, stuck calls. No real timer, no sleep: time moves when the test
says so (the same object drives runner processes and ``LocalBackend``'s runners, whose
behaviour the shared suite checks end to end)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from flame._child._terminator import TICK, Terminator
from flame._exits import ExitCode
from flame._wire import RunnerConfig


class FakeClock:
    """Timers that fire when the test advances time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], Any], /) -> FakeTimer:
        timer = FakeTimer(callback)
        heapq.heappush(self._timers, (self.now + delay, next(self._seq), timer))
        return timer

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self._timers and self._timers[0][0] <= end:
            at, _, timer = heapq.heappop(self._timers)
            self.now = max(self.now, at)
            if not timer.cancelled:
                timer.callback()
        self.now = end


class FakeTimer:
    def __init__(self, callback: Callable[[], Any]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeWork:
    """The executor, as the terminator sees it; spawned work runs at once."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.busy = 0
        self.idle_since = clock.now
        self.notify_idle = False
        self.cancelled: list[str] = []
        self.swept: list[float] = []

    def sweep(self, now: float) -> None:
        self.swept.append(now)

    def cancel_linked(self) -> None:
        self.cancelled.append("linked")

    def cancel_all(self) -> None:
        self.cancelled.append("all")

    def spawn(self, work: Callable[[], None]) -> None:
        work()


class Parent:
    def __init__(self) -> None:
        self.said: list[Any] = []

    def idle(self) -> None:
        self.said.append("IDLE")

    def goodbye(self, code: ExitCode) -> None:
        self.said.append(("GOODBYE", code))


def config(**changes: Any) -> RunnerConfig:
    values: dict[str, Any] = {
        "heartbeat_interval": 1.0,
        "heartbeat_timeout": 8.0,
        "idle_after": 5.0,
        "shutdown_timeout": 10.0,
        "single_use": False,
        "cancel_grace": 3.0,
        "max_frame": 1 << 20,
    }
    values.update(changes)
    return RunnerConfig(**values)


class Rig:
    def __init__(self, **changes: Any) -> None:
        self.clock = FakeClock()
        self.work = FakeWork(self.clock)
        self.parent = Parent()
        self.exits: list[ExitCode] = []
        self.t = Terminator(
            config(**changes), self.work, self.parent, self.clock, self.exits.append
        )
        self.t.start()

    def busy(self) -> None:
        self.work.busy += 1
        self.t.changed()

    def done(self) -> None:
        self.work.busy -= 1
        if not self.work.busy:
            self.work.idle_since = self.clock.now
            if self.work.notify_idle:
                self.t.changed()


def test_asks_to_go_once_idle_for_idle_after_and_not_before() -> None:
    rig = Rig(idle_after=5.0)
    rig.clock.advance(5.0 - 2 * TICK)
    assert rig.parent.said == []
    rig.clock.advance(3 * TICK)
    assert rig.parent.said == ["IDLE"]
    rig.clock.advance(60)
    assert rig.parent.said == ["IDLE"], "asks once, then waits for the answer"
    rig.t.shutdown()
    assert rig.exits == [ExitCode.IDLE]


def test_work_resets_the_idle_time() -> None:
    rig = Rig(idle_after=5.0)
    rig.clock.advance(4)
    rig.busy()
    rig.clock.advance(30)
    rig.done()
    rig.clock.advance(4)
    assert rig.parent.said == []
    rig.clock.advance(1 + TICK)
    assert rig.parent.said == ["IDLE"]


def test_keep_delays_the_next_ask_and_minus_one_waits_for_work() -> None:
    rig = Rig(idle_after=1.0)
    rig.clock.advance(1 + TICK)
    rig.t.keep(2.0)
    rig.clock.advance(2 - 2 * TICK)
    assert rig.parent.said == ["IDLE"]
    rig.clock.advance(3 * TICK)
    assert rig.parent.said == ["IDLE", "IDLE"]
    rig.t.keep(-1)
    rig.clock.advance(100)
    assert rig.parent.said == ["IDLE", "IDLE"]
    rig.busy()  # busy again: a KEEP's "ask later" no longer holds
    rig.done()
    rig.clock.advance(1 + TICK)
    assert rig.parent.said == ["IDLE"] * 3


def test_never_idle_without_idle_after() -> None:
    rig = Rig(idle_after=None)
    rig.clock.advance(3600)
    assert rig.parent.said == [] and rig.exits == []
    assert len(rig.work.swept) >= 3600 / TICK - 1, "the deadline sweep still ticks"


@pytest.mark.parametrize("passes", [True, False])
def test_the_idle_check_gates_the_ask(passes: bool) -> None:
    rig = Rig(idle_after=1.0)
    checks = []
    rig.t.idle_check = lambda: checks.append(rig.clock.now) or passes
    rig.clock.advance(1 + 2 * TICK)
    assert len(checks) == 1
    assert rig.parent.said == (["IDLE"] if passes else [])
    if not passes:  # checked again one idle_after later
        rig.clock.advance(1 + TICK)
        assert len(checks) == 2


def test_single_use_says_goodbye_when_its_call_is_done() -> None:
    rig = Rig(single_use=True)
    rig.t.served()
    rig.busy()
    rig.clock.advance(1)
    rig.done()
    assert rig.parent.said == [("GOODBYE", ExitCode.SINGLE_USE)]
    assert rig.exits == [ExitCode.SINGLE_USE]
    # the pool's SHUTDOWN for it may still arrive: same end, one exit
    rig.t.shutdown()
    assert rig.exits == [ExitCode.SINGLE_USE]


def test_shutdown_lets_work_finish_within_shutdown_timeout() -> None:
    rig = Rig(shutdown_timeout=10.0)
    rig.busy()
    rig.t.shutdown()
    rig.clock.advance(9)
    assert rig.exits == [] and rig.work.cancelled == []
    rig.done()
    assert rig.exits == [ExitCode.STOPPED]


def test_drain_cancels_what_is_left_then_ends_after_the_grace() -> None:
    rig = Rig(shutdown_timeout=10.0, cancel_grace=3.0)
    rig.busy()
    rig.t.shutdown()
    rig.clock.advance(10 + TICK)
    assert rig.work.cancelled == ["all"] and rig.exits == []
    rig.clock.advance(3)
    assert rig.exits == [ExitCode.STOPPED]


def test_parent_loss_cancels_linked_work_at_once() -> None:
    rig = Rig(shutdown_timeout=10.0)
    rig.busy()
    rig.t.parent_lost()
    assert rig.work.cancelled == ["linked"]
    rig.done()  # the unlinked rest finished
    assert rig.exits == [ExitCode.PARENT_LOST]


def test_an_idle_runner_ends_at_once_on_shutdown_or_parent_loss() -> None:
    rig = Rig()
    rig.t.parent_lost()
    assert rig.exits == [ExitCode.PARENT_LOST]
    rig2 = Rig()
    rig2.t.shutdown()
    assert rig2.exits == [ExitCode.STOPPED]


def test_a_stuck_call_says_goodbye_and_ends() -> None:
    rig = Rig()
    rig.busy()
    rig.t.stuck(7)
    assert rig.parent.said == [("GOODBYE", ExitCode.STUCK)]
    assert rig.exits == [ExitCode.STUCK]
    rig.clock.advance(60)
    assert rig.exits == [ExitCode.STUCK] and rig.parent.said == [("GOODBYE", ExitCode.STUCK)]
