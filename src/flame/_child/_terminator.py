"""The terminator: when a runner ends, and why. One object, driven by the runner process
and by ``LocalBackend``'s in-process runner alike.

It applies the runner life-cycle rules (SPEC "Runner life cycle") to what it is told (the
work started or ended, the parent said KEEP or SHUTDOWN, the parent was lost, a cancelled
call is stuck) and to the time, and reports through two ports: ``send`` (IDLE and GOODBYE
to the parent) and ``on_exit`` (the runner must end now, with this code). Time comes from an
injectable :class:`Clock`, so the rules can be tested without sleeping.

* idle for ``idle_after`` with no work, and the idle check (run in a worker) passes: ask
  the parent (IDLE), which answers SHUTDOWN or KEEP, so a runner never leaves while a call
  is on its way to it; after KEEP, ask again no sooner than it said (or, for -1, only after
  the runner was busy and idle again);
* single use: the runner's call is done: GOODBYE and exit;
* SHUTDOWN: in-flight work gets ``shutdown_timeout``, then is cancelled, then gets
  ``cancel_grace``; the same on parent loss, but linked work is cancelled at once;
* a cancelled call that has not stopped within ``cancel_grace`` (the executor says so):
  GOODBYE (STUCK) and exit, since a thread cannot be killed;
* every tick: the executor cancels calls past their deadline (the runner's own backstop).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from .._exits import ExitCode
from .._wire import RunnerConfig

TICK = 0.1  # seconds between the periodic checks (deadlines, idleness)


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time and timers (an asyncio loop is one)."""

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], Any], /) -> Timer: ...


class Work(Protocol):
    """What the terminator needs of the executor."""

    busy: int
    idle_since: float
    notify_idle: bool

    def sweep(self, now: float) -> None: ...

    def cancel_linked(self) -> None: ...

    def cancel_all(self) -> None: ...

    def spawn(self, work: Callable[[], None]) -> None: ...


class Messages(Protocol):
    """What the terminator tells the parent."""

    def idle(self) -> None:
        """IDLE: may I shut down?"""

    def goodbye(self, code: ExitCode) -> None:
        """GOODBYE: I am about to exit on my own, for this reason."""


class Terminator:
    """Decides when its runner ends. Every method runs on the runner's control loop, except
    :meth:`changed` with the work busy, which may be called from any thread."""

    def __init__(
        self,
        config: RunnerConfig,
        work: Work,
        send: Messages,
        clock: Clock,
        on_exit: Callable[[ExitCode], None],
        *,
        say: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.config = config
        self.work = work
        self.send = send
        self.clock = clock
        self._on_exit = on_exit
        self._say = say
        #: run on the runner before asking to go idle (``Pool(idle_shutdown_after=(s, check))``)
        self.idle_check: Callable[[], Any] | None = None
        self.exit_code: ExitCode | None = None
        self._served = 0
        self._asking = False  # IDLE sent, no answer yet
        self._checking = False  # the idle check is running
        self._next_ask = 0.0  # after a KEEP: not before this time
        self._draining: ExitCode | None = None
        self._tick_timer: Timer | None = None
        self._drain_timer: Timer | None = None

    @property
    def ended(self) -> bool:
        return self.exit_code is not None

    @property
    def draining(self) -> bool:
        return self._draining is not None

    # -- what happens ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the periodic checks (once the runner serves)."""
        # a single-use runner ends as soon as its call does: be told at once, not on a tick
        self.work.notify_idle = self.config.single_use
        self._tick_timer = self.clock.call_later(TICK, self._tick)

    def served(self) -> None:
        """A call or a child was taken on (any thread)."""
        self._served += 1

    def changed(self) -> None:
        """The work went from idle to busy (any thread), or, when the terminator asked to be
        told (``work.notify_idle``), from busy to idle (control loop)."""
        if self.work.busy:
            self._next_ask = 0.0  # busy again: a KEEP's "ask later" no longer holds
            return
        if self._draining is not None:
            self._exit(self._draining)
        elif self.config.single_use and self._served:
            self.send.goodbye(ExitCode.SINGLE_USE)
            self._exit(ExitCode.SINGLE_USE)

    def keep(self, retry_after: float) -> None:
        """The parent answered IDLE with KEEP: ask again after that long (-1: not until the
        runner was busy and idle again)."""
        self._asking = False
        self._next_ask = self.clock.time() + retry_after if retry_after >= 0 else math.inf

    def shutdown(self) -> None:
        """The parent said SHUTDOWN (pool stop, retire, or an IDLE request granted)."""
        code = ExitCode.IDLE if self._asking else ExitCode.STOPPED
        if self.config.single_use and self._served:
            # the parent retires a single-use runner after its call, and that SHUTDOWN may
            # overtake the runner's own end of the call: same reason, same exit code
            code = ExitCode.SINGLE_USE
        self._drain(code, cancel_linked=False)

    def parent_lost(self) -> None:
        """The connection to the parent is gone: linked work ends now, the rest may finish."""
        self._drain(ExitCode.PARENT_LOST, cancel_linked=True)

    def stuck(self, call_id: int) -> None:
        """A cancelled call did not stop within the grace period."""
        if self.ended:
            return
        self.send.goodbye(ExitCode.STUCK)
        self._say(f"call {call_id} did not stop after being cancelled; exiting")
        self._exit(ExitCode.STUCK)

    def stop(self, code: ExitCode) -> None:
        """End now, whatever is in flight (the runner is being torn down)."""
        self._exit(code)

    # -- the rules --------------------------------------------------------------------------
    def _tick(self) -> None:
        if self.ended:
            return
        now = self.clock.time()
        self.work.sweep(now)
        idle_after = self.config.idle_after
        if (
            idle_after is not None
            and not self.work.busy
            and self._draining is None
            and not self._asking
            and not self._checking
            and now >= max(self.work.idle_since + idle_after, self._next_ask)
        ):
            self._idle_fired()
        self._tick_timer = self.clock.call_later(TICK, self._tick)

    def _idle_fired(self) -> None:
        check = self.idle_check
        if check is None:
            self._ask()
            return
        self._checking = True

        def run_check() -> None:
            try:
                ok = bool(check())
            except Exception as exc:
                self._say(f"idle check raised {exc!r}")
                ok = False
            self.clock.call_later(0, lambda: self._check_done(ok))

        self.work.spawn(run_check)

    def _check_done(self, ok: bool) -> None:
        self._checking = False
        if self.work.busy or self._draining is not None or self.ended:
            return
        if ok:
            self._ask()
        elif self.config.idle_after is not None:
            self._next_ask = self.clock.time() + self.config.idle_after

    def _ask(self) -> None:
        self._asking = True
        self.send.idle()

    def _drain(self, code: ExitCode, *, cancel_linked: bool) -> None:
        if self._draining is not None or self.ended:
            return
        self._draining = code
        self.work.notify_idle = True
        if cancel_linked:
            self.work.cancel_linked()
        if not self.work.busy:
            self._exit(code)
            return
        self._drain_timer = self.clock.call_later(self.config.shutdown_timeout, self._overdue)

    def _overdue(self) -> None:
        """The drain's time is up: cancel what is left, and end after the grace period."""
        if self.ended or self._draining is None:
            return
        self.work.cancel_all()
        code = self._draining
        self._drain_timer = self.clock.call_later(
            self.config.cancel_grace, lambda: self._exit(code)
        )

    def _exit(self, code: ExitCode) -> None:
        if self.exit_code is not None:
            return
        self.exit_code = code
        for timer in (self._tick_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        self._on_exit(code)
