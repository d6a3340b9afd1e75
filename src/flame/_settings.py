"""Settings: what ``flame.configure`` sets for the whole process, and which backend a pool
gets by default.

``configure`` changes the process-wide :class:`Settings` (the default backend and the
protocol's times); every default is stated here, once. A pool turns them, with its own
options, into one frozen ``flame._wire.RunnerConfig`` per runner, which the runner gets in
its WELCOME.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .backends import BACKEND_NAMES, Backend, backend_by_name


@dataclass
class Settings:
    """The process-wide defaults ``flame.configure`` sets."""

    backend: Backend | str | None = None
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 8.0
    failsafe_timeout: float = 20.0
    cancel_grace: float = 3.0
    max_frame: int = 1 << 30


settings = Settings()
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
            ``"fly"``, ``"kubernetes"``). Without it, ``FLAME_BACKEND`` picks,
            else ``"local"``.
        heartbeat_interval: seconds between heartbeats on each runner connection (1.0).
        heartbeat_timeout: silence after which a peer is declared lost (8.0).
        failsafe_timeout: a runner that has not reached its parent by then exits (20.0).
        cancel_grace: how long cancelled work may take to stop before its runner exits (3.0).
    """
    if backend is not _UNSET and backend is not None and not isinstance(backend, Backend):
        check_backend_name(backend, "backend")
    times = {
        "heartbeat_interval": heartbeat_interval,
        "heartbeat_timeout": heartbeat_timeout,
        "failsafe_timeout": failsafe_timeout,
        "cancel_grace": cancel_grace,
    }
    new = {}
    for name, value in times.items():
        if value is _UNSET:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if math.isinf(value):
            raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
        new[name] = float(value)
    interval = new.get("heartbeat_interval", settings.heartbeat_interval)
    timeout = new.get("heartbeat_timeout", settings.heartbeat_timeout)
    if timeout <= interval:
        raise ValueError(
            f"heartbeat_timeout ({timeout}) must be larger than heartbeat_interval ({interval})"
        )
    # nothing is changed unless every argument is valid
    if backend is not _UNSET:
        settings.backend = backend
    for name, value in new.items():
        setattr(settings, name, value)


def check_backend_name(name: Any, what: str) -> str:
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
        backend = settings.backend
        if isinstance(backend, Backend):
            return backend
    if backend is None:
        env = os.environ.get("FLAME_BACKEND")
        backend = check_backend_name(env.strip().lower(), "FLAME_BACKEND") if env else "local"
    return backend_by_name(check_backend_name(backend, "backend"))
