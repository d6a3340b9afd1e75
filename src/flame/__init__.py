"""flame: run any function on a short-lived, elastic copy of your whole app.

The FLAME pattern (Fleeting Lambda Application for Modular Execution) for Python::

    import flame

    pool = flame.Pool("thumbs", min=0, max=10, max_concurrency=5, backend="process")

    def make_thumbnails(video):
        return flame.call(pool, lambda: ffmpeg_thumbnails(video.url))  # runs on a runner

Public names, grouped:

* pools: :class:`Pool`, :class:`PoolStats`, :func:`configure`
* calls: :func:`call`, :func:`acall`, :func:`cast`, :func:`place_child`,
  :func:`aplace_child`, :class:`Child`
* inside a runner: :func:`parent`, :class:`Parent`
* backends: :class:`Backend`, :class:`RunnerHandle`, :class:`RunnerLaunch`,
  :class:`LocalBackend`, :class:`ProcessBackend`, :class:`FlyBackend`,
  :class:`KubernetesBackend`, :class:`DockerBackend`
* errors: :class:`FlameError` and its subclasses (see ``flame._errors``)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._api import acall, aplace_child, call, cast, place_child
from ._calls import Child
from ._errors import (
    BootError,
    CallTimeout,
    ChildEnded,
    FlameError,
    PoolClosed,
    PoolNotFound,
    RemoteError,
    RemoteTraceback,
    RunnerLost,
    SerializationError,
)
from ._parent import Parent, parent
from ._pool import Pool, PoolStats
from ._settings import configure
from ._version import __version__
from .backends import Backend, RunnerHandle, RunnerLaunch

if TYPE_CHECKING:
    from .backends.docker import DockerBackend
    from .backends.fly import FlyBackend
    from .backends.kubernetes import KubernetesBackend
    from .backends.local import LocalBackend
    from .backends.process import ProcessBackend

__all__ = [
    "Backend",
    "BootError",
    "CallTimeout",
    "Child",
    "ChildEnded",
    "DockerBackend",
    "FlameError",
    "FlyBackend",
    "KubernetesBackend",
    "LocalBackend",
    "Parent",
    "Pool",
    "PoolClosed",
    "PoolNotFound",
    "PoolStats",
    "ProcessBackend",
    "RemoteError",
    "RemoteTraceback",
    "RunnerHandle",
    "RunnerLaunch",
    "RunnerLost",
    "SerializationError",
    "__version__",
    "acall",
    "aplace_child",
    "call",
    "cast",
    "configure",
    "parent",
    "place_child",
]


def __getattr__(name: str) -> Any:
    # the backends are imported when first asked for: the cloud ones load optional
    # dependencies, and a process that uses none of them pays nothing at `import flame`
    if name in ("LocalBackend", "ProcessBackend"):
        from . import backends

        return getattr(backends, name)
    if name == "FlyBackend":
        from .backends.fly import FlyBackend

        return FlyBackend
    if name == "KubernetesBackend":
        from .backends.kubernetes import KubernetesBackend

        return KubernetesBackend
    if name == "DockerBackend":
        from .backends.docker import DockerBackend

        return DockerBackend
    raise AttributeError(f"module 'flame' has no attribute {name!r}")
