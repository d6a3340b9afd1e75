"""Settings: what ``flame.configure`` sets for the whole process, and what a runner is told.

``configure`` changes the process-wide :class:`Settings` (the default backend and the
protocol's times). A pool turns them, with its own options, into one frozen
:class:`RunnerConfig` per runner: the parent side of the runner reads it, and the runner
gets the same dataclass in its WELCOME, so every default is stated once, here.
"""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class RunnerConfig:
    """What one runner is told, by its parent, in WELCOME (and what its parent side uses).

    Every field is required when read from the wire: a missing or unknown key is a
    protocol error, never a silent default.
    """

    heartbeat_interval: float
    heartbeat_timeout: float
    #: idle this long (and the idle check passes): ask the parent to go; None: never
    idle_after: float | None
    shutdown_timeout: float
    single_use: bool
    cancel_grace: float
    max_frame: int

    @classmethod
    def current(
        cls, *, idle_after: float | None, shutdown_timeout: float, single_use: bool
    ) -> RunnerConfig:
        """The configuration for a runner booted now, from a pool's options and the
        process-wide settings."""
        return cls(
            heartbeat_interval=settings.heartbeat_interval,
            heartbeat_timeout=settings.heartbeat_timeout,
            idle_after=idle_after,
            shutdown_timeout=shutdown_timeout,
            single_use=single_use,
            cancel_grace=settings.cancel_grace,
            max_frame=settings.max_frame,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> RunnerConfig:
        """Read a configuration sent by a parent; ``ValueError`` names what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("the runner configuration is not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - names)
        missing = sorted(names - set(doc))
        if unknown or missing:
            raise ValueError(
                f"the runner configuration has unknown keys {unknown} and lacks {missing}"
            )
        return cls(**doc)
