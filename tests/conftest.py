"""Shared fixtures: one behavioural suite, every backend.

* ``backend_id`` / ``make_backend`` / ``backend``: parametrized over :data:`BACKENDS`, so a
  test (or a module-scoped pool fixture) written once runs on each backend. A new backend is
  one entry in :data:`BACKENDS`: a factory that receives the module's ``ExitStack`` (to start
  an emulator once per module and have it closed afterwards) and returns a *fresh* backend
  instance on each call (a pool closes its backend when it stops).
* ``flame_defaults``: restores every ``flame.configure`` setting after the test.
* ``runner_pids``: a set a test fills with the pids its runners reported; at teardown each
  of them must be gone.
* an automatic, per-module check that no ``flame runner`` process started while the module
  ran outlives it (module-scoped pools included, since they are torn down first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import flame
from helpers import assert_pids_gone, runner_pids

BackendFactory = Callable[[contextlib.ExitStack], Callable[[], flame.Backend]]


def _local(stack: contextlib.ExitStack) -> Callable[[], flame.Backend]:
    return lambda: flame.LocalBackend(serialize=True)


def _process(stack: contextlib.ExitStack) -> Callable[[], flame.Backend]:
    return flame.ProcessBackend


#: backend id -> factory. A factory is called once per test module with the module's
#: ExitStack and returns a callable that makes a fresh backend instance. E.g. for an emulator:
#:
#:     def _fly(stack):
#:         emu = stack.enter_context(FlyMachinesEmulator(...))
#:         return lambda: flame.FlyBackend(host=emu.url, token=..., ...)
def _image_env() -> dict[str, str]:
    # "what is in the image": the emulated machines and pods see our code on PYTHONPATH
    return {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _fly(stack: contextlib.ExitStack) -> Callable[[], flame.Backend]:
    from flame.testing.fly import FlyMachinesEmulator

    emu = stack.enter_context(
        FlyMachinesEmulator(token="test-token", app="flame-tests", extra_env=_image_env())
    )
    return lambda: flame.FlyBackend(
        host=emu.url,
        token="test-token",
        app="flame-tests",
        image="flame-tests:latest",
        advertise_host="127.0.0.1",
        cpus=1,
        retry_backoff=0.01,
    )


def _kubernetes(stack: contextlib.ExitStack) -> Callable[[], flame.Backend]:
    from flame.testing.kubernetes import KubernetesAPIEmulator

    emu = stack.enter_context(KubernetesAPIEmulator(env=_image_env()))
    emu.add_parent_pod("flame-parent")
    return lambda: flame.KubernetesBackend(
        kubeconfig=emu.kubeconfig,
        pod_name="flame-parent",
        listen_host="127.0.0.1",
        advertise_host="127.0.0.1",
    )


BACKENDS: dict[str, BackendFactory] = {
    "local": _local,
    "process": _process,
    "fly": _fly,
    "kubernetes": _kubernetes,
}

#: ids of backends whose "runners" live inside the test process (no runner process, no
#: flame.parent(), and a crash there would take pytest down)
IN_PROCESS = {"local"}


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend_id(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def make_backend(backend_id: str) -> Iterator[Callable[[], flame.Backend]]:
    """Makes fresh instances of the parametrized backend (module-scoped)."""
    with contextlib.ExitStack() as stack:
        yield BACKENDS[backend_id](stack)


@pytest.fixture
def backend(make_backend: Callable[[], flame.Backend]) -> flame.Backend:
    """A fresh instance of each backend in :data:`BACKENDS`, in turn."""
    return make_backend()


# -- configuration -------------------------------------------------------------------------------
_CONFIGURABLE = (
    "backend",
    "heartbeat_interval",
    "heartbeat_timeout",
    "failsafe_timeout",
    "cancel_grace",
)


def _snapshot() -> dict[str, Any]:
    from flame._settings import settings

    values = dataclasses.asdict(settings)
    return {k: values[k] for k in _CONFIGURABLE}


def restore_settings(saved: dict[str, Any]) -> None:
    # raise the timeout first so the interval < timeout rule holds at every step
    flame.configure(heartbeat_timeout=max(saved["heartbeat_timeout"], 1e6))
    flame.configure(**saved)


@pytest.fixture
def flame_defaults() -> Iterator[None]:
    """Lets a test call ``flame.configure(...)``; every setting is restored afterwards."""
    saved = _snapshot()
    try:
        yield
    finally:
        restore_settings(saved)


# -- leaks ---------------------------------------------------------------------------------------
@pytest.fixture
def runner_pids_seen() -> Iterator[set[int]]:
    """Add the pids your runners report (``os.getpid()`` on the runner); each must be gone
    within 10 s of the end of the test (after the test's own pools were stopped)."""
    pids: set[int] = set()
    yield pids
    assert_pids_gone(pids, 10.0)


@pytest.fixture(scope="module", autouse=True)
def _no_runner_outlives_its_module() -> Iterator[None]:
    before = runner_pids()
    yield
    leaked = runner_pids() - before
    if leaked:
        assert_pids_gone(leaked, 10.0, what="flame runner (leaked by this module)")
