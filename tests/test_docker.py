"""DockerBackend: its options and create request (pure), then its behaviour on a real engine.

The first part needs no engine. The rest runs on the real Docker engine at ``DOCKER_HOST``
with the image ``FLAME_TEST_DOCKER_IMAGE`` (``.ci/tier-docker`` starts both) and skips,
saying why, without them. Runners there import this module by name (the image holds
``tests/``), so the functions they run live at its top level. Every test checks that it
leaves no container behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import flame
import flame.backends.docker as docker_module
from flame import BootError, RunnerLaunch
from flame.backends import backend_by_name
from flame.backends.docker import (
    LABEL_PARENT,
    LABEL_POOL,
    LABEL_RUNNER,
    DockerBackend,
    container_id_candidates,
    describe_status,
    process_alive,
    process_key,
)
from helpers import pid_alive, wait_until
from helpers.parent.callers import Caller
from helpers.runner import pool_work as ph
from platforms.docker import assert_no_containers, containers, engine, image, share_dir

TESTS_DIR = str(Path(__file__).parent)
EXAMPLE_DIR = Path(__file__).parent.parent / "examples" / "docker"
SLEEPER = {"Entrypoint": ["python3", "-c", "import time; time.sleep(600)"]}  # never dials in


# -- runs on runners ---------------------------------------------------------------------------
def facts() -> dict[str, Any]:
    """What a runner sees of its container."""
    parent = flame.parent()
    assert parent is not None
    with open("/proc/self/cgroup") as f:
        ids = container_id_candidates(f.read(), "", "")

    def cgroup(*names: str) -> str | None:
        for name in names:
            with contextlib.suppress(OSError), open(name) as f:
                return f.read().strip()
        return None

    return {
        "backend": parent.backend,
        "addresses": [list(a) for a in parent.addresses],
        "container": ids[0] if ids else None,
        "env": dict(os.environ),
        "memory_limit": cgroup(
            "/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"
        ),
        "cpu_quota": cgroup("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu.max"),
        "pid": os.getpid(),
    }


def burn(seconds: float) -> float:
    """Spin two threads for ``seconds`` of wall time; return the CPU seconds they got."""
    cpu0 = time.process_time()
    end = time.monotonic() + seconds

    def spin() -> None:
        while time.monotonic() < end:
            pass

    threads = [threading.Thread(target=spin) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.process_time() - cpu0


def allocate(mb: int) -> int:
    blocks = [bytearray(1024 * 1024) for _ in range(mb)]
    for b in blocks:
        b[::4096] = b"x" * len(b[::4096])
    return len(blocks)


def write_file(path: str, text: str) -> str:
    Path(path).write_text(text)
    return path


# -- no engine needed ----------------------------------------------------------------------------
def launch(runner_id: str = "p-1-abc123") -> RunnerLaunch:
    return RunnerLaunch(runner_id=runner_id, pool="p", env={"FLAME_PARENT": "c2VjcmV0"})


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"image": ""}, "image"),
        ({"cpus": 0}, "cpus"),
        ({"cpus": True}, "cpus"),
        ({"memory_mb": 2}, "memory_mb"),
        ({"memory_mb": 1.5}, "memory_mb"),
        ({"gpus": 0}, "gpus"),
        ({"gpus": "some"}, "gpus"),
        ({"env": {"FLAME_PARENT": "x"}}, "FLAME_PARENT"),
        ({"env": {"A=B": "x"}}, "env"),
        ({"env": {"A": 1}}, "env"),
        ({"labels": {"flame-py.pool": "x"}}, "flame-py"),
        ({"mounts": "/a:/b"}, "mounts"),
        ({"python": ""}, "python"),
        ({"extra_config": {"Image": "x"}}, "Image"),
        ({"extra_config": {"Env": []}}, "env="),
        ({"extra_config": {"HostConfig": {"AutoRemove": False}}}, "AutoRemove"),
        ({"extra_config": {"HostConfig": {"Memory": 1}}}, "memory_mb="),
        ({"extra_config": {"HostConfig": {"NetworkMode": "host"}}}, "network="),
        ({"host": "ssh://me@box"}, "not supported"),
        ({"host": "https://box:2376"}, "not supported"),
        ({"host": "unix://relative.sock"}, "absolute"),
    ],
)
def test_invalid_options_are_value_errors_naming_the_option(
    options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        DockerBackend(**options)


def test_tls_engines_are_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_TLS_VERIFY", "1")
    with pytest.raises(ValueError, match="ssh -L"):
        DockerBackend("app", host="tcp://box:2376")


def test_host_defaults_to_docker_host_then_the_standard_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    assert DockerBackend("app").host == "tcp://127.0.0.1:2375"
    monkeypatch.delenv("DOCKER_HOST")
    assert DockerBackend("app").host == "unix:///var/run/docker.sock"
    assert isinstance(backend_by_name("docker"), DockerBackend)
    assert "docker" in flame.backends.BACKEND_NAMES


def test_without_httpx_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docker_module, "httpx", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'flame-py[docker]'")):
        DockerBackend("app")


def test_create_request_shape() -> None:
    backend = DockerBackend(
        "app:1",
        env={"DATABASE_URL": "pg://db"},
        labels={"team": "video"},
        cpus=1.5,
        memory_mb=512,
        gpus=2,
        mounts=[{"Type": "bind", "Source": "/data", "Target": "/data"}],
        python="/venv/bin/python",
        extra_config={"User": "app", "HostConfig": {"PidsLimit": 64}},
    )
    body = backend.container_config(launch(), image="app:1", network="net1")
    assert body["Image"] == "app:1"
    assert body["Entrypoint"] == [""]
    assert body["Cmd"] == ["/venv/bin/python", "-m", "flame", "runner"]
    assert sorted(body["Env"]) == ["DATABASE_URL=pg://db", "FLAME_PARENT=c2VjcmV0"]
    assert body["User"] == "app"
    labels = body["Labels"]
    assert labels["team"] == "video"
    assert labels[LABEL_POOL] == "p"
    assert labels[LABEL_RUNNER] == "p-1-abc123"
    assert labels[LABEL_PARENT] == process_key()
    hc = body["HostConfig"]
    assert hc["AutoRemove"] is True
    assert hc["NetworkMode"] == "net1"
    assert hc["NanoCpus"] == 1_500_000_000
    assert hc["Memory"] == hc["MemorySwap"] == 512 * 1024 * 1024
    assert hc["DeviceRequests"] == [{"Driver": "", "Count": 2, "Capabilities": [["gpu"]]}]
    assert hc["Mounts"] == [{"Type": "bind", "Source": "/data", "Target": "/data"}]
    assert hc["PidsLimit"] == 64
    # the entrypoint may be put back (a wrapper such as tini), the command stays flame's
    wrapped = DockerBackend("app", extra_config={"Entrypoint": ["tini", "--"]})
    body = wrapped.container_config(launch(), image="app", network="bridge")
    assert body["Entrypoint"] == ["tini", "--"]
    assert body["Cmd"] == ["python3", "-m", "flame", "runner"]
    assert (
        DockerBackend("a", gpus="all").container_config(launch(), image="a", network="n")[
            "HostConfig"
        ]["DeviceRequests"][0]["Count"]
        == -1
    )
    ids = DockerBackend("a", gpus=["GPU-1"]).container_config(launch(), image="a", network="n")
    assert ids["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ["GPU-1"]


def test_repr_shows_env_keys_not_values() -> None:
    text = repr(DockerBackend("app", env={"DATABASE_URL": "pg://user:pw@db"}))
    assert "DATABASE_URL" in text
    assert "pw@db" not in text


def test_the_parent_container_id_is_found_in_cgroup_mountinfo_or_hostname() -> None:
    cid = "4f" * 32
    other = "ab" * 32
    v1 = f"12:memory:/docker/{cid}\n11:pids:/docker/{cid}\n"
    systemd = f"0::/system.slice/docker-{cid}.scope\n"
    mountinfo = (
        f"701 690 0:50 /var/lib/docker/containers/{other}/resolv.conf /etc/resolv.conf rw - "
        "ext4 /dev/vda rw\n"
        "702 690 0:50 / / rw - overlay overlay rw\n"
    )
    assert container_id_candidates(v1, "", "web") == [cid]
    assert container_id_candidates(systemd, "", "web") == [cid]
    assert container_id_candidates("0::/\n", mountinfo, cid[:12]) == [other, cid[:12]]
    assert container_id_candidates("0::/\n", "", "my-laptop") == []


def test_exit_statuses_read_as_text() -> None:
    assert describe_status(137) == "killed by SIGKILL"
    assert describe_status(143) == "killed by SIGTERM"
    assert describe_status(205) == "exited with code 205 (lost its parent)"
    assert describe_status(1) == "exited with code 1"


def test_parent_identity_tells_a_live_process_from_a_dead_one() -> None:
    assert process_alive(process_key()) is True
    boot, ns, _pid, _start = process_key().split(":")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert process_alive(f"{boot}:{ns}:{dead.pid}:1") is False
    assert process_alive(f"{boot}:{ns}:{os.getpid()}:1") is False  # pid reused: other start
    assert process_alive(f"other-boot:{ns}:{os.getpid()}:1") is None  # another machine
    assert process_alive("garbage") is None


# -- on a real engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api() -> Iterator[httpx.Client]:
    """The real engine (the module's tests skip without it); no container of this process
    may outlive the module."""
    client = engine()
    try:
        yield client
        assert_no_containers(client)
    finally:
        client.close()


@pytest.fixture(scope="module")
def test_image(api: httpx.Client) -> str:
    return image(api)


@pytest.fixture
def share() -> dict[str, Any]:
    path = share_dir()
    return {"Type": "bind", "Source": path, "Target": path}


@pytest.fixture
def pools() -> Iterator[Callable[..., flame.Pool]]:
    """Makes pools that are stopped at the end of the test."""
    made: list[flame.Pool] = []

    def make(name: str, backend: flame.Backend, **options: Any) -> flame.Pool:
        options.setdefault("max", 1)
        p = flame.Pool(f"{name}-{uuid.uuid4().hex[:6]}", backend=backend, **options)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def inspect(api: httpx.Client, container: str) -> dict[str, Any]:
    response = api.get(f"/containers/{container}/json")
    response.raise_for_status()
    return dict(response.json())


def pool_containers(api: httpx.Client, pool: flame.Pool) -> list[dict[str, Any]]:
    return containers(api, f"{LABEL_POOL}={pool.name}")


@pytest.mark.timeout(60)
def test_a_call_runs_in_a_container_of_the_image_with_labels_limits_and_only_the_env_given(
    api: httpx.Client,
    test_image: str,
    pools: Callable[..., flame.Pool],
    share: dict[str, Any],
    tmp_path: Path,
) -> None:
    backend = DockerBackend(
        test_image,
        network="host",
        app="helpers",
        env={"GREETING": "hello"},
        labels={"team": "video"},
        cpus=0.5,
        memory_mb=96,
        mounts=[share],
        extra_config={"HostConfig": {"PidsLimit": 100}},
    )
    pool = pools("facts", backend)
    seen = flame.call(pool, facts)
    assert seen["backend"] == "docker"
    assert seen["addresses"][0][0] == "127.0.0.1"
    (c,) = pool_containers(api, pool)
    assert seen["container"] == c["Id"]
    doc = inspect(api, c["Id"])
    assert doc["Image"] == inspect_image(api, test_image)
    labels = doc["Config"]["Labels"]
    assert labels["team"] == "video"
    assert labels[LABEL_POOL] == pool.name
    assert labels[LABEL_RUNNER].startswith(pool.name)
    assert labels[LABEL_PARENT] == process_key()
    hc = doc["HostConfig"]
    assert hc["AutoRemove"] is True
    assert (hc["NanoCpus"], hc["Memory"], hc["PidsLimit"]) == (500_000_000, 96 << 20, 100)
    assert doc["Config"]["Cmd"] == ["python3", "-m", "flame", "runner"]
    # only the env given (and what the image sets) reaches the runner; FLAME_PARENT is
    # removed by the runner at start
    image_env = {e.split("=", 1)[0] for e in inspect_image_config(api, test_image)["Env"]}
    assert set(seen["env"]) - image_env - {"HOSTNAME", "HOME"} == {"GREETING"}
    assert "FLAME_PARENT" not in seen["env"]
    # the limits, as the runner's cgroup has them
    assert int(seen["memory_limit"]) == 96 << 20
    quota = seen["cpu_quota"].split()
    assert int(quota[0]) * 2 == int(quota[1]) if len(quota) == 2 else int(quota[0]) > 0
    # the mount
    written = flame.call(pool, write_file, str(tmp_path / "from-runner"), "hi")
    assert Path(written).read_text() == "hi"
    pool.stop()
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}")


def inspect_image(api: httpx.Client, name: str) -> str:
    response = api.get(f"/images/{name}/json")
    response.raise_for_status()
    return str(response.json()["Id"])


def inspect_image_config(api: httpx.Client, name: str) -> dict[str, Any]:
    response = api.get(f"/images/{name}/json")
    response.raise_for_status()
    return dict(response.json()["Config"])


@pytest.mark.timeout(60)
def test_limits_are_enforced_cpu_time_and_an_oom_kill(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool]
) -> None:
    backend = DockerBackend(test_image, network="host", app="helpers", cpus=0.5, memory_mb=96)
    pool = pools("limits", backend, idle_shutdown_after=None)
    cpu = flame.call(pool, burn, 2.0, timeout=30)
    # two spinning threads for 2 s of wall time get at most half a CPU: about 1 s
    assert cpu < 1.5, f"{cpu:.2f} CPU seconds in 2 s with cpus=0.5"
    with pytest.raises(flame.RunnerLost) as info:
        flame.call(pool, allocate, 256, timeout=30)
    assert "SIGKILL" in str(info.value)
    assert "out of memory" in str(info.value)
    assert flame.call(pool, allocate, 8, timeout=30) == 8  # a fresh runner
    pool.stop()
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}")


@pytest.mark.timeout(60)
def test_bridge_networks_from_the_host_dial_the_gateway(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool]
) -> None:
    with user_network(api) as network:
        for name in ("bridge", network):
            backend = DockerBackend(test_image, network=name, app="helpers")
            pool = pools("bridge", backend)
            seen = flame.call(pool, facts)
            doc = api.get(f"/networks/{name}").json()
            gateway = next(
                (c.get("Gateway") for c in doc["IPAM"]["Config"] if c.get("Gateway")), None
            )
            (host, _port) = seen["addresses"][0]
            assert host == backend.listen_host()
            if gateway is not None:  # the default bridge does not record its gateway
                assert host == gateway
            (c,) = pool_containers(api, pool)
            assert set(inspect(api, c["Id"])["NetworkSettings"]["Networks"]) == {name}
            pool.stop()
            assert_no_containers(api, f"{LABEL_POOL}={pool.name}")


@pytest.mark.timeout(60)
def test_killing_a_runner_container_mid_call_fails_the_call_and_the_pool_goes_on(
    api: httpx.Client,
    test_image: str,
    pools: Callable[..., flame.Pool],
    share: dict[str, Any],
    tmp_path: Path,
) -> None:
    backend = DockerBackend(test_image, network="host", app="helpers", mounts=[share])
    pool = pools("kill", backend, idle_shutdown_after=None)
    entered = tmp_path / "entered"
    caller = Caller(flame.call, pool, ph.gated, str(entered), str(tmp_path / "gate"), timeout=30)
    wait_until(entered.exists, 20)
    (c,) = pool_containers(api, pool)
    api.post(f"/containers/{c['Id']}/kill", params={"signal": "SIGKILL"}).raise_for_status()
    err = caller.failure(15)
    assert isinstance(err, flame.RunnerLost), repr(err)
    assert "SIGKILL" in str(err)
    assert c["Id"][:12] in str(err)
    seen = flame.call(pool, facts, timeout=30)
    assert seen["container"] != c["Id"]
    pool.stop()
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}")


PARENT = """
import json, sys, time
sys.path.insert(0, {tests!r})
import flame
from flame.backends.docker import process_key
from helpers.runner import pool_work as ph
backend = flame.DockerBackend({image!r}, network="host", app="helpers", extra_config={extra!r})
pool = flame.Pool("orphans", min={min}, max=2, backend=backend, boot_timeout=60)
if {min}:
    pool.start()
pool.cast(ph.hold, 60)  # with min=0, this boots a runner in the background
print(json.dumps({{"key": process_key()}}), flush=True)
time.sleep(600)
"""


def start_parent(test_image: str, *, min: int, extra: dict[str, Any]) -> tuple[Any, str]:
    code = PARENT.format(tests=TESTS_DIR, image=test_image, min=min, extra=extra)
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert parent.stdout is not None
    with parent.stdout:
        line = parent.stdout.readline()
    assert line, "the parent process died"
    return parent, str(json.loads(line)["key"])


@pytest.mark.timeout(60)
def test_a_sigkilled_parents_runners_exit_by_themselves_and_are_removed(
    api: httpx.Client, test_image: str
) -> None:
    parent, key = start_parent(test_image, min=2, extra={})
    try:
        wait_until(lambda: len(containers(api, f"{LABEL_PARENT}={key}")) == 2, 20)
    finally:
        parent.kill()
        parent.wait()
    # no one removes them: the runners notice the lost parent and exit, AutoRemove does the rest
    assert_no_containers(api, f"{LABEL_PARENT}={key}", timeout=20)


@pytest.mark.timeout(60)
def test_a_pools_start_removes_the_containers_of_parents_that_are_gone(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool]
) -> None:
    # a parent dies while its runner (one that never dials in) boots: nothing ends that one
    parent, key = start_parent(test_image, min=0, extra=SLEEPER)
    try:
        wait_until(
            lambda: [c["State"] for c in containers(api, f"{LABEL_PARENT}={key}")] == ["running"],
            20,
        )
    finally:
        parent.kill()
        parent.wait()
    # and one that was created but never started
    (left,) = containers(api, f"{LABEL_PARENT}={key}")
    labels = dict(left["Labels"])
    created = api.post(
        "/containers/create",
        json={"Image": test_image, "Cmd": ["python3", "-c", "pass"], "Labels": labels},
    )
    created.raise_for_status()
    assert len(containers(api, f"{LABEL_PARENT}={key}")) == 2
    # a live parent's containers stay
    alive = DockerBackend(test_image, network="host", app="helpers", extra_config=SLEEPER)
    booting = pools("alive", alive, boot_timeout=60)
    Caller(flame.call, booting, ph.pid, timeout=60)
    wait_until(lambda: pool_containers(api, booting), 20)

    pool = pools("sweeper", DockerBackend(test_image, network="host", app="helpers"), min=1)
    pool.start()
    assert containers(api, f"{LABEL_PARENT}={key}") == []
    assert len(pool_containers(api, booting)) == 1


@pytest.mark.timeout(60)
def test_an_image_that_does_not_exist_is_a_boot_error_in_seconds(
    api: httpx.Client, pools: Callable[..., flame.Pool]
) -> None:
    backend = DockerBackend("flame-no-such-image:none", network="host")
    pool = pools("no-image", backend, boot_timeout=30)
    started = time.monotonic()
    with pytest.raises(BootError, match="No such image: flame-no-such-image:none"):
        flame.call(pool, ph.pid, timeout=30)
    assert time.monotonic() - started < 15  # told by the engine, not by boot_timeout=30
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}", timeout=0)


@pytest.mark.timeout(60)
def test_a_python_that_does_not_run_in_the_image_is_a_boot_error_with_the_engines_words(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool]
) -> None:
    backend = DockerBackend(test_image, network="host", python="python9")
    pool = pools("no-python", backend, boot_timeout=30)
    started = time.monotonic()
    with pytest.raises(BootError, match=r'exec: \\?"python9\\?": executable file not found'):
        flame.call(pool, ph.pid, timeout=30)
    assert time.monotonic() - started < 15  # told by the engine, not by boot_timeout=30
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}")


@pytest.mark.timeout(60)
def test_an_image_without_flame_is_a_boot_error_with_the_containers_last_output(
    api: httpx.Client, pools: Callable[..., flame.Pool]
) -> None:
    base = image(api, "FLAME_TEST_DOCKER_BASE_IMAGE")
    pool = pools("no-flame", DockerBackend(base, network="host"), boot_timeout=30)
    started = time.monotonic()
    with pytest.raises(BootError) as info:
        flame.call(pool, ph.pid, timeout=30)
    assert time.monotonic() - started < 15  # told by the engine, not by boot_timeout=30
    text = str(info.value)
    assert "exited with code 1 before connecting" in text
    assert "No module named flame" in text
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}")


@pytest.mark.timeout(60)
def test_gpus_are_device_requests_and_an_engine_without_them_says_so(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool]
) -> None:
    pool = pools("gpus", DockerBackend(test_image, network="host", gpus=1))
    with pytest.raises(BootError, match="could not select device driver"):
        flame.call(pool, ph.pid, timeout=30)
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}")


@pytest.mark.timeout(60)
def test_a_boot_that_times_out_or_is_abandoned_removes_its_container(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool]
) -> None:
    backend = DockerBackend(test_image, network="host", extra_config=SLEEPER)
    timed_out = pools("boot-timeout", backend, boot_timeout=3)
    with pytest.raises(BootError, match="did not connect within boot_timeout=3s"):
        flame.call(timed_out, ph.pid, timeout=30)
    assert_no_containers(api, f"{LABEL_POOL}={timed_out.name}")
    # a pool stopped while its runner boots
    backend = DockerBackend(test_image, network="host", extra_config=SLEEPER)
    abandoned = pools("abandoned", backend, boot_timeout=60)
    caller = Caller(flame.call, abandoned, ph.pid, timeout=60)
    wait_until(lambda: pool_containers(api, abandoned), 20)
    abandoned.stop()
    assert isinstance(caller.failure(10), flame.FlameError)
    assert_no_containers(api, f"{LABEL_POOL}={abandoned.name}")


# -- a proxy on the engine's socket that loses answers -------------------------------------------
class LossyProxy:
    """A proxy in front of the engine's socket that loses the answer to chosen requests.

    It listens on a unix socket at ``path``, or on TCP (``path=None``) like an engine
    exposed on ``tcp://``.

    ``lose("POST", "/containers/create", forward=True)`` forwards the next such request to
    the engine, then cuts the client's connection when the answer begins (the engine did
    the work; the client never hears of it); ``forward=False`` cuts it without forwarding.
    ``delay(...)`` holds the answer back for a while instead.
    """

    def __init__(self, upstream: str, path: str | None, bind: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.path = path  # None: listen on TCP, <bind>:<self.port>
        self.bind = bind
        self.port = 0
        self.rules: list[tuple[str, str, str, float]] = []
        self.hits: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> LossyProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def lose(self, method: str, path: str, *, forward: bool) -> None:
        self.rules.append((method, path, "lose" if forward else "cut", 0.0))

    def delay(self, method: str, path: str, seconds: float) -> None:
        self.rules.append((method, path, "delay", seconds))

    async def _start(self) -> None:
        if self.path is not None:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        else:
            self._server = await asyncio.start_server(self._serve, self.bind, 0)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _rule(self, head: bytes) -> tuple[str, float] | None:
        method, target = head.split(b" ", 2)[:2]
        for i, (m, p, action, seconds) in enumerate(self.rules):
            if method.decode() == m and p in target.decode().split("?")[0]:
                del self.rules[i]
                self.hits.append(f"{action} {m} {p}")
                return action, seconds
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._tasks.add(me)
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)
        self._writers.append(up_writer)
        pending: list[tuple[str, float]] = []  # what to do with the next answers, in order

        async def answers() -> None:
            while data := await up_reader.read(65536):
                if pending:
                    action, seconds = pending.pop(0)
                    if action == "lose":
                        return
                    await asyncio.sleep(seconds)
                writer.write(data)
                await writer.drain()

        relay = asyncio.ensure_future(answers())
        self._tasks.add(relay)
        requests = asyncio.ensure_future(self._requests(reader, up_writer, pending))
        self._tasks.add(requests)
        try:
            await asyncio.wait({relay, requests}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, requests):
                task.cancel()
            await asyncio.gather(relay, requests, return_exceptions=True)
            writer.transport.abort()
            up_writer.transport.abort()
            self._tasks.discard(me)

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        pending: list[tuple[str, float]],
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                rule = self._rule(head)
                if rule is not None and rule[0] == "cut":
                    return
                if rule is not None:
                    pending.append(rule)
                up_writer.write(head + body)
                await up_writer.drain()
        await asyncio.Event().wait()  # the client is done sending: keep relaying answers


@pytest.fixture
def proxy(api: httpx.Client, tmp_path: Path) -> Iterator[LossyProxy]:
    upstream = os.environ["DOCKER_HOST"][len("unix://") :]
    with LossyProxy(upstream, str(tmp_path / "proxy.sock")) as p:
        yield p


@pytest.mark.timeout(60)
def test_an_engine_on_tcp_works_and_a_remote_one_needs_parent_host(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool]
) -> None:
    upstream = os.environ["DOCKER_HOST"][len("unix://") :]
    with LossyProxy(upstream, None) as tcp, LossyProxy(upstream, None, "127.0.0.2") as other:
        host = f"tcp://127.0.0.1:{tcp.port}"
        pool = pools("tcp", DockerBackend(test_image, host=host, network="host", app="helpers"))
        assert flame.call(pool, facts, timeout=30)["addresses"][0][0] == "127.0.0.1"
        pool.stop()
        # an engine at an address that is not named as this machine's: flame cannot tell
        # how runners would reach the parent
        remote = DockerBackend(test_image, host=f"tcp://127.0.0.2:{other.port}")
        with pytest.raises(ValueError, match="pass parent_host="):
            remote.validate()
        told = DockerBackend(
            test_image, host=f"tcp://127.0.0.2:{other.port}", parent_host="127.0.0.1"
        )
        assert told.advertise_hosts() == ["127.0.0.1"]
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}")


@pytest.mark.timeout(60)
def test_a_lost_create_answer_is_resolved_by_label(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool], proxy: LossyProxy
) -> None:
    host = f"unix://{proxy.path}"
    backend = DockerBackend(test_image, host=host, network="host", app="helpers")
    pool = pools("lost-create", backend)
    proxy.lose("POST", "/containers/create", forward=True)  # created, answer lost
    seen = flame.call(pool, facts, timeout=30)
    assert proxy.hits == ["lose POST /containers/create"]
    (c,) = pool_containers(api, pool)
    assert seen["container"] == c["Id"]  # the container found by its label was adopted
    pool.stop()
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}")

    backend = DockerBackend(test_image, host=host, network="host", app="helpers")
    pool = pools("cut-create", backend)
    proxy.lose("POST", "/containers/create", forward=False)  # never reached the engine
    with pytest.raises(BootError, match="lost the Docker engine's answer"):
        flame.call(pool, ph.pid, timeout=30)
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}", timeout=0)
    time.sleep(1.1)  # the pool does not boot again within 1 s of a failed boot
    assert isinstance(flame.call(pool, ph.pid, timeout=30), int)  # and then it boots
    pool.stop()
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}")


@pytest.mark.timeout(60)
def test_a_boot_abandoned_during_create_removes_the_container_once_created(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool], proxy: LossyProxy
) -> None:
    backend = DockerBackend(test_image, host=f"unix://{proxy.path}", network="host")
    pool = pools("slow-create", backend, boot_timeout=1)
    proxy.delay("POST", "/containers/create", 3.0)
    with pytest.raises(BootError, match="boot_timeout=1s"):
        flame.call(pool, ph.pid, timeout=30)
    wait_until(lambda: pool_containers(api, pool), 10)  # the create went through, late...
    pool.stop()  # ...and closing the backend waits for its removal
    assert_no_containers(api, f"{LABEL_POOL}={pool.name}", timeout=0)


# -- the parent in a container ----------------------------------------------------------------
IN_CONTAINER = """
import json, os, httpx, flame
import test_docker
backend = flame.DockerBackend(app="helpers")
with flame.Pool("in-container", max=1, backend=backend) as pool:
    seen = flame.call(pool, test_docker.facts)
    where = backend._where
    api = httpx.Client(transport=httpx.HTTPTransport(uds="/var/run/docker.sock"),
                       base_url="http://docker/v1.41")
    runner = api.get("/containers/" + seen["container"] + "/json").json()
    me = api.get("/containers/" + where.parent_container + "/json").json()
