"""The Fly Machines API emulator answers as Fly's published API does, refusals included.

Each test speaks plain HTTP (httpx) to the emulator, as any client would, and checks one rule
of Fly's OpenAPI document or of the server behind it: schemas, sizes, names, the wait rules,
rate limits, error bodies, states, destroyed machines, list filters, and the injectable
faults. The rate limiter and the destroyed machines' lifetime run on a clock the test moves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from flame.backends.fly import FlyRateLimits
from flame.testing import _fly_api
from flame.testing.fly import FlyMachinesEmulator

TOKEN = "emulator-test-token"
APP = "emu"
IMAGE = "registry.fly.io/emu:1"
SLEEP = ["python", "-c", "import time; time.sleep(60)"]
IMAGE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emu(clock: Clock) -> Iterator[FlyMachinesEmulator]:
    # no rate limits here but in the tests about them: the others make requests in a hurry
    with FlyMachinesEmulator(
        token=TOKEN,
        app=APP,
        region="ams",
        clock=clock,
        destroyed_ttl=30,
        extra_env=IMAGE_ENV,
        rate_limits=None,
    ) as emulator:
        yield emulator


@pytest.fixture
def api(emu: FlyMachinesEmulator) -> Iterator[httpx.Client]:
    base = f"{emu.url}/v1/apps/{APP}/machines"
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ) as client:
        yield client


def machine_body(name: str = "m1", **config: Any) -> dict[str, Any]:
    return {
        "name": name,
        "config": {
            "image": IMAGE,
            "init": {"cmd": SLEEP},
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
            **config,
        },
    }


def error_of(response: httpx.Response) -> dict[str, Any]:
    doc = response.json()
    assert _fly_api.problems(doc, "ErrorResponse") == []
    assert set(doc) == {"error", "status"}
    assert isinstance(response.headers.get("fly-request-id"), str)
    return dict(doc)


# -- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (None, "body: expected object, got null"),
        (
            {"config": {"image": IMAGE, "guest": {"cpus": "2"}}},
            "config.guest.cpus: expected integer",
        ),
        ({"config": {"image": IMAGE, "imagee": "x"}}, "config.imagee: not a field"),
        ({"config": {"image": IMAGE}, "skip_secret": True}, "skip_secret: not a field"),
        ({"config": {"image": IMAGE, "env": {"A": 1}}}, "config.env.A: expected string"),
        ({"config": {"image": IMAGE, "restart": {"policy": "on-fail"}}}, "'on-fail' is not one of"),
        (
            {"config": {"image": IMAGE, "auto_destroy": "yes"}},
            "config.auto_destroy: expected boolean",
        ),
        (
            {"config": {"image": IMAGE, "init": {"cmd": "python"}}},
            "config.init.cmd: expected array",
        ),
    ],
)
def test_a_request_outside_the_published_schema_is_refused(
    api: httpx.Client, emu: FlyMachinesEmulator, body: Any, problem: str
) -> None:
    response = api.post("", json=body) if body is not None else api.post("")
    assert response.status_code == 400
    assert problem in error_of(response)["error"]
    assert not emu.machines()


@pytest.mark.parametrize(
    ("path", "params", "problem"),
    [
        ("", {"sumary": "true"}, "unknown query parameter 'sumary'"),
        ("", {"summary": "yes"}, "expected a boolean"),
        ("", {"state": "destroyed"}, "'destroyed': expected one of"),
        ("", {"limit": "ten"}, "expected an integer"),
        ("/{id}", {"force": "true"}, "unknown query parameter 'force'"),
        ("/{id}/wait", {"timeout": "60s"}, "timeout='60s': expected an integer"),
        ("/{id}/wait", {"state": "running"}, "'running': expected one of"),
    ],
)
def test_query_parameters_follow_the_published_document(
    api: httpx.Client, path: str, params: dict[str, str], problem: str
) -> None:
    machine = api.post("", json=machine_body()).json()
    response = api.get(path.format(id=machine["id"]), params=params)
    assert response.status_code == 400
    assert problem in error_of(response)["error"]


# -- sizes and names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guest", "ok"),
    [
        ({"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}, True),
        ({"cpu_kind": "shared", "cpus": 8, "memory_mb": 16384}, True),
        ({"cpu_kind": "shared", "cpus": 8, "memory_mb": 16640}, False),
        ({"cpu_kind": "shared", "cpus": 3, "memory_mb": 768}, False),
        ({"cpu_kind": "shared", "cpus": 16, "memory_mb": 4096}, False),
        ({"cpu_kind": "performance", "cpus": 1, "memory_mb": 2048}, True),
        (
            {"cpu_kind": "performance", "cpus": 8, "memory_mb": 4096},
            False,
        ),  # FlyBackend's old default
        ({"cpu_kind": "performance", "cpus": 16, "memory_mb": 131072}, True),
        ({"cpu_kind": "performance", "cpus": 6, "memory_mb": 12288}, False),
        ({"cpu_kind": "performance", "cpus": 2, "memory_mb": 4000}, False),
        ({"cpu_kind": "dedicated", "cpus": 1, "memory_mb": 2048}, False),
        ({"cpus": 2}, True),  # Fly's defaults: shared, the preset's memory
    ],
)
def test_guest_sizes_follow_fly_rules(api: httpx.Client, guest: dict[str, Any], ok: bool) -> None:
    body = machine_body(guest=guest)
    body["skip_launch"] = True
    response = api.post("", json=body)
    if ok:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 422
        assert "invalid config.guest" in error_of(response)["error"]


def test_names_are_unique_among_live_machines(api: httpx.Client) -> None:
    first = api.post("", json=machine_body("twin")).json()
    again = api.post("", json=machine_body("twin"))
    assert again.status_code == 409
    assert error_of(again)["status"] == "name_taken"
    assert api.delete(f"/{first['id']}", params={"force": "true"}).status_code == 200
    assert api.post("", json=machine_body("twin")).status_code == 200  # free once destroyed
    unnamed = [api.post("", json={"config": machine_body()["config"]}).json() for _ in range(2)]
    assert unnamed[0]["name"] != unnamed[1]["name"]  # generated names never collide


# -- states, versions, wait -------------------------------------------------------------------


def test_a_machine_is_created_then_started_with_a_version(
    api: httpx.Client, emu: FlyMachinesEmulator
) -> None:
    created = api.post("", json=machine_body())
    machine = created.json()
    assert _fly_api.problems(machine, "Machine") == []
    assert machine["state"] == "created"  # the create answer, as in Fly's docs
    assert machine["version"] == machine["instance_id"]
    assert len(machine["version"]) == 26
    assert created.headers["fly-request-id"]
    waited = api.get(f"/{machine['id']}/wait", params={"state": "started", "timeout": 10})
    assert waited.status_code == 200
    doc = waited.json()
    assert _fly_api.problems(doc, "WaitMachineResponse") == []
    assert (doc["ok"], doc["state"], doc["version"]) == (True, "started", machine["version"])
    assert doc["event_id"] == api.get(f"/{machine['id']}").json()["events"][0]["id"]
    assert emu.machine(machine["id"]).state == "started"


def test_wait_rules(api: httpx.Client) -> None:
    machine = api.post("", json=machine_body()).json()
    path, version = f"/{machine['id']}/wait", machine["version"]
    no_version = api.get(path, params={"state": "stopped"})
    assert no_version.status_code == 400
    assert "version" in error_of(no_version)["error"]
    assert (
        api.get(path, params={"state": "stopped", "timeout": 61, "version": version}).status_code
        == 400
    )
    timed_out = api.get(path, params={"state": "stopped", "timeout": 1, "version": version})
    assert timed_out.status_code == 408
    assert "deadline_exceeded" in error_of(timed_out)["error"]
    # several states, repeated or comma-separated; the deprecated instance_id still works
    assert api.get(f"{path}?state=stopped&state=started&instance_id={version}").status_code == 200
    assert api.get(path, params={"state": "suspended,started"}).json()["state"] == "started"
    assert api.get(path, params={"state": "settled"}).json()["state"] == "started"
    wrong = api.get(path, params={"state": "started", "version": "0" * 26})
    assert wrong.status_code == 400


def test_stop_signals_then_kills_after_its_timeout(
    api: httpx.Client, emu: FlyMachinesEmulator
) -> None:
    machine = api.post("", json=machine_body()).json()
    mid, version = machine["id"], machine["version"]
    api.get(f"/{mid}/wait", params={"state": "started"})
    refused = api.delete(f"/{mid}")
    assert refused.status_code == 412  # running, and no force
    assert "force" in error_of(refused)["error"]
    assert api.post(f"/{mid}/stop", json={"timeout": 10}).status_code == 400  # a string: "10s"
    assert api.post(f"/{mid}/stop", json={"signal": "SIGSTOP"}).status_code == 400
    assert (
        api.post(f"/{mid}/stop", json={"signal": "SIGTERM", "timeout": "1m30s"}).status_code == 200
    )
    assert emu.machine(mid).stop_request == {"signal": "SIGTERM", "timeout": 90.0}
    stopped = api.get(f"/{mid}/wait", params={"state": "stopped", "version": version})
    assert stopped.json()["state"] == "stopped"
    # no auto_destroy: stopped, not destroyed, until deleted (no force needed now)
    assert api.get(f"/{mid}").json()["state"] == "stopped"
    (exit_event,) = [e for e in api.get(f"/{mid}").json()["events"] if e["type"] == "exit"]
    assert exit_event["request"]["exit_event"]["signal"] == 15
    assert exit_event["request"]["exit_event"]["requested_stop"] is True
    assert api.delete(f"/{mid}").status_code == 200


def test_a_destroyed_machine_reads_destroyed_for_a_while_then_404s(
    api: httpx.Client, clock: Clock
) -> None:
    machine = api.post("", json=machine_body()).json()
    mid = machine["id"]
    assert api.delete(f"/{mid}", params={"force": "true"}).status_code == 200
    assert api.get(f"/{mid}").json()["state"] == "destroyed"
    assert api.get("").json() == []
    assert [m["id"] for m in api.get("", params={"include_deleted": "true"}).json()] == [mid]
    gone = api.get(f"/{mid}/wait", params={"state": "started"})
    assert gone.status_code == 400  # destroyed: it will never be started
    assert api.delete(f"/{mid}", params={"force": "true"}).status_code == 404
    clock.now += 31
    assert api.get(f"/{mid}").status_code == 404
    assert api.get(f"/{mid}/wait", params={"state": "destroyed"}).status_code == 404
    assert api.get("", params={"include_deleted": "true"}).json() == []


# -- list filters -----------------------------------------------------------------------------


def test_list_filters_summary_metadata_state_region_and_pages(api: httpx.Client) -> None:
    ids = []
    for n, (pool, region) in enumerate([("a", "ams"), ("b", "ams"), ("a", "fra"), ("a", "ams")]):
        body = machine_body(f"m{n}", metadata={"pool": pool, "n": str(n)})
        body.update(region=region, skip_launch=True)
        ids.append(api.post("", json=body).json()["id"])
    full = api.get("").json()
    assert [m["id"] for m in full] == ids
    assert "config" in full[0]
    summary = api.get("", params={"summary": "true"}).json()
    assert all("config" not in m and "events" not in m for m in summary)
    assert all(_fly_api.problems(m, "Machine") == [] for m in summary)
    assert [m["name"] for m in summary] == ["m0", "m1", "m2", "m3"]
    by_pool = api.get("", params={"metadata.pool": "a"}).json()
    assert [m["id"] for m in by_pool] == [ids[0], ids[2], ids[3]]
    both = api.get("", params={"metadata.pool": "a", "metadata.n": "2"}).json()
    assert [m["id"] for m in both] == [ids[2]]
    assert [m["id"] for m in api.get("", params={"region": "fra"}).json()] == [ids[2]]
    assert api.get("", params={"state": "started"}).json() == []
    assert len(api.get("", params={"state": "created,started"}).json()) == 4
    page = api.get("", params={"limit": 3})
    assert len(page.json()) == 3
    rest = api.get("", params={"limit": 3, "cursor": page.headers["fly-next-cursor"]})
    assert [m["id"] for m in rest.json()] == [ids[3]]
    assert "fly-next-cursor" not in rest.headers


# -- rate limits ------------------------------------------------------------------------------


def test_rate_limits_are_the_published_ones(
    api: httpx.Client, emu: FlyMachinesEmulator, clock: Clock
) -> None:
    assert FlyMachinesEmulator().rate_limits == FlyRateLimits()  # the default
    emu.rate_limits = FlyRateLimits()
    creates = [api.post("", json={**machine_body(f"r{i}"), "skip_launch": True}) for i in range(4)]
    assert [r.status_code for r in creates] == [200, 200, 200, 429]  # bursts of 3 per app
    limited = error_of(creates[3])
    assert "rate limit" in limited["error"]
    assert "Retry-After" not in creates[3].headers  # Fly documents none
    clock.now += 1.0
    assert api.post("", json={**machine_body("r3"), "skip_launch": True}).status_code == 200
    assert api.post("", json={**machine_body("r4"), "skip_launch": True}).status_code == 429
    assert [api.get("").status_code for _ in range(4)] == [200, 200, 200, 429]
    mid = creates[0].json()["id"]
    gets = [api.get(f"/{mid}").status_code for _ in range(11)]
    assert gets == [200] * 10 + [429]  # get: 5 a second, bursts of 10, per machine
    other = creates[1].json()["id"]
    assert api.get(f"/{other}").status_code == 200  # another machine's bucket
    clock.now += 0.2
    assert api.get(f"/{mid}").status_code == 200
    waits = [api.get(f"/{mid}/wait", params={"state": "settled"}).status_code for _ in range(4)]
    assert waits == [200, 200, 200, 429]  # every other action: 1 a second per machine
    # nothing a 429 refused was done
    assert sorted(m.name for m in emu.machines()) == ["r0", "r1", "r2", "r3"]


def test_rate_limits_can_be_faster_off_or_announce_retry_after(clock: Clock) -> None:
    fast = FlyRateLimits().scaled(10)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with (
        FlyMachinesEmulator(token=TOKEN, rate_limits=fast, clock=clock, retry_after=True) as emu,
        httpx.Client(headers=auth) as client,
    ):
        url = f"{emu.url}/v1/apps/x/machines"
        statuses = [client.get(url).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        clock.now += 0.1  # 10 a second
        assert client.get(url).status_code == 200
        limited = client.get(url)
        assert limited.headers["Retry-After"] == "1"
    with (
        FlyMachinesEmulator(token=TOKEN, rate_limits=None) as emu,
        httpx.Client(headers=auth) as client,
    ):
        url = f"{emu.url}/v1/apps/x/machines"
        assert {client.get(url).status_code for _ in range(20)} == {200}


# -- errors and faults ------------------------------------------------------------------------


def test_every_error_is_an_error_response(emu: FlyMachinesEmulator, api: httpx.Client) -> None:
    with httpx.Client(timeout=10) as anonymous:
        assert (
            error_of(anonymous.get(f"{emu.url}/v1/apps/{APP}/machines"))["error"] == "unauthorized"
        )
    assert error_of(api.get("/nope"))["status"] == "unknown"
    emu.fail_next_creates(412, message="no capacity", error_status="insufficient_capacity")
    refused = api.post("", json=machine_body())
    assert (refused.status_code, error_of(refused)["status"]) == (412, "insufficient_capacity")
    with pytest.raises(ValueError, match="error_status"):
        emu.fail_next_creates(412, error_status="no_capacity")


def test_a_lost_create_answer_still_made_and_booted_the_machine(
    api: httpx.Client, emu: FlyMachinesEmulator
) -> None:
    emu.lose_next_create_answer()
    with pytest.raises(httpx.TransportError):
        api.post("", json=machine_body("lost"))
    emu.lose_next_create_answer(status=504)
    proxied = api.post("", json=machine_body("proxied"))
    assert proxied.status_code == 504
    assert error_of(proxied)["error"] == "upstream error (504)"
    lost, made = emu.machines()
    assert (lost.name, made.name) == ("lost", "proxied")
    emu.wait_until(lambda: all(m.state == "started" for m in emu.machines()), timeout=5)
    assert all(m.pid is not None for m in emu.machines())
    assert [r.status for r in emu.requests_for("create")] == [0, 504]


def test_app_secrets_reach_machines_unless_skipped(clock: Clock) -> None:
    dump = ["python", "-c", "import os; print(sorted(os.environ))"]
    with FlyMachinesEmulator(token=TOKEN, secrets={"DATABASE_URL": "pg://x"}, clock=clock) as emu:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            url = f"{emu.url}/v1/apps/x/machines"
            config = {"image": IMAGE, "init": {"cmd": dump}}
            plain = client.post(url, json={"config": config}).json()["id"]
            skipped = client.post(url, json={"config": config, "skip_secrets": True}).json()["id"]
        assert "DATABASE_URL" in emu.machine(plain).env_keys
        assert "DATABASE_URL" not in emu.machine(skipped).env_keys
