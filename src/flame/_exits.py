"""Exit codes of a runner, one per reason, so a parent (or an operator) can tell why; used by
the runner to exit and by the parent and the backends to describe an exit.

The codes flame chooses itself sit in the 200s, away from the small codes applications use
(``os._exit(3)`` in user code must not read as "idle shutdown" in an error message).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    STOPPED = 0  # the parent asked it to stop (pool stop, retire)
    INTERNAL = 201  # a bug in flame itself
    BAD_ENV = 202  # FLAME_PARENT missing or malformed
    IDLE = 203  # idle shutdown, granted by the parent
    SINGLE_USE = 204  # a single-use runner finished its call
    PARENT_LOST = 205  # the connection to the parent was lost
    FAILSAFE = 206  # never connected and authenticated within the failsafe time
    AUTH_FAILED = 207  # the peer could not prove the secret
    REFUSED = 208  # the parent refused it (version mismatch)
    APP_FAILED = 209  # importing the application raised
    STUCK = 210  # a cancelled call did not stop within the grace period
    NO_MAIN_GUARD = 211  # the app calls a pool at import time (no `if __name__ == ...`)

    def describe(self) -> str:
        return _TEXT[self]


_TEXT = {
    ExitCode.STOPPED: "stopped by its parent",
    ExitCode.INTERNAL: "an internal error in the runner",
    ExitCode.BAD_ENV: "FLAME_PARENT was missing or malformed",
    ExitCode.IDLE: "idle shutdown",
    ExitCode.SINGLE_USE: "single-use runner finished its call",
    ExitCode.PARENT_LOST: "lost its parent",
    ExitCode.FAILSAFE: "did not reach its parent within the failsafe time",
    ExitCode.AUTH_FAILED: "the handshake with its parent failed",
    ExitCode.REFUSED: "refused by its parent (version mismatch)",
    ExitCode.APP_FAILED: "importing the application raised",
    ExitCode.STUCK: "a cancelled call did not stop within the grace period",
    ExitCode.NO_MAIN_GUARD: "the app calls a pool while it is imported",
}


def describe_exit(code: int | None) -> str:
    """Human text for a runner's exit status (negative: killed by that signal)."""
    if code is None:
        return "still running"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    try:
        return f"exited with code {code} ({ExitCode(code).describe()})"
    except ValueError:
        return f"exited with code {code}"
