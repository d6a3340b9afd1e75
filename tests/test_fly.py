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
from flame.backends.fly import FlyBackend, FlyMachineHandle
from flame.testing.fly import FlyMachinesEmulator

T = TypeVar("T")

TOKEN = "fly-test-token-3f9a1c"
APP = "thumbs"
IMAGE = "registry.fly.io/thumbs:deployment-01"
SECRET = "c2VjcmV0LXJ1bm5lci1ibG9i"  # stands for FLAME_PARENT
SLEEP = ("python", "-c", "import time; time.sleep(60)")

# Machine processes import flame (and, for the end-to-end tests, this module) the way a
# runner in the image would: the image holds this same code, so share sys.path with them.
IMAGE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture
def emulator() -> Iterator[FlyMachinesEmulator]:
    with FlyMachinesEmulator(token=TOKEN, app=APP, region="ams", extra_env=IMAGE_ENV) as emu:
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
    backend = FlyBackend()
    backend.validate()
    assert (backend.app, backend.image, backend.region) == (
        "envapp",
        "registry.fly.io/envapp:1",
        "fra",
    )
    assert backend.cpus == (os.cpu_count() or 1)
    assert (backend.cpu_kind, backend.memory_mb, backend.host) == (
        "performance",
        4096,
        "https://api.machines.dev",
    )
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


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"memory_mb": 1000}, "memory_mb"),
        ({"cpus": 0}, "cpus"),
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
    deletes = emulator.requests_for("delete")
    assert len(deletes) == 1
    assert deletes[0].query == {"force": "true"}
    assert all(r.authorized for r in emulator.requests)


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
    assert third == "Fly machine destroyed"


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

        async def scenario() -> None:
            async with opened(make_backend(emu, token=token)) as backend:
                handle = await backend.boot(launch())
                await handle.stop()

        run(scenario())
        assert all(r.authorized for r in emu.requests)


def test_capacity_and_rate_limit_answers_are_retried(emulator: FlyMachinesEmulator) -> None:
    emulator.fail_next_creates(429, message="rate limit exceeded", retry_after=0)
    emulator.fail_next_creates(412, message="insufficient resources")
    emulator.fail_next_creates(409, message="capacity went away")
    emulator.fail_next_creates(422, message="no capacity for volume")

    async def scenario() -> str:
        async with opened(make_backend(emulator)) as backend:
            handle = await backend.boot(launch())
            await handle.stop()
            return handle.id

    machine_id = run(scenario())
    assert [r.status for r in emulator.requests_for("create")] == [429, 412, 409, 422, 200]
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


def test_other_client_errors_fail_at_once(emulator: FlyMachinesEmulator) -> None:
    emulator.fail_next_creates(400, message="invalid config: guest too big", count=3)

    async def scenario() -> None:
        async with opened(make_backend(emulator)) as backend:
            await backend.boot(launch())

    with pytest.raises(BootError, match=r"HTTP 400: invalid config: guest too big"):
        run(scenario())
    assert len(emulator.requests_for("create")) == 1


def test_server_errors_are_retried_after_checking_by_name(emulator: FlyMachinesEmulator) -> None:
    emulator.fail_next_creates(503, message="upstream unavailable")

    async def scenario() -> None:
        async with opened(make_backend(emulator)) as backend:
            handle = await backend.boot(launch())
            await handle.stop()

    run(scenario())
    assert [(r.action, r.status) for r in emulator.requests if r.action in ("create", "list")] == [
        ("create", 503),
        ("list", 200),
        ("create", 200),
    ]
    assert len(emulator.machines()) == 1


def test_a_lost_answer_adopts_the_machine_instead_of_leaking_it(
    emulator: FlyMachinesEmulator,
) -> None:
    emulator.hang_up_next("create")

    async def scenario() -> str:
        async with opened(make_backend(emulator)) as backend:
            handle = await backend.boot(launch())
            assert emulator.machine(handle.id).state == "started"
            await handle.stop()
            return handle.id

    machine_id = run(scenario())
    assert [m.id for m in emulator.machines()] == [machine_id]
    assert len(emulator.requests_for("create")) == 1
    assert emulator.machine(machine_id).state == "destroyed"


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
            await handle.wait()
            await handle.stop()

    run(scenario())
    assert [r.status for r in emulator.requests_for("delete")] == [404]


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


def test_emulator_semantics(emulator: FlyMachinesEmulator) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    base = f"{emulator.url}/v1/apps/{APP}/machines"
    body = {"name": "m1", "config": {"image": IMAGE, "init": {"cmd": list(SLEEP)}}}
    with httpx.Client(headers=auth, timeout=10) as client:
        assert client.get(base, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.post(base, json={"config": {}}).status_code == 400
        created = client.post(base, json=body).json()
        mid = created["id"]
        assert created["state"] == "started"
        assert created["private_ip"] == "127.0.0.1"
        assert [m["id"] for m in client.get(base).json()] == [mid]
        waited = client.get(f"{base}/{mid}/wait", params={"state": "stopped", "timeout": 0.2})
        assert waited.status_code == 408
        assert client.get(f"{base}/{mid}/wait", params={"state": "started"}).status_code == 200
        refused = client.delete(f"{base}/{mid}")
        assert refused.status_code == 412
        assert "force" in refused.json()["error"]
        assert client.post(f"{base}/{mid}/stop", json={"signal": "SIGTERM"}).status_code == 200
        stopped = client.get(f"{base}/{mid}/wait", params={"state": "stopped", "timeout": 10})
        assert stopped.status_code == 200
        # Created without auto_destroy: stopped, not destroyed, until deleted.
        assert client.get(f"{base}/{mid}").json()["state"] == "stopped"
        assert client.delete(f"{base}/{mid}").status_code == 200
        assert client.get(f"{base}/{mid}").json()["state"] == "destroyed"
        assert client.get(base).json() == []
        assert len(client.get(base, params={"include_deleted": "true"}).json()) == 1
        assert client.delete(f"{base}/{mid}", params={"force": "true"}).status_code == 404
        assert client.get(f"{base}/nope").status_code == 404
        assert client.get(f"{emulator.url}/v1/apps/other/machines").status_code == 404
    machine = emulator.machine(mid)
    assert machine.exit_code is not None
    assert machine.exit_code < 0
    assert machine.argv is not None
    assert machine.argv[0] == sys.executable
    assert "FLY_MACHINE_ID" in machine.env_keys


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
