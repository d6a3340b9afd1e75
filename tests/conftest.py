"""Shared fixtures: one behavioural suite, every backend.

* ``backend_id`` / ``make_backend`` / ``backend``: parametrized over the selected backends,
  so a test (or a module-scoped pool fixture) written once runs on each backend. A new
  backend is one entry in :data:`BACKENDS` (or, for one that needs a real service,
  :data:`PLATFORMS`): a factory that receives the module's and the session's ``ExitStack``
  (to start an emulator once per module, or a real service once per session, and have it
  closed afterwards) and returns a *fresh* backend instance on each call (a pool closes its
  backend when it stops).
* ``FLAME_TEST_BACKENDS`` (comma-separated ids) selects the backends; by default the fast
  ones of :data:`BACKENDS`. The platform tiers (``.ci/run``) select a platform of
  :data:`PLATFORMS`, which skips with the reason when its service cannot start here;
  ``FLAME_SKIP_IS_FAILURE=1`` (set by CI) turns every skip into a failure, so a tier can
  never silently stop running.
* ``pool``: one started pool per backend and test module, with the module's
  ``POOL_OPTIONS``, shared by the tests that leave it as they found it (checked before and
  after each test: nothing in flight). A module that runs on some backends only names them
  in ``ONLY_ON``.
* ``make_pool``: makes pools of the test's own (unique names); after the test they are all
  stopped, and no runner process they booted may remain.
* ``flame_defaults``: restores every ``flame.configure`` setting after the test.
* ``runner_pids``: a set a test fills with the pids its runners reported; at teardown each
  of them must be gone.
* an automatic, per-module check that no ``flame runner`` process started while the module
  ran outlives it (module-scoped pools included, since they are torn down first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flame
from helpers import assert_pids_gone, runner_pids, wait_until


@dataclasses.dataclass(frozen=True)
class Stacks:
    """Where a backend factory registers what must be closed: after the module, or at the
    end of the session (a real service, started once)."""

    module: contextlib.ExitStack
    session: contextlib.ExitStack


BackendFactory = Callable[[Stacks], Callable[[], flame.Backend]]


def _local(stacks: Stacks) -> Callable[[], flame.Backend]:
    return lambda: flame.LocalBackend(serialize=True)


def _process(stacks: Stacks) -> Callable[[], flame.Backend]:
    return flame.ProcessBackend


#: backend id -> factory. A factory is called once per test module and returns a callable
#: that makes a fresh backend instance. E.g. for an emulator:
#:
#:     def _fly(stacks):
#:         emu = stacks.module.enter_context(FlyMachinesEmulator(...))
#:         return lambda: flame.FlyBackend(host=emu.url, token=..., ...)
def _image_env() -> dict[str, str]:
    # "what is in the image": the emulated machines and pods see our code on PYTHONPATH
    return {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _fly(stacks: Stacks) -> Callable[[], flame.Backend]:
    from flame.backends.fly import FlyRateLimits
    from flame.testing.fly import FlyMachinesEmulator
    from helpers.parent import fly_traffic

    # Fly's rate limits, 50 times faster on both sides: the suite boots hundreds of runners
    # (tests/test_fly_pacing.py holds the backend to the real ones)
    limits = FlyRateLimits().scaled(50)
    emu = stacks.module.enter_context(
        FlyMachinesEmulator(
            token="test-token", app="flame-tests", extra_env=_image_env(), rate_limits=limits
        )
    )
    fly_traffic.EMULATORS.append(emu)  # every request is checked against Fly's schema
    return lambda: flame.FlyBackend(
        host=emu.url,
        token="test-token",
        app="flame-tests",
        image="flame-tests:latest",
        advertise_host="127.0.0.1",
        cpus=1,
        retry_backoff=0.01,
        rate_limits=limits,
    )


def _kubernetes(stacks: Stacks) -> Callable[[], flame.Backend]:
    from flame.testing.kubernetes import KubernetesAPIEmulator

    emu = stacks.module.enter_context(KubernetesAPIEmulator(env=_image_env()))
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


def _kubernetes_real(stacks: Stacks) -> Callable[[], flame.Backend]:
    from platforms.kubernetes import kubernetes_real  # a real control plane (.ci/tier-kubernetes)

    return kubernetes_real(stacks)


def _docker(stacks: Stacks) -> Callable[[], flame.Backend]:
    from platforms.docker import backend_factory  # a real engine (.ci/tier-docker)

    return backend_factory(stacks)


#: backends that need a real service (a platform tier of ``.ci/run``), selected only by
#: ``FLAME_TEST_BACKENDS`` (``tests/platforms/``); their factories skip, saying why, when the
#: service cannot start here
PLATFORMS: dict[str, BackendFactory] = {
    "docker": _docker,
    "kubernetes-real": _kubernetes_real,
}


def selected_backends() -> list[str]:
    chosen = os.environ.get("FLAME_TEST_BACKENDS", "")
    if not chosen.strip():
        return list(BACKENDS)
    ids = [b.strip() for b in chosen.split(",") if b.strip()]
    unknown = [b for b in ids if b not in BACKENDS and b not in PLATFORMS]
    if unknown:
        raise pytest.UsageError(
            f"FLAME_TEST_BACKENDS names unknown backends {unknown}; known: "
            f"{sorted(BACKENDS) + sorted(PLATFORMS)}"
        )
    return ids


#: ids of backends whose "runners" live inside the test process (no runner process, no
#: flame.parent(), and a crash there would take pytest down)
IN_PROCESS = {"local"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_id" in metafunc.fixturenames:
        ids = selected_backends()
        only = getattr(metafunc.module, "ONLY_ON", None)
        if only is not None:
            ids = [i for i in ids if i in only]
        metafunc.parametrize("backend_id", ids, indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend_id(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def session_stack() -> Iterator[contextlib.ExitStack]:
    """Closed at the end of the session: real services started once for every module."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture(scope="module")
