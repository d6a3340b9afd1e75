"""The module-level API: ``call``, ``acall``, ``cast``, ``place_child``, ``aplace_child``.

Each function takes a pool object or a pool's name and delegates to ``flame._calls``.
(``configure`` lives in ``flame._settings``.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, TypeVarTuple

from . import _calls
from ._calls import Child
from ._pool import Pool, lookup
from ._sentinel import DEFAULT

R = TypeVar("R")
Ts = TypeVarTuple("Ts")


def call(
    pool: Pool | str,
    fn: Callable[[*Ts], R],
    /,
    *args: *Ts,
    timeout: float | None = DEFAULT,
    link: bool = True,
) -> R:
    """Run ``fn(*args)`` on a runner of ``pool`` and return its result.

    ``fn`` may be a function, lambda, closure, ``functools.partial``, bound method, or an
    ``async def`` function (awaited on the runner). ``timeout`` bounds the whole call
    (waiting for a runner, booting one, running); left out, waiting is bounded by the pool's
    ``boot_timeout`` and running by its ``timeout``; ``None`` means no limit.

    With ``link=True`` the remote work is terminated if this caller is interrupted or this
    process dies; with ``link=False`` it may run to completion (within the runner's
    ``shutdown_timeout``).

    Raises:
        CallTimeout: no result within the timeout (the remote work was terminated).
        BootError: no runner could be booted for the call.
        RunnerLost: the runner died or became unreachable during the call.
        SerializationError: ``fn``, an argument or the result cannot be pickled.
        PoolNotFound: no started pool has that name.
        Exception: whatever ``fn`` raised, as its own type, with the remote traceback as
            ``__cause__`` (``RemoteError`` if it could not be re-created here).
    """
    result: R = _calls.call(lookup(pool), fn, args, timeout, link)
    return result


async def acall(
    pool: Pool | str,
    fn: Callable[[*Ts], R] | Callable[[*Ts], Awaitable[R]],
    /,
    *args: *Ts,
    timeout: float | None = DEFAULT,
    link: bool = True,
) -> R:
    """The asyncio form of :func:`call`. Cancelling the awaiting task cancels the remote work."""
    result: R = await _calls.acall(lookup(pool), fn, args, timeout, link)
    return result


def cast(pool: Pool | str, fn: Callable[..., Any], /, *args: Any, link: bool = True) -> None:
    """Run ``fn(*args)`` on a runner without waiting for it; return at once.

    The work takes a concurrency slot like a call. Its failure is logged on the ``flame``
    logger with the remote traceback, never raised. A function or argument that cannot be
    pickled raises :class:`SerializationError` here, before anything is sent.
    """
    _calls.cast(lookup(pool), fn, args, link)


def place_child(
    pool: Pool | str,
    factory: Callable[..., Any],
    /,
    *args: Any,
    timeout: float | None = DEFAULT,
    link: bool = True,
) -> Child:
    """Build ``factory(*args)`` on a runner and keep it there, in one slot, until it ends.

    If the object has a ``run()`` method (sync or async) it is started in the background on
    the runner. Returns a :class:`Child` handle to call its methods, wait for it, or stop it.
    """
    return _calls.place_child(lookup(pool), factory, args, timeout, link)


async def aplace_child(
    pool: Pool | str,
    factory: Callable[..., Any],
    /,
    *args: Any,
    timeout: float | None = DEFAULT,
    link: bool = True,
) -> Child:
    """The asyncio form of :func:`place_child`."""
    return await _calls.aplace_child(lookup(pool), factory, args, timeout, link)
