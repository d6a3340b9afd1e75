"""The real Docker engine as a platform of the shared behavioural suite.

``FLAME_TEST_BACKENDS=docker`` runs the suite with :class:`flame.DockerBackend` runners on
the engine at ``DOCKER_HOST``, in the image ``FLAME_TEST_DOCKER_IMAGE`` (``.ci/tier-docker``
starts a private engine and builds that image: flame, its dependencies, pytest and numpy,
and ``tests/`` on ``PYTHONPATH``, so runners import the test modules and ``helpers`` by
name, as a deployment image holds the app). What the tests' runners need of the host, the
factory gives them explicitly:

* ``network="host"``: runners dial the test process on loopback (the bridge case has its
  own tests in ``tests/test_docker.py``);
* ``PidMode: host``: ``os.getpid()`` on a runner is its pid on the host, so the suite's
  checks and signals (``pid_alive``, ``os.kill(pid, SIGKILL)``) reach the runner process;
* pytest's temporary directories, bind-mounted at the same path (``FLAME_TEST_DOCKER_SHARE``,
  default ``<tmp>/pytest-of-<user>``), for the files runners and tests exchange;
* ``app="helpers"``: the app the runner imports (the main module of a pytest run is pytest's).

Without an engine or the image, every test of the platform skips, saying why (a failure
where ``FLAME_SKIP_IS_FAILURE=1``). After each module, no container of this process may be
left on the engine.
"""

from __future__ import annotations

import getpass
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import flame
from flame.backends.docker import LABEL_PARENT, process_key

HOW = "run .ci/tier-docker, or set DOCKER_HOST and FLAME_TEST_DOCKER_IMAGE"


def engine() -> httpx.Client:
    """A client of the engine at ``DOCKER_HOST`` (skips the test if there is none); the
    caller closes it."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host.startswith("unix://"):
        pytest.skip(f"no Docker engine for the tests (DOCKER_HOST={host!r}): {HOW}")
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=host[len("unix://") :]),
        base_url="http://docker/v1.41",
        timeout=10.0,
    )
    try:
        client.get("/_ping").raise_for_status()
    except httpx.HTTPError as exc:
        client.close()
        pytest.skip(f"the Docker engine at {host} does not answer ({exc}): {HOW}")
    return client


def image(client: httpx.Client, variable: str = "FLAME_TEST_DOCKER_IMAGE") -> str:
    """The image named by ``variable``; skips if it is unset or not on the engine."""
    name = os.environ.get(variable, "")
    if not name:
        pytest.skip(f"{variable} is not set: {HOW}")
    if client.get(f"/images/{name}/json").status_code != 200:
        pytest.skip(f"the image {name} ({variable}) is not on the engine: {HOW}")
    return name


def share_dir() -> str:
    """The host directory runners see at the same path (pytest's temporary directories)."""
    default = Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir())
    path = os.environ.get("FLAME_TEST_DOCKER_SHARE") or str(
        default / f"pytest-of-{getpass.getuser()}"
    )
    os.makedirs(path, exist_ok=True)
    return path


def containers(client: httpx.Client, *labels: str) -> list[dict[str, Any]]:
    """Containers (running or not) with all of ``labels`` (``key`` or ``key=value``)."""
    response = client.get(
        "/containers/json", params={"all": "1", "filters": json.dumps({"label": list(labels)})}
    )
    response.raise_for_status()
    return list(response.json())


def assert_no_containers(client: httpx.Client, *labels: str, timeout: float = 10.0) -> None:
    """Wait until no container has ``labels`` (default: this process's runners)."""
    labels = labels or (f"{LABEL_PARENT}={process_key()}",)
    deadline = time.monotonic() + timeout
    while True:
        left = containers(client, *labels)
        if not left:
            return
        if time.monotonic() > deadline:
            names = [(c["Names"], c["State"], c["Status"]) for c in left]
            raise AssertionError(f"runner containers left after {timeout:g}s: {names}")
        time.sleep(0.1)


def backend_factory(stacks: Any) -> Callable[[], flame.Backend]:
    """The ``docker`` entry of ``conftest.PLATFORMS``."""
    client = engine()
    stacks.session.callback(client.close)
    name = image(client)
    share = share_dir()
    stacks.module.callback(assert_no_containers, client)

    def make() -> flame.Backend:
        return flame.DockerBackend(
            name,
            network="host",
            app="helpers",
            mounts=[{"Type": "bind", "Source": share, "Target": share}],
            extra_config={"HostConfig": {"PidMode": "host"}},
        )

    return make
