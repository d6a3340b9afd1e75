"""FlyBackend against the Fly Machines API emulator: real HTTP, real machine processes.

The first part drives the backend directly (``boot``/``wait``/``stop``) with small commands
instead of a runner, so it needs nothing of the pool; the emulator's own semantics are
checked with plain httpx. The last part runs whole pools on the emulator: calls computed in
runner processes that the emulator started as "machines".
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

import flame
import flame.backends.fly as fly_module
from flame import BootError, RunnerLaunch
from flame._exits import ExitCode
from flame._parent import LaunchInfo
from flame.backends.fly import FlyBackend, FlyMachineHandle, FlyRateLimits
from flame.testing import _fly_api
from flame.testing.fly import FlyMachinesEmulator
from helpers import wait_until

T = TypeVar("T")

TOKEN = "fly-test-token-3f9a1c"
APP = "thumbs"
IMAGE = "registry.fly.io/thumbs:deployment-01"
SECRET = "c2VjcmV0LXJ1bm5lci1ibG9i"  # stands for FLAME_PARENT
SLEEP = ("python", "-c", "import time; time.sleep(60)")

# Machine processes import flame (and, for the end-to-end tests, this module) the way a
# runner in the image would: the image holds this same code, so share sys.path with them.
IMAGE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
# Fly's rate limits, faster, on both sides (tests/test_fly_pacing.py uses the real ones)
FAST = FlyRateLimits().scaled(50)


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture
def emulator() -> Iterator[FlyMachinesEmulator]:
    with FlyMachinesEmulator(
        token=TOKEN, app=APP, region="ams", extra_env=IMAGE_ENV, rate_limits=FAST
    ) as emu:
        yield emu


def make_backend(emulator: FlyMachinesEmulator, **options: Any) -> FlyBackend:
    settings: dict[str, Any] = {
        "host": emulator.url,
        "token": TOKEN,
        "app": APP,
        "image": IMAGE,
        "region": "ams",
        "advertise_host": "127.0.0.1",
        "retry_backoff": 0.01,
        "cpus": 2,
        "rate_limits": FAST,
    }
    settings.update(options)
    return FlyBackend(**settings)


@asynccontextmanager
async def opened(backend: FlyBackend) -> AsyncIterator[FlyBackend]:
    try:
        yield backend
    finally:
        await backend.aclose()


def launch(argv: tuple[str, ...] = SLEEP, runner_id: str = "r1") -> RunnerLaunch:
    return RunnerLaunch(runner_id=runner_id, pool="thumbs", env={"FLAME_PARENT": SECRET}, argv=argv)


def boot_and_stop(emulator: FlyMachinesEmulator, **options: Any) -> str:
    """Boot one machine with a backend of ``options``, stop it; its id."""

    async def scenario() -> str:
        async with opened(make_backend(emulator, **options)) as backend:
            handle = await backend.boot(launch())
            await handle.stop()
            return handle.id

    return run(scenario())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# -- configuration --------------------------------------------------------------------------


def test_settings_come_from_the_fly_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", TOKEN)
    monkeypatch.setenv("FLY_APP_NAME", "envapp")
    monkeypatch.setenv("FLY_IMAGE_REF", "registry.fly.io/envapp:1")
    monkeypatch.setenv("FLY_REGION", "fra")
    monkeypatch.setenv("FLY_PRIVATE_IP", "fdaa:0:1::2")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("FLY_VM_MEMORY_MB", raising=False)
    backend = FlyBackend()
    backend.validate()
    assert (backend.app, backend.image, backend.region) == (
        "envapp",
        "registry.fly.io/envapp:1",
        "fra",
    )
    assert (backend.cpu_kind, backend.cpus, backend.memory_mb, backend.host) == (
        "performance",
        2,
        4096,
        "https://api.machines.dev",
    )
    assert backend.skip_secrets is False
    assert backend.listen_host() == "::"
    assert list(backend.advertise_hosts()) == ["fdaa:0:1::2"]
    assert backend.name == "fly"


def test_missing_settings_name_option_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FLY_API_TOKEN", "FLY_APP_NAME", "FLY_IMAGE_REF", "FLY_PRIVATE_IP"):
        monkeypatch.delenv(var, raising=False)
    backend = FlyBackend()  # building it off Fly is fine: importing an app must not fail
    with pytest.raises(ValueError, match="token") as info:
        backend.validate()
    message = str(info.value)
    for part in ("token", "FLY_API_TOKEN", "app", "FLY_APP_NAME", "image", "FLY_IMAGE_REF"):
        assert part in message
    with pytest.raises(ValueError, match="FLY_APP_NAME"):
        run(FlyBackend(token="t", image="i", advertise_host="::1").boot(launch()))
    with pytest.raises(ValueError, match="FLY_PRIVATE_IP"):
        FlyBackend(token="t", app="a", image="i").advertise_hosts()


def test_the_default_size_is_one_fly_accepts_on_any_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    for cpu_count in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64, 96, 128):
        monkeypatch.setattr(os, "cpu_count", lambda n=cpu_count: n)
        for parent_memory in (None, "256", "1024", "2048", "8192", "65536", "junk"):
            if parent_memory is None:
                monkeypatch.delenv("FLY_VM_MEMORY_MB", raising=False)
            else:
                monkeypatch.setenv("FLY_VM_MEMORY_MB", parent_memory)
            for cpu_kind in ("performance", "shared"):
                backend = FlyBackend(token=TOKEN, app=APP, image=IMAGE, cpu_kind=cpu_kind)
                guest = {"cpu_kind": cpu_kind, "cpus": backend.cpus, "memory_mb": backend.memory_mb}
                # judged by the emulator's own transcription of Fly's rules
                assert _fly_api.guest_problem(guest) is None, (cpu_count, parent_memory, guest)
                assert backend.cpus <= cpu_count
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setenv("FLY_VM_MEMORY_MB", "12288")
    assert FlyBackend(token=TOKEN, app=APP, image=IMAGE).memory_mb == 12288  # the parent's own
    monkeypatch.setenv("FLY_VM_MEMORY_MB", "1024")
    assert FlyBackend(token=TOKEN, app=APP, image=IMAGE).memory_mb == 8192  # brought in range
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert FlyBackend(token=TOKEN, app=APP, image=IMAGE).cpus == 1


def test_with_a_gpu_the_default_is_fly_gpu_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLY_VM_MEMORY_MB", raising=False)
    backend = FlyBackend(token=TOKEN, app=APP, image=IMAGE, gpu_kind="l40s")
    assert (backend.cpus, backend.memory_mb, backend.gpus) == (8, 32768, 1)


def test_the_backend_and_the_emulator_agree_on_every_size() -> None:
    """Two transcriptions of Fly's sizing rules (the backend's, the emulator's) say the same
    about every CPU kind, CPU count and memory size around the boundaries."""
    for kind in ("shared", "performance", "dedicated"):
        for cpus in range(1, 18):
            for memory in range(0, 8192 * 17 + 512, 128):
                guest = {"cpu_kind": kind, "cpus": cpus, "memory_mb": memory}
                refused = _fly_api.guest_problem(guest)
                try:
                    FlyBackend(
                        token=TOKEN,
                        app=APP,
                        image=IMAGE,
                        cpu_kind=kind,
                        cpus=cpus,
                        memory_mb=memory,
                    )
                except ValueError:
                    assert refused, guest
                else:
                    assert refused is None, guest


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        ({"cpus": 3}, "cpus=3 is not a size Fly offers: performance CPUs come in 1, 2, 4, 8 or 16"),
        ({"cpus": 6}, r"\(shared: 1, 2, 4, 6 or 8\)"),
        ({"cpu_kind": "shared", "cpus": 16}, "shared CPUs come in 1, 2, 4, 6 or 8"),
        ({"cpus": 4, "memory_mb": 4096}, "2048-8192 MiB per CPU, so 8192-32768 MiB for cpus=4"),
        ({"cpu_kind": "shared", "cpus": 1, "memory_mb": 4096}, "256-2048 MiB per CPU"),
        ({"cpus": 1, "memory_mb": 2100}, "in steps of 256"),
        ({"cpu_kind": "dedicated"}, "cpu_kind must be 'shared' or 'performance'"),
    ],
)
def test_a_size_fly_would_refuse_fails_at_construction_naming_the_rule(
    options: dict[str, Any], rule: str
) -> None:
    with pytest.raises(ValueError, match=rule):
        FlyBackend(token=TOKEN, app=APP, image=IMAGE, **options)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"memory_mb": 1000}, "memory_mb"),
        ({"cpus": 0}, "cpus"),
        ({"metadata": {"fly_process_group": "app"}}, "fly_process_group.*belong to Fly"),
        ({"metadata": {"fly_platform_version": "v2"}}, "fly_platform_version"),
        ({"metadata": {"flame_pool": "x"}}, "set by flame itself"),
        ({"stop_timeout": -1}, "stop_timeout"),
        ({"stop_timeout": 61}, "stop_timeout"),
        ({"skip_secrets": "yes"}, "skip_secrets"),
        ({"gpus": 2}, "gpus"),
        ({"host": "api.machines.dev"}, "host"),
        ({"max_boot_retries": -1}, "max_boot_retries"),
        ({"env": {"X": 1}}, "env"),
        ({"env": {"FLY_API_TOKEN": "x"}}, "FLY_API_TOKEN"),
        ({"env": {"SNEAKY": TOKEN}}, "token"),
        ({"env": {"FLAME_PARENT": "x"}}, "FLAME_PARENT"),
        ({"extra_config": {"auto_destroy": False, "env": {}}}, "auto_destroy, env"),
    ],
)
def test_invalid_options_fail_at_construction(options: dict[str, Any], option: str) -> None:
    with pytest.raises(ValueError, match=option) as info:
        FlyBackend(token=TOKEN, app=APP, image=IMAGE, **options)
    assert TOKEN not in str(info.value)


def test_repr_hides_the_token() -> None:
    backend = FlyBackend(token=TOKEN, app=APP, image=IMAGE, env={"DATABASE_URL": "pg://pw@db"})
    text = repr(backend)
    assert TOKEN not in text
    assert "pg://pw@db" not in text
    assert "<hidden>" in text
    assert "DATABASE_URL" in text


def test_without_httpx_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fly_module, "httpx", None)
    with pytest.raises(ImportError, match=r"pip install 'flame-py\[fly\]'"):
        FlyBackend(token=TOKEN, app=APP, image=IMAGE)


def test_machine_request_shape() -> None:
    backend = FlyBackend(
        token=TOKEN,
        app=APP,
        image=IMAGE,
        region="ams",
        advertise_host="fdaa::3",
        cpus=4,
        memory_mb=8192,
        gpu_kind="l40s",
        env={"DATABASE_URL": "pg://db"},
        init={"swap_size_mb": 512},
        services=[{"protocol": "tcp", "internal_port": 8080}],
        metadata={"team": "video"},
        mounts=[{"volume": "vol_123", "path": "/data"}],
        extra_config={"stop_config": {"signal": "SIGTERM"}},
    )
    body = backend.machine_request(launch(argv=("python", "-m", "flame", "runner")))
    assert body["name"].startswith(f"{APP}-flame-")
    assert body["region"] == "ams"
    config = body["config"]
    assert config["image"] == IMAGE
    assert config["guest"] == {
        "cpu_kind": "performance",
        "cpus": 4,
        "memory_mb": 8192,
        "gpu_kind": "l40s",
        "gpus": 1,
    }
    assert config["auto_destroy"] is True
    assert config["restart"] == {"policy": "no"}
    assert config["env"] == {"DATABASE_URL": "pg://db", "FLAME_PARENT": SECRET}
    assert config["init"] == {"cmd": ["python", "-m", "flame", "runner"], "swap_size_mb": 512}
    assert config["services"] == [{"protocol": "tcp", "internal_port": 8080}]
    assert config["mounts"] == [{"volume": "vol_123", "path": "/data"}]
    assert config["stop_config"] == {"signal": "SIGTERM"}
    meta = config["metadata"]
    assert meta["team"] == "video"
    assert (meta["flame_pool"], meta["flame_runner_id"], meta["flame_parent_ip"]) == (
        "thumbs",
        "r1",
        "fdaa::3",
    )
    assert TOKEN not in json.dumps(body)
    # Two machines never share a name.
    assert backend.machine_request(launch())["name"] != body["name"]


def test_init_exec_replaces_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLY_REGION", raising=False)
    backend = FlyBackend(
        token=TOKEN, app=APP, image=IMAGE, advertise_host="::1", init={"exec": ["/app/run"]}
    )
    body = backend.machine_request(launch())
    assert body["config"]["init"]["exec"] == ["/app/run"]
    assert "gpu_kind" not in body["config"]["guest"]
    assert "region" not in body  # Fly picks one


def test_backoff_doubles_with_jitter_and_honours_retry_after() -> None:
    backend = FlyBackend(token=TOKEN, app=APP, image=IMAGE, retry_backoff=1.0)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (9, 16.0)]:
        delays = [backend._backoff(attempt, None) for _ in range(50)]
        assert all(base * 0.5 <= d <= base for d in delays)
    assert backend._backoff(1, 7.0) >= 7.0
    assert backend._backoff(1, 3600.0) <= 32.0


# -- booting, HTTP behaviour -----------------------------------------------------------------


def test_boot_creates_one_machine_and_stop_destroys_it(emulator: FlyMachinesEmulator) -> None:
    async def scenario() -> FlyMachineHandle:
        async with opened(make_backend(emulator, env={"DATABASE_URL": "pg://db"})) as backend:
            handle = await backend.boot(launch())
            machine = emulator.machine(handle.id)
            assert machine.state == "started"
            assert machine.pid is not None
            assert pid_alive(machine.pid)
            await handle.stop()
            await handle.stop()  # idempotent
            await asyncio.gather(handle.stop(), handle.stop())
            return handle

    handle = run(scenario())
    machine = emulator.machine(handle.id)
    assert machine.state == "destroyed"
    assert machine.pid is not None
    emulator.wait_until(lambda: not pid_alive(machine.pid or 0), timeout=5)
    # a graceful stop (SIGTERM, then Fly's SIGKILL after the timeout) came first; the machine
    # stopped and auto_destroy removed it, so no forced destroy was needed
    assert machine.stop_request == {"signal": "SIGTERM", "timeout": 5.0}
    (stop,) = emulator.requests_for("stop")
    assert stop.body == {"signal": "SIGTERM", "timeout": "5s"}
    (waited,) = emulator.requests_for("wait")
    assert ("version", machine.version) in waited.query_pairs
    assert [v for k, v in waited.query_pairs if k == "state"] == ["stopped", "destroyed", "failed"]
    assert not emulator.requests_for("delete")

    creates = emulator.requests_for("create")
    assert len(creates) == 1
    body = creates[0].body
    assert creates[0].path == f"/v1/apps/{APP}/machines"
    assert body["name"] == machine.name
    assert machine.name.startswith(f"{APP}-flame-")
    assert body["config"]["env"] == {"DATABASE_URL": "pg://db", "FLAME_PARENT": "<redacted>"}
    assert body["config"]["guest"] == {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    assert body["config"]["auto_destroy"] is True
    assert body["config"]["restart"] == {"policy": "no"}
    assert machine.metadata["flame_runner_id"] == "r1"
    assert "skip_secrets" not in body
    assert all(r.authorized for r in emulator.requests)


def test_a_machine_that_ignores_sigterm_is_destroyed_by_force(
    emulator: FlyMachinesEmulator, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    stubborn = (
        "python",
        "-c",
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').close(); time.sleep(60)",
        str(ready),
    )

    async def scenario(stop_timeout: float) -> str:
        ready.unlink(missing_ok=True)
        async with opened(make_backend(emulator, stop_timeout=stop_timeout)) as backend:
            handle = await backend.boot(launch(argv=stubborn))
            await asyncio.to_thread(wait_until, ready.exists, 10)
            await handle.stop()
            return handle.id

    graceful = run(scenario(1))  # Fly sends SIGKILL when the stop's timeout passes
    machine = emulator.machine(graceful)
    assert machine.state == "destroyed"
    assert machine.stop_request == {"signal": "SIGTERM", "timeout": 1.0}
    assert machine.exit_code == -9  # SIGTERM ignored; killed after the timeout
    forced = run(scenario(0))  # no grace: straight to DELETE ?force=true
    assert emulator.machine(forced).state == "destroyed"
    assert emulator.machine(forced).stop_request is None
    (delete,) = [r for r in emulator.requests_for("delete") if forced in r.path]
    assert delete.query == {"force": "true"}


def test_machine_gets_only_the_given_env_and_never_the_token(
    emulator: FlyMachinesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", TOKEN)  # the parent has it; runners must not
    monkeypatch.setenv("PARENT_ONLY", "do-not-pass")
    out = tmp_path / "env.json"
    dump = (
        "python",
        "-c",
        "import json,os,sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))",
    )

    async def scenario() -> str:
        async with opened(make_backend(emulator, env={"DATABASE_URL": "pg://db"})) as backend:
            handle = await backend.boot(launch(argv=(*dump, str(out))))
            return await handle.wait()

    ended = run(scenario())
    assert ended == "exited with code 0 (stopped by its parent); Fly machine destroyed"
    env = json.loads(out.read_text())
    fly_vars = {k for k in env if k.startswith("FLY_")}
    assert set(env) - fly_vars - {"LC_CTYPE"} == {
        "PATH",
        "PYTHONPATH",
        "DATABASE_URL",
        "FLAME_PARENT",
    }
    assert env["FLAME_PARENT"] == SECRET
    assert "FLY_API_TOKEN" not in env
    assert not any(TOKEN in value for value in env.values())
    assert env["FLY_PRIVATE_IP"] == "127.0.0.1"
    assert env["FLY_APP_NAME"] == APP
    assert env["FLY_IMAGE_REF"] == IMAGE
    assert env["FLY_REGION"] == "ams"
    # auto_destroy: the machine went away with its process.
    (machine,) = emulator.machines()
    assert machine.state == "destroyed"
    assert machine.exit_code == 0


def test_wait_resolves_with_the_exit_code_and_after_a_crash(emulator: FlyMachinesEmulator) -> None:
    async def scenario() -> tuple[str, str, str]:
        async with opened(make_backend(emulator)) as backend:
            failing = await backend.boot(launch(argv=("python", "-c", "raise SystemExit(209)")))
            first = await failing.wait()
            crashing = await backend.boot(launch())
            waiter = asyncio.ensure_future(crashing.wait())
            await asyncio.sleep(0)
            await asyncio.to_thread(emulator.crash, crashing.id)
            second = await waiter
            stopped = await backend.boot(launch())
            waiter = asyncio.ensure_future(stopped.wait())
            await stopped.stop()
            third = await waiter
            assert failing.id in failing.diagnostics()
            assert f"fly logs --app {APP} --machine {failing.id}" in failing.diagnostics()
            return first, second, third

    first, second, third = run(scenario())
    assert first == "exited with code 209 (importing the application raised); Fly machine destroyed"
    assert second == "killed by SIGKILL; Fly machine destroyed"
    assert third == "killed by SIGTERM; Fly machine destroyed"  # the graceful stop's signal


def test_wrong_token_is_a_boot_error_without_the_token(emulator: FlyMachinesEmulator) -> None:
    wrong = "wrong-token-7d2e"

    async def scenario() -> None:
        async with opened(make_backend(emulator, token=wrong)) as backend:
            await backend.boot(launch())

    with pytest.raises(BootError) as info:
        run(scenario())
    text = str(info.value)
    assert "401" in text
    assert "unauthorized" in text
    assert wrong not in text
    assert wrong not in repr(info.value)
    assert len(emulator.requests_for("create")) == 1  # 401 is not retried
    assert emulator.requests[0].authorized is False
    assert not emulator.machines()


def test_wrong_app_is_a_boot_error_with_a_hint(emulator: FlyMachinesEmulator) -> None:
    async def scenario() -> None:
        async with opened(make_backend(emulator, app="other")) as backend:
            await backend.boot(launch())

    with pytest.raises(BootError, match=r"HTTP 404: app not found.*FLY_APP_NAME"):
        run(scenario())


@pytest.mark.parametrize("token", ["FlyV1 fm2_abc,fm2_def", "fm2_abc,fm2_def"])
def test_macaroon_tokens_use_the_flyv1_scheme(token: str) -> None:
    with FlyMachinesEmulator(token="FlyV1 fm2_abc,fm2_def", app=APP) as emu:
        boot_and_stop(emu, token=token)
        assert all(r.authorized for r in emu.requests)


def test_capacity_and_rate_limit_answers_are_retried(emulator: FlyMachinesEmulator) -> None:
    emulator.fail_next_creates(429, message="rate limit exceeded", retry_after=0)
    emulator.fail_next_creates(412, message="insufficient resources")
    emulator.fail_next_creates(409, message="capacity went away")
    emulator.fail_next_creates(
        422, message="no capacity for volume", error_status="volume_placement_capacity"
    )
    emulator.fail_next_creates(
        400, message="no capacity in ams", error_status="insufficient_capacity"
    )

    machine_id = boot_and_stop(emulator)
    assert [r.status for r in emulator.requests_for("create")] == [429, 412, 409, 422, 400, 200]
    assert [m.id for m in emulator.machines()] == [machine_id]


def test_retries_are_bounded_and_back_off(emulator: FlyMachinesEmulator) -> None:
    emulator.fail_next_creates(429, count=10, message="rate limit exceeded")

    async def scenario() -> None:
        async with opened(make_backend(emulator, max_boot_retries=3, retry_backoff=0.04)) as b:
            await b.boot(launch())

    started = time.monotonic()
    with pytest.raises(BootError) as info:
        run(scenario())
    elapsed = time.monotonic() - started
    text = str(info.value)
    assert "after 4 attempts" in text
    assert "HTTP 429: rate limit exceeded" in text
    assert TOKEN not in text
    assert len(emulator.requests_for("create")) == 4
    # Three back-offs of at least half of 0.04, 0.08 and 0.16 seconds.
    assert elapsed >= 0.14
    assert not emulator.machines()


@pytest.mark.parametrize("code", [400, 422])
def test_an_invalid_request_fails_at_once_quoting_fly(
    emulator: FlyMachinesEmulator, code: int
) -> None:
    emulator.fail_next_creates(code, message="invalid config.guest.memory_mb", count=3)

    async def scenario() -> None:
        async with opened(make_backend(emulator, retry_backoff=1.0)) as backend:
            await backend.boot(launch())

    with pytest.raises(BootError, match=rf"HTTP {code}: invalid config.guest.memory_mb") as info:
        run(scenario())
    (create,) = emulator.requests_for("create")  # not retried
    assert f"(fly-request-id {create.request_id})" in str(info.value)  # Fly support asks for it


def test_a_field_outside_fly_schema_is_refused_at_once(emulator: FlyMachinesEmulator) -> None:
    async def scenario() -> None:
        backend = make_backend(emulator, extra_config={"stop_config": {"timeout": 10}})
        async with opened(backend):
            await backend.boot(launch())

    with pytest.raises(BootError, match=r"HTTP 400: config.stop_config.timeout: expected string"):
        run(scenario())
    assert not emulator.machines()


def test_every_boot_error_quotes_the_fly_request_id(emulator: FlyMachinesEmulator) -> None:
    emulator.fail_next_creates(503, count=3, message="upstream unavailable")

    async def scenario() -> None:
        async with opened(make_backend(emulator, max_boot_retries=2)) as backend:
            await backend.boot(launch())

    with pytest.raises(BootError, match="after 3 attempts") as info:
        run(scenario())
    last = emulator.requests_for("create")[-1]
    assert f"HTTP 503: upstream unavailable (fly-request-id {last.request_id})" in str(info.value)


def test_server_errors_are_retried_after_checking_by_name(emulator: FlyMachinesEmulator) -> None:
    emulator.fail_next_creates(503, message="upstream unavailable")
    boot_and_stop(emulator)
    assert [(r.action, r.status) for r in emulator.requests if r.action in ("create", "list")] == [
        ("create", 503),
        ("list", 200),
        ("create", 200),
    ]
    assert len(emulator.machines()) == 1
    # the look-up asks for this runner's machines only, without their configs
    (lookup,) = emulator.requests_for("list")
    assert lookup.query == {"summary": "true", "metadata.flame_runner_id": "r1"}


@pytest.mark.parametrize("stand_in", [None, 502, 504])
def test_a_lost_answer_adopts_the_machine_instead_of_leaking_it(
    emulator: FlyMachinesEmulator, stand_in: int | None
) -> None:
    emulator.lose_next_create_answer(status=stand_in)

    async def scenario() -> str:
        async with opened(make_backend(emulator)) as backend:
            handle = await backend.boot(launch())
            assert emulator.machine(handle.id).state == "started"
            await handle.stop()
            return handle.id

    machine_id = run(scenario())
    assert [m.id for m in emulator.machines()] == [machine_id]  # no twin
    assert len(emulator.requests_for("create")) == 1
    assert emulator.machine(machine_id).state == "destroyed"


def test_a_lost_answer_on_the_last_attempt_leaves_no_machine(
    emulator: FlyMachinesEmulator,
) -> None:
    emulator.lose_next_create_answer()

    async def scenario() -> None:
        async with opened(make_backend(emulator, max_boot_retries=0)) as backend:
            await backend.boot(launch())

    with pytest.raises(BootError, match="after 1 attempts"):
        run(scenario())
    (machine,) = emulator.machines()  # it was made, and booted...
    assert machine.state == "destroyed"  # ...and found and destroyed before boot() returned


def test_a_look_up_that_misses_makes_no_twin(emulator: FlyMachinesEmulator) -> None:
    """The answer is lost, the look-up fails too: the second create is refused for its taken
    name, and the backend adopts the machine it finds then."""
    emulator.lose_next_create_answer()
    emulator.fail_next("list", 503)

    machine_id = boot_and_stop(emulator)
    assert [m.id for m in emulator.machines()] == [machine_id]
    assert [(r.action, r.status) for r in emulator.requests if r.action in ("create", "list")] == [
        ("create", 0),
        ("list", 503),
        ("create", 409),
        ("list", 200),
    ]
    assert emulator.requests_for("create")[1].answer["status"] == "name_taken"


def test_a_boot_cancelled_mid_create_destroys_the_machine(emulator: FlyMachinesEmulator) -> None:
    emulator.slow_next("create", 30)

    async def scenario() -> None:
        async with opened(make_backend(emulator)) as backend:
            boot = asyncio.ensure_future(backend.boot(launch()))
            await asyncio.to_thread(emulator.wait_until, lambda: bool(emulator.machines()), 5)
            boot.cancel()
            with pytest.raises(asyncio.CancelledError):
                await boot
        # aclose waited for the clean-up

    run(scenario())
    (machine,) = emulator.machines()
    assert machine.state == "destroyed"


def test_stop_tolerates_a_machine_that_is_already_gone(emulator: FlyMachinesEmulator) -> None:
    async def scenario() -> None:
        async with opened(make_backend(emulator)) as backend:
            handle = await backend.boot(launch(argv=("python", "-c", "pass")))
            await handle.wait()  # it saw the machine destroyed: stop has nothing to do
            await handle.stop()
            other = await backend.boot(launch(argv=("python", "-c", "pass")))
            await asyncio.to_thread(
                emulator.wait_until, lambda: not emulator.machine(other.id).alive, 5
            )
            await other.stop()  # it did not see it: the stop and the delete find it gone

    run(scenario())
    assert [r.status for r in emulator.requests_for("stop")] == [400]
    assert [r.status for r in emulator.requests_for("delete")] == [404]


def test_wait_falls_back_to_instance_id_and_reads_guest_exit_codes(
    emulator: FlyMachinesEmulator,
) -> None:
    backend = make_backend(emulator)
    handle = FlyMachineHandle(backend, {"id": "m1", "instance_id": "01ABC", "state": "started"})
    assert (handle.version, handle.instance_id) == ("01ABC", "01ABC")
    newer = FlyMachineHandle(backend, {"id": "m2", "version": "01V", "instance_id": "01I"})
    assert newer.version == "01V"
    exits = [
        ({"exit_code": 203}, "exited with code 203 (idle shutdown)"),
        ({"guest_exit_code": 209}, "exited with code 209 (importing the application raised)"),
        ({"signal": 9}, "killed by SIGKILL"),
        ({"requested_stop": True}, "exited with code 0 (stopped by its parent)"),  # omitempty
        ({"exit_code": 137, "oom_killed": True}, "exited with code 137, out of memory"),
    ]
    for exit_event, text in exits:
        for request in ({"exit_event": exit_event}, {"MonitorEvent": {"exit_event": exit_event}}):
            machine = {"events": [{"type": "exit", "status": "stopped", "request": request}]}
            assert fly_module._exit_description(machine) == text


def test_a_machine_that_fails_to_launch_is_over(emulator: FlyMachinesEmulator) -> None:
    emulator.fail_launch_next(linger=30)

    async def scenario() -> str | None:
        async with opened(make_backend(emulator, stop_timeout=0)) as backend:
            handle = await backend.boot(launch())
            ended = await handle._ended()
            await handle.stop()
            return ended

    assert run(scenario()) == "Fly machine launch_failed"
    (machine,) = emulator.machines()
    assert machine.state == "destroyed"
    assert machine.pid is None


def test_skip_secrets_keeps_the_app_secrets_off_runners(
    emulator: FlyMachinesEmulator, tmp_path: Path
) -> None:
    emulator.secrets["FLY_API_TOKEN"] = TOKEN  # kept as a Fly secret, as the docs advise
    out = tmp_path / "env.json"
    dump = (
        "python",
        "-c",
        "import json,os,sys; json.dump(sorted(os.environ), open(sys.argv[1], 'w'))",
    )

    async def scenario(skip: bool) -> list[str]:
        async with opened(make_backend(emulator, skip_secrets=skip)) as backend:
            handle = await backend.boot(launch(argv=(*dump, str(out))))
            await handle.wait()
        return list(json.loads(out.read_text()))

    assert "FLY_API_TOKEN" in run(scenario(False))  # Fly gives every machine the secrets
    assert "FLY_API_TOKEN" not in run(scenario(True))
    assert emulator.requests_for("create")[-1].body["skip_secrets"] is True


def test_stop_finishes_even_if_its_caller_is_cancelled(emulator: FlyMachinesEmulator) -> None:
    async def scenario() -> None:
        async with opened(make_backend(emulator)) as backend:
            handle = await backend.boot(launch())
            stopper = asyncio.ensure_future(handle.stop())
            await asyncio.sleep(0)  # stop() has started its destroy
            stopper.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stopper
        # aclose waited for the destroy

    run(scenario())
    assert all(not m.alive for m in emulator.machines())


def test_client_is_reopened_after_aclose(emulator: FlyMachinesEmulator) -> None:
    backend = make_backend(emulator)

    async def once() -> None:
        handle = await backend.boot(launch())
        await handle.stop()
        await backend.aclose()

    run(once())
    run(once())  # a new event loop, a new client
    assert len(emulator.machines()) == 2


# -- the emulator itself ---------------------------------------------------------------------


def test_emulator_never_dial_in_and_close_kills_everything() -> None:
    emu = FlyMachinesEmulator(token=TOKEN).start()
    emu.never_dial_in(mode="sleep")
    emu.never_dial_in(mode="nothing")
    base = f"{emu.url}/v1/apps/any/machines"
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as client:
        body = {"config": {"image": IMAGE, "auto_destroy": True, "init": {"cmd": ["false"]}}}
        sleeper = client.post(base, json=body).json()["id"]
        nothing = client.post(base, json=body).json()["id"]
        normal = client.post(base, json={"config": {"image": IMAGE, "init": {"cmd": list(SLEEP)}}})
        assert normal.status_code == 200
    pids = [m.pid for m in emu.machines() if m.pid is not None]
    assert len(pids) == 2
    assert all(pid_alive(p) for p in pids)
    assert emu.machine(sleeper).argv is not None
    assert emu.machine(sleeper).state == "started"  # "false" was not run
    assert emu.machine(nothing).pid is None
    assert emu.machine(nothing).state == "started"
    emu.close()
    emu.close()
    assert all(not m.alive for m in emu.machines())
    assert not any(pid_alive(p) for p in pids)


def test_emulator_reports_a_command_that_cannot_start() -> None:
    with FlyMachinesEmulator(token=TOKEN) as emu:
        with httpx.Client(headers={"Authorization": f"FlyV1 {TOKEN}"}, timeout=10) as client:
            body = {
                "config": {"image": IMAGE, "auto_destroy": True, "init": {"exec": ["/no/such"]}}
            }
            mid = client.post(f"{emu.url}/v1/apps/a/machines", json=body).json()["id"]
        machine = emu.machine(mid)
        assert (machine.state, machine.exit_code) == ("destroyed", 127)
        assert "could not start" in emu.logs(mid)


# -- whole pools on the emulator -------------------------------------------------------------


def where_am_i() -> tuple[int, str | None, str | None]:
    """Runs on a runner: which process and which (emulated) Fly machine."""
    return os.getpid(), os.environ.get("FLY_MACHINE_ID"), os.environ.get("FLY_API_TOKEN")


def square(x: int) -> int:
    return x * x


@pytest.mark.process
@pytest.mark.timeout(40)
def test_calls_run_on_emulated_machines(emulator: FlyMachinesEmulator) -> None:
    backend = make_backend(emulator)
    with flame.Pool("fly-e2e", max=2, max_concurrency=2, backend=backend, boot_timeout=20) as pool:
        pid, machine_id, token = flame.call(pool, where_am_i)
        assert pid != os.getpid()
        assert token is None
        assert machine_id is not None
        assert emulator.machine(machine_id).state == "started"
        assert list(pool.map(square, range(6))) == [0, 1, 4, 9, 16, 25]
    emulator.wait_until(lambda: not emulator.live_machines(), timeout=10)


@pytest.mark.process
@pytest.mark.timeout(40)
def test_idle_runner_shuts_down_and_its_machine_is_gone(emulator: FlyMachinesEmulator) -> None:
    backend = make_backend(emulator)
    with flame.Pool("fly-idle", max=1, backend=backend, idle_shutdown_after=0.5) as pool:
        _pid, machine_id, _token = flame.call(pool, where_am_i)
        assert machine_id is not None
        try:
            emulator.wait_until(lambda: not emulator.machine(machine_id).alive, timeout=15)
        except TimeoutError:
            pytest.fail(f"{pool!r} {pool.stats()}; runner output:\n{emulator.logs(machine_id)}")
        assert emulator.machine(machine_id).exit_code == ExitCode.IDLE
        # The pool notices and can boot another machine.
        _pid, again, _token = flame.call(pool, where_am_i)
        assert again != machine_id


@pytest.mark.process
@pytest.mark.timeout(40)
def test_a_machine_that_never_dials_in_is_destroyed(emulator: FlyMachinesEmulator) -> None:
    emulator.never_dial_in(count=5)
    backend = make_backend(emulator)
    with flame.Pool("fly-silent", max=1, backend=backend, boot_timeout=1.5) as pool:
        with pytest.raises(BootError, match="did not connect"):
            # A call timeout longer than boot_timeout: the caller gets the boot's failure.
            flame.call(pool, where_am_i, timeout=10)
        machines = emulator.machines()
        assert machines
        assert all(not m.alive for m in machines), machines


@pytest.mark.process
@pytest.mark.timeout(60)
def test_fly_backend_passes_the_backend_check(emulator: FlyMachinesEmulator) -> None:
    from flame.testing import check_backend

    check_backend(make_backend(emulator), boot_timeout=20)
    emulator.wait_until(lambda: not emulator.live_machines(), timeout=10)


def test_an_answer_that_echoes_the_request_never_shows_the_runner_secret(
    emulator: FlyMachinesEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    # a 422 (retried, logged) and a 400 (fatal) whose messages quote the whole request body,
    # runner environment included, as a validation error quoting the config would
    emulator.fail_next_creates(422, message="rejected machine config", echo=True)
    emulator.fail_next_creates(400, message="rejected machine config", echo=True)
    caplog.set_level(logging.DEBUG)
    backend = make_backend(emulator)
    launches: list[RunnerLaunch] = []
    boot = backend.boot

    async def recording_boot(launch: RunnerLaunch) -> FlyMachineHandle:
        launches.append(launch)
        return await boot(launch)

    backend.boot = recording_boot  # type: ignore[method-assign]
    pool = flame.Pool("fly-echo", max=1, backend=backend, boot_timeout=20)
    with pool, pytest.raises(BootError) as info:
        flame.call(pool, os.getpid)
    flame_parent = launches[0].env["FLAME_PARENT"]
    secret_hex = LaunchInfo.decode(flame_parent).secret.hex()
    shown = str(info.value) + "\n" + caplog.text
    assert "rejected machine config" in str(info.value)
    assert "rejected machine config" in caplog.text  # the retried 422 was logged
    assert "<hidden>" in shown
    for value in (flame_parent, flame_parent[:40], flame_parent[-40:], secret_hex, TOKEN):
        assert value not in shown