def make_backend(
    backend_id: str, session_stack: contextlib.ExitStack
) -> Iterator[Callable[[], flame.Backend]]:
    """Makes fresh instances of the parametrized backend (module-scoped)."""
    factory = BACKENDS.get(backend_id) or PLATFORMS[backend_id]
    with contextlib.ExitStack() as stack:
        yield factory(Stacks(module=stack, session=session_stack))


@pytest.fixture
def backend(make_backend: Callable[[], flame.Backend]) -> flame.Backend:
    """A fresh instance of each backend in :data:`BACKENDS`, in turn."""
    return make_backend()


# -- pools -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def _module_pool(
    request: pytest.FixtureRequest, backend_id: str, make_backend: Callable[[], flame.Backend]
) -> Iterator[flame.Pool]:
    options: dict[str, Any] = {"max": 1, **getattr(request.module, "POOL_OPTIONS", {})}
    name = f"{request.module.__name__.removeprefix('test_')}-{backend_id}"
    with flame.Pool(name, backend=make_backend(), **options) as p:
        yield p


@pytest.fixture
def pool(_module_pool: flame.Pool) -> Iterator[flame.Pool]:
    """The module's shared pool on each backend, quiet before and after each test."""
    wait_until(lambda: _module_pool.stats().in_flight == 0, 10, message="pool busy before test")
    yield _module_pool
    wait_until(
        lambda: _module_pool.stats().in_flight == 0, 10, message="work left in flight by the test"
    )


@pytest.fixture
def make_pool(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., flame.Pool]]:
    """Makes pools with unique names (``max=1`` unless given); stops them all after the test
    and checks that no runner process they booted is left. A ``gate`` file in ``tmp_path`` is
    touched first, for work a failed test left waiting at a gate there."""
    pools: list[flame.Pool] = []
    before = runner_pids()
    counter = itertools.count()

    def make(backend: flame.Backend, **opts: Any) -> flame.Pool:
        opts.setdefault("max", 1)
        pool = flame.Pool(f"{request.node.name}-{next(counter)}", backend=backend, **opts)
        pools.append(pool)
        return pool

    yield make
    (tmp_path / "gate").touch()
    for pool in pools:
        pool.stop()
    wait_until(
        lambda: runner_pids() <= before, 10, message="runner processes left after the pools stopped"
    )


@pytest.fixture(autouse=True)
def _names_freed() -> Iterator[None]:
    """Pools a test created and never started are stopped after it, so that their names
    are free for the next test (a pool's name is its until it is stopped)."""
    from flame._pool import _registry

    before = set(_registry.values())
    yield
    for pool in list(_registry.values()):
        if pool not in before and not pool.started:
            pool.stop()


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


# -- order ---------------------------------------------------------------------------------------
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``after_suite`` check what the rest of the session did: they run last."""
    items.sort(key=lambda item: item.get_closest_marker("after_suite") is not None)


# -- platform tiers: a skip is a failure where CI says so ------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (
        os.environ.get("FLAME_SKIP_IS_FAILURE") == "1"
        and report.skipped
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, and FLAME_SKIP_IS_FAILURE=1 forbids skips here: {reason}"
