"""Backends start, watch and stop runners. See :class:`flame.Backend` for the interface.

This package also owns the table of backend names (``Pool(backend="process")``,
``FLAME_BACKEND``): the cloud backends are imported only when their name is used, since
their optional dependencies may be missing.
"""

from __future__ import annotations

from ._base import Backend, RunnerHandle, RunnerLaunch
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
        return LocalBackend()
    if name == "process":
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
