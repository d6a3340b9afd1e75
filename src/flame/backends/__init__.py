"""Backends start, watch and stop runners. See :class:`flame.Backend` for the interface."""

from ._base import Backend, RunnerHandle, RunnerLaunch
from .local import LocalBackend
from .process import ProcessBackend

__all__ = ["Backend", "LocalBackend", "ProcessBackend", "RunnerHandle", "RunnerLaunch"]
