"""Helpers for testing apps and backends that use flame.

* :func:`check_backend`: a conformance check for a :class:`flame.Backend`, the same contract
  flame's own backends are held to: it boots runners, calls them, stops them, and checks
  that a runner's death is noticed and that nothing is left running. Use it on a backend of
  your own, or on a configured one against the real platform, e.g.
  ``check_backend(flame.DockerBackend(image="myapp:test"))`` on your Docker engine.
* ``flame.testing.fly.FlyMachinesEmulator``: a local emulator of the Fly Machines API that
  really boots runners as local processes (``pip install 'flame-py[fly]'``).
* ``flame.testing.kubernetes.KubernetesAPIEmulator``: the same for the Kubernetes API
  (``pip install 'flame-py[kubernetes]'``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import flame

__all__ = ["check_backend"]


def _pid() -> int:
    return os.getpid()


def _boom() -> None:
    raise ValueError("raised on the runner")


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"backend check: {what} within {timeout:g}s")
        time.sleep(0.05)


def check_backend(backend: flame.Backend, *, boot_timeout: float = 60.0) -> None:
    """Check that ``backend`` keeps flame's backend contract; raise ``AssertionError`` if not.

    The functions it runs on runners live in this module, so the runners must be able to
    import ``flame`` (they always can). Runs in about ``2 * boot time + 3`` seconds.
    """
    pool = flame.Pool(
        "flame-backend-check",
        max=2,
        max_concurrency=2,
        backend=backend,
        boot_timeout=boot_timeout,
        idle_shutdown_after=1.0,
    )
    with pool:
        pid = flame.call(pool, _pid)
        assert isinstance(pid, int), "a call must return the runner's result"
        try:
            flame.call(pool, _boom)
        except ValueError as exc:
            assert isinstance(exc.__cause__, flame.RemoteTraceback), "remote traceback missing"
        else:
            raise AssertionError("backend check: a remote exception was not re-raised")
        try:
            flame.call(pool, _sleep, 30, timeout=0.5)
        except flame.CallTimeout:
            pass
        else:
            raise AssertionError("backend check: a call past its timeout did not time out")
        _wait_until(lambda: pool.stats().in_flight == 0, 10.0, "a timed-out call ended")
        # idle runners go away, and the backend's handles see them go
        _wait_until(
            lambda: pool.stats().runners + pool.stats().retiring == 0,
            15.0,
            "idle runners shut down",
        )
        assert flame.call(pool, _pid) is not None
    stats = pool.stats()
    assert stats.runners == stats.booting == stats.retiring == 0, (
        f"backend check: runners left after stop: {stats}"
    )
