"""FlyBackend keeps to Fly's published rate limits, checked on the emulator's real ones.

The emulator here enforces Fly's own numbers (create and list: 1 a second with bursts of 3,
per app; get: 5 a second with bursts of 10; every other action: 1 a second with bursts of 3,
per machine) and answers 429 past them. A burst of boots, look-ups after lost answers, and
several pools of one app must draw no 429; the pacer's schedule itself (as fast as the
limit allows, and no faster) is checked on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import flame
import flame.backends.fly as fly_module
from flame import RunnerLaunch
from flame.backends.fly import FlyBackend, FlyRateLimits, RateLimit
from flame.testing.fly import FlyMachinesEmulator
from helpers import wait_until

TOKEN = "pacing-token"
APP = "paced"
IMAGE = "registry.fly.io/paced:1"
SLEEP = ("python", "-c", "import time; time.sleep(60)")
IMAGE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


@pytest.fixture
def emulator() -> Iterator[FlyMachinesEmulator]:
    with FlyMachinesEmulator(token=TOKEN, app=APP, extra_env=IMAGE_ENV) as emu:
        assert emu.rate_limits == FlyRateLimits()  # Fly's published limits
        yield emu


def backend(emulator: FlyMachinesEmulator, **options: object) -> FlyBackend:
    return FlyBackend(
        host=emulator.url,
        token=TOKEN,
        app=APP,
        image=IMAGE,
        advertise_host="127.0.0.1",
        cpus=1,
        retry_backoff=0.2,
        **options,  # type: ignore[arg-type]
    )


def launch(n: int) -> RunnerLaunch:
    return RunnerLaunch(runner_id=f"r{n}", pool="paced", env={"FLAME_PARENT": "x"}, argv=SLEEP)


def statuses(emulator: FlyMachinesEmulator) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for request in emulator.requests:
        out.setdefault(request.action, []).append(request.status)
    return out


def no_429(emulator: FlyMachinesEmulator) -> None:
    limited = [(r.action, r.path) for r in emulator.requests if r.status == 429]
    assert not limited, f"rate limited: {limited}"


async def boot_all(backends: list[FlyBackend], count: int) -> list[str]:
    async def one(b: FlyBackend, n: int) -> str:
        handle = await b.boot(launch(n))
        await handle.stop()
        return handle.id

    try:
        return await asyncio.gather(*(one(backends[n % len(backends)], n) for n in range(count)))
    finally:
        for b in backends:
            await b.aclose()


# -- the schedule -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_pacer_goes_as_fast_as_the_limit_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(fly_module.time, "monotonic", clock)
    pacer = fly_module._Pacer(RateLimit(1.0, 3))

    def book(count: int) -> list[float]:
        return [round(pacer.reserve().due - clock.now, 3) for _ in range(count)]

    # a burst of 8 at once: 3 now (the burst; the last one a margin late), then 1 a second
    delays = book(8)
    assert delays == [0.0, 0.0, 0.1, 1.1, 2.1, 3.1, 4.1, 5.1]
    # and Fly's own bucket, fed at those times, accepts every one of them
    tokens, last = 3.0, 0.0
    for at in delays:
        tokens = min(3.0, tokens + (at - last))
        last = at
        assert tokens >= 1.0, at
        tokens -= 1.0
    clock.now += 100  # idle long enough: a full burst again
    assert book(2) == [0.0, 0.0]
    pacer.drain()  # a 429: someone else uses the same bucket
    assert book(1) == [1.1]  # a token a second from an empty bucket


def test_a_request_that_leaves_late_moves_the_ones_behind_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(fly_module.time, "monotonic", clock)
    pacer = fly_module._Pacer(RateLimit(1.0, 3))
    first, second, _third, fourth = (pacer.reserve() for _ in range(4))
    assert fourth.due - clock.now == pytest.approx(1.1)
    pacer.sent(first, clock.now + 0.3)  # a fresh connection: it reached Fly 0.3 s late
    pacer.sent(second, clock.now + 0.3)  # inside the burst: no later for Fly's bucket
    assert pacer._moved(fourth) == pytest.approx(0.3)  # so the fourth goes at 1.4
    assert pacer._moved(fourth) == 0.0  # once
    assert pacer._moved(first) == 0.0  # nobody ahead of the first
    assert pacer.reserve().due - clock.now == pytest.approx(2.4)


def test_one_pacer_per_app_and_action_per_process(emulator: FlyMachinesEmulator) -> None:
    a, b = backend(emulator), backend(emulator)
    assert a._pacer("create") is b._pacer("create")
    assert a._pacer("create") is not a._pacer("list")
    other_app = FlyBackend(host=emulator.url, token=TOKEN, app="other", image=IMAGE)
    assert other_app._pacer("create") is not a._pacer("create")


# -- on the emulator's real limits ------------------------------------------------------------


@pytest.mark.timeout(40)
def test_look_ups_after_lost_answers_are_paced_too(emulator: FlyMachinesEmulator) -> None:
    emulator.lose_next_create_answer(count=4)
    ids = asyncio.run(boot_all([backend(emulator)], 6))
    assert len(set(ids)) == 6
    no_429(emulator)
    assert len(emulator.machines()) == 6  # every lost answer's machine adopted, no twin
    assert statuses(emulator)["list"] == [200] * 4


@pytest.mark.timeout(40)
def test_a_429_from_someone_else_is_waited_out(emulator: FlyMachinesEmulator) -> None:
    # another process of the same app has just used the whole burst
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as other:
        body = {"config": {"image": IMAGE, "init": {"cmd": list(SLEEP)}}, "skip_launch": True}
        for _ in range(3):
            assert other.post(f"{emulator.url}/v1/apps/{APP}/machines", json=body).is_success
    ids = asyncio.run(boot_all([backend(emulator)], 3))
    assert len(ids) == 3
    creates = statuses(emulator)["create"]
    assert creates[:3] == [200] * 3
    assert creates[3:].count(200) == 3  # each boot got its machine in the end
    assert 429 in creates  # ...after being told to wait


def hold_until(go: str) -> str | None:
    """Runs on a runner: keeps it busy until the test says go; says which machine it was."""
    deadline = time.monotonic() + 45
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.environ.get("FLY_MACHINE_ID")


@pytest.mark.process
@pytest.mark.timeout(60)
def test_a_pool_booting_8_runners_at_once_draws_no_429(
    emulator: FlyMachinesEmulator, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    pool = flame.Pool(
        "paced-burst", max=8, max_concurrency=1, backend=backend(emulator), boot_timeout=30
    )
    with pool, concurrent.futures.ThreadPoolExecutor(8) as callers:
        # 8 calls at once, each holding its runner: the pool boots 8 runners at once
        calls = [callers.submit(flame.call, pool, hold_until, str(go)) for _ in range(8)]
        wait_until(lambda: pool.stats().in_flight == 8, timeout=40, message=repr(pool))
        go.touch()
        machine_ids = {call.result(timeout=40) for call in calls}
    assert len(machine_ids) == 8
    no_429(emulator)
    emulator.wait_until(lambda: not emulator.live_machines(), timeout=15)
