"""Backends start, watch and stop runners. See :class:`flame.Backend` for the interface.

This package also owns the table of backend names (``Pool(backend="process")``,
``FLAME_BACKEND``): the cloud backends are imported only when their name is used, since
their optional dependencies may be missing; ``LocalBackend`` and ``ProcessBackend`` only
when first used, to keep ``import flame`` short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import Backend, RunnerHandle, RunnerLaunch

if TYPE_CHECKING:
    from .local import LocalBackend
    from .process import ProcessBackend

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "LocalBackend",
    "ProcessBackend",
    "RunnerHandle",
    "RunnerLaunch",
    "backend_by_name",
]

#: the names a pool's ``backend`` option and ``FLAME_BACKEND`` accept
BACKEND_NAMES = ("local", "process", "fly", "kubernetes", "docker")


def backend_by_name(name: str) -> Backend:
    """A new backend of that name, with its default options (``name`` is checked first)."""
    if name == "local":
        from .local import LocalBackend

        return LocalBackend()
    if name == "process":
        from .process import ProcessBackend

        return ProcessBackend()
    if name == "fly":
        from .fly import FlyBackend

        return FlyBackend()
    if name == "kubernetes":
        from .kubernetes import KubernetesBackend

        return KubernetesBackend()
    if name == "docker":
        from .docker import DockerBackend

        return DockerBackend()
    raise ValueError(f"no backend is named {name!r}")


def __getattr__(name: str) -> Any:
    # imported when first asked for: a process that uses neither pays nothing for them
    # (LocalBackend brings the in-process runner, ProcessBackend the fork server's client)
    if name == "LocalBackend":
        from .local import LocalBackend

        return LocalBackend
    if name == "ProcessBackend":
        from .process import ProcessBackend

        return ProcessBackend
    raise AttributeError(f"module 'flame.backends' has no attribute {name!r}")