print(json.dumps({"image": where.image, "network": where.network,
                  "ip": me["NetworkSettings"]["Networks"][where.network]["IPAddress"],
                  "advertise": list(where.advertise), "parent": where.parent_container,
                  "runner_image": runner["Image"],
                  "runner_networks": sorted(runner["NetworkSettings"]["Networks"]),
                  "dialled": seen["addresses"][0][0]}))
"""


@contextlib.contextmanager
def user_network(api: httpx.Client) -> Iterator[str]:
    name = f"flame-test-{uuid.uuid4().hex[:8]}"
    api.post("/networks/create", json={"Name": name}).raise_for_status()
    try:
        yield name
    finally:
        api.delete(f"/networks/{name}")


def run_parent_container(
    api: httpx.Client, image: str, cmd: list[str] | None, network: str
) -> tuple[int, str, dict[str, Any]]:
    """Run a parent container (the engine's socket mounted) to its end: (status, output,
    its inspect document). It is removed afterwards, and so must be its runners."""
    socket_path = os.environ["DOCKER_HOST"][len("unix://") :]
    name = f"flame-test-parent-{uuid.uuid4().hex[:8]}"
    body: dict[str, Any] = {
        "Image": image,
        "HostConfig": {"NetworkMode": network, "Binds": [f"{socket_path}:/var/run/docker.sock"]},
    }
    if cmd is not None:
        body["Cmd"] = cmd
    try:
        created = api.post("/containers/create", params={"name": name}, json=body)
        created.raise_for_status()
        cid = created.json()["Id"]
        api.post(f"/containers/{cid}/start").raise_for_status()
        status = api.post(f"/containers/{cid}/wait", timeout=50).json()["StatusCode"]
        logs = api.get(f"/containers/{cid}/logs", params={"stdout": 1, "stderr": 1}).content
        return status, _demux(logs), inspect(api, cid)
    finally:
        api.delete(f"/containers/{name}", params={"force": "1"})
        assert_no_containers(api, LABEL_RUNNER, timeout=10)


@pytest.mark.timeout(60)
def test_a_host_network_parent_container_gets_host_network_runners_on_loopback(
    api: httpx.Client, test_image: str
) -> None:
    # its host name is the host's: the container is found by the id in its cgroup
    script = IN_CONTAINER.replace('["Networks"][where.network]["IPAddress"]', '["Networks"]')
    status, text, doc = run_parent_container(api, test_image, ["python3", "-c", script], "host")
    assert status == 0, text
    out = json.loads(text.strip().splitlines()[-1])
    assert out["parent"] == doc["Id"]
    assert out["network"] == "host"
    assert out["runner_networks"] == ["host"]
    assert out["advertise"] == ["127.0.0.1"] == [out["dialled"]]


@pytest.mark.timeout(60)
def test_a_parent_in_a_container_defaults_to_its_own_image_and_network(
    api: httpx.Client, test_image: str
) -> None:
    with user_network(api) as network:
        status, text, doc = run_parent_container(
            api, test_image, ["python3", "-c", IN_CONTAINER], network
        )
    assert status == 0, text
    out = json.loads(text.strip().splitlines()[-1])
    assert out["parent"] == doc["Id"]
    assert out["image"] == out["runner_image"] == doc["Image"]
    assert out["network"] == network
    assert out["runner_networks"] == [network]
    assert out["ip"]
    assert out["advertise"] == [out["ip"]] == [out["dialled"]]


@pytest.mark.timeout(90)
def test_the_compose_example_runs_its_calls_in_containers_of_its_own_image(
    api: httpx.Client, test_image: str
) -> None:
    # examples/docker, built on the test image instead of python:3.11-slim (no registry)
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name in ("Dockerfile", "app.py"):
            tar.add(Path(EXAMPLE_DIR, name), arcname=name)
    tag = f"flame-example:{uuid.uuid4().hex[:8]}"
    built = api.post(
        "/build",
        params={"t": tag, "networkmode": "none", "buildargs": json.dumps({"BASE": test_image})},
        content=context.getvalue(),
        headers={"Content-Type": "application/x-tar"},
        timeout=60,
    )
    assert built.status_code == 200 and "errorDetail" not in built.text, built.text
    try:
        with user_network(api) as network:
            status, text, doc = run_parent_container(api, tag, None, network)
        assert status == 0, text
        lines = text.strip().splitlines()
        assert lines[-1] == "done", text
        runners = {line.rsplit(" ", 1)[-1].rstrip(")") for line in lines[:-1]}
        assert len(lines) == 7 and runners and doc["Config"]["Hostname"] not in runners, text
    finally:
        api.delete(f"/images/{tag}", params={"force": "1"})


def _demux(raw: bytes) -> str:
    out, i = [], 0
    while i + 8 <= len(raw):
        size = int.from_bytes(raw[i + 4 : i + 8], "big")
        out.append(raw[i + 8 : i + 8 + size])
        i += 8 + size
    return b"".join(out).decode(errors="replace")


@pytest.mark.timeout(90)
def test_check_backend_passes_on_a_bridge(api: httpx.Client, test_image: str) -> None:
    from flame.testing import check_backend

    check_backend(DockerBackend(test_image, network="bridge", app="helpers"))
    assert_no_containers(api)


@pytest.mark.timeout(60)
def test_runner_pids_are_host_pids_with_pid_mode_host(
    api: httpx.Client, test_image: str, pools: Callable[..., flame.Pool]
) -> None:
    # what tests/platforms/docker.py relies on
    backend = DockerBackend(
        test_image, network="host", app="helpers", extra_config={"HostConfig": {"PidMode": "host"}}
    )
    pool = pools("pids", backend)
    pid = flame.call(pool, ph.pid)
    assert pid != os.getpid() and pid_alive(pid)
    pool.stop()
    wait_until(lambda: not pid_alive(pid), 10)
