"""The module-level API: ``call``, ``acall``, ``cast``, ``place_child``, ``configure``.

Each function takes a pool object or a started pool's name and delegates to
``flame._calls``. ``configure`` holds the process-wide settings: the default backend (else
``FLAME_BACKEND``, else ``"local"``) and the heartbeat, failsafe and cancel-grace times.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, TypeVarTuple

from . import _calls
from ._calls import Child
from ._pool import Pool, lookup
from ._sentinel import DEFAULT
from .backends._base import Backend

R = TypeVar("R")
Ts = TypeVarTuple("Ts")

BACKEND_NAMES = ("local", "process", "fly", "kubernetes")


@dataclass
class _Settings:
    backend: Backend | str | None = None
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 8.0
    failsafe_timeout: float = 20.0
    cancel_grace: float = 3.0
    max_frame: int = 1 << 30


_settings = _Settings()
_UNSET: Any = object()


def configure(
    backend: Backend | str | None = _UNSET,
    *,
    heartbeat_interval: float = _UNSET,
    heartbeat_timeout: float = _UNSET,
    failsafe_timeout: float = _UNSET,
    cancel_grace: float = _UNSET,
) -> None:
    """Set process-wide defaults for pools created afterwards.

    Args:
        backend: the default backend (an instance or one of ``"local"``, ``"process"``,
            ``"fly"``, ``"kubernetes"``). Without it, ``FLAME_BACKEND`` picks, else
            ``"local"``.
        heartbeat_interval: seconds between heartbeats on each runner connection (1.0).
        heartbeat_timeout: silence after which a peer is declared lost (8.0).
        failsafe_timeout: a runner that has not reached its parent by then exits (20.0).
        cancel_grace: how long cancelled work may take to stop before its runner exits (3.0).
    """
    if backend is not _UNSET:
        if backend is not None and not isinstance(backend, Backend):
            _check_name(backend, "backend")
        _settings.backend = backend
    for name, value in (
        ("heartbeat_interval", heartbeat_interval),
        ("heartbeat_timeout", heartbeat_timeout),
        ("failsafe_timeout", failsafe_timeout),
        ("cancel_grace", cancel_grace),
    ):
        if value is _UNSET:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        setattr(_settings, name, float(value))
    if _settings.heartbeat_timeout <= _settings.heartbeat_interval:
        raise ValueError(
            f"heartbeat_timeout ({_settings.heartbeat_timeout}) must be larger than "
            f"heartbeat_interval ({_settings.heartbeat_interval})"
        )


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(
            f"{what} must be a Backend or one of {', '.join(map(repr, BACKEND_NAMES))}; "
            f"got {name!r}"
        )
    return name


def resolve_backend(backend: Backend | str | None) -> Backend:
    """A backend instance for a pool's ``backend`` option."""
    if isinstance(backend, Backend):
        return backend
    if backend is None:
        backend = _settings.backend
        if isinstance(backend, Backend):
            return backend
    if backend is None:
        env = os.environ.get("FLAME_BACKEND")
        if env:
            backend = _check_name(env.strip().lower(), "FLAME_BACKEND")
        else:
            backend = "local"
    name = _check_name(backend, "backend")
    if name == "local":
        from .backends.local import LocalBackend

        return LocalBackend()
    if name == "process":
        from .backends.process import ProcessBackend

        return ProcessBackend()
    if name == "fly":
        from .backends.fly import FlyBackend

        return FlyBackend()
    from .backends.kubernetes import KubernetesBackend

    backend_obj: Backend = KubernetesBackend()
    return backend_obj


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
