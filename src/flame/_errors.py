"""The exception tree of flame.

Every error flame raises derives from :class:`FlameError`::

    FlameError
     ├── CallTimeout          (also TimeoutError)   no result within the call's timeout
     ├── BootError                                  a runner could not be booted
     ├── RunnerLost                                 the runner died or became unreachable mid-call
     ├── SerializationError                         a function, argument or result cannot pickle
     ├── PoolNotFound         (also LookupError)    no started pool has that name
     ├── PoolClosed                                 the pool was stopped (you closed it)
     ├── ChildEnded                                 a placed child is no longer alive
     └── RemoteError                                a remote exception that could not cross the wire

"It broke" (:class:`RunnerLost`, :class:`BootError`) is kept apart from "you closed it"
(:class:`PoolClosed`). An exception raised by the user's own function is re-raised in the caller
as its own type, with a :class:`RemoteTraceback` as its ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BootError",
    "CallTimeout",
    "ChildEnded",
    "FlameError",
    "PoolClosed",
    "PoolNotFound",
    "RemoteError",
    "RemoteTraceback",
    "RunnerLost",
    "SerializationError",
]


class FlameError(Exception):
    """Base class of every error raised by flame."""


class CallTimeout(FlameError, TimeoutError):
    """No result arrived within the call's timeout; the remote work was terminated."""


class BootError(FlameError):
    """A runner could not be booted: the backend refused, it crashed, or missed ``boot_timeout``."""


class RunnerLost(FlameError):
    """The runner died or became unreachable while the call was in flight."""


class SerializationError(FlameError):
    """A function, an argument or a result cannot be pickled or unpickled."""


class PoolNotFound(FlameError, LookupError):
    """No started pool is registered under that name."""


class PoolClosed(FlameError):
    """The pool was stopped and takes no more calls."""


class ChildEnded(FlameError):
    """The placed child has ended (stopped, finished, or its runner went away)."""


class RemoteTraceback(Exception):
    """Carries the text of a remote traceback; attached as ``__cause__`` of re-raised errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(FlameError):
    """A remote exception that could not be re-created in the caller.

    Attributes:
        type_name: the qualified name of the remote exception's type.
        message: ``str()`` of the remote exception.
        remote_traceback: the formatted remote traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))
