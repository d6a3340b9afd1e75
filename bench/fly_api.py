"""FlyBackend on the Fly Machines API emulator: pacing, failing fast, the emulator's cost.

``python -m bench.fly_api`` prints three sets of figures (medians of ``--repeat`` runs):

* **burst**: a pool with ``max=8, max_concurrency=1`` takes 8 concurrent calls on an
  emulator enforcing Fly's published rate limits (create: 1 a second, bursts of 3, per
  app), so the backend's pacer spaces the 8 creates; timed from the release of the 8
  callers to all 8 running (the boots) and to the 8 results, with the number of 429
  answers the emulator gave (0 is the point);
* **invalid**: a create the API rejects as invalid (an injected 422 with status
  ``unknown``, and a request field outside the published schema), timed from the call to
  the ``BootError`` the caller gets;
* **emulator**: microseconds per request of the emulator itself (get, list, create with
  ``skip_launch``) over keep-alive HTTP, with rate limits off: the price of its checks.

Runners import this module as the app; importing it does nothing else.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import flame

APP = "bench-fly"
TOKEN = "bench-token"
IMAGE = "registry.fly.io/bench-fly:1"
RUNNERS = 8


def _emulator(**options: object) -> object:
    from flame.testing.fly import FlyMachinesEmulator

    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return FlyMachinesEmulator(token=TOKEN, app=APP, extra_env=env, **options)  # type: ignore[arg-type]


def _backend(url: str, **options: object) -> flame.Backend:
    return flame.FlyBackend(
        host=url,
        token=TOKEN,
        app=APP,
        image=IMAGE,
        advertise_host="127.0.0.1",
        cpus=1,
        **options,  # type: ignore[arg-type]
    )


def hold_until(go: str) -> str | None:
    """Runs on a runner: stays busy until the file ``go`` exists."""
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.environ.get("FLY_MACHINE_ID")


def burst_once() -> tuple[float, float, int]:
    """(seconds to 8 runners busy, seconds to 8 results, 429 answers)."""
    with _emulator() as emu, tempfile.TemporaryDirectory() as tmp:  # type: ignore[attr-defined]
        go = Path(tmp) / "go"
        pool = flame.Pool(
            "bench-fly-burst", max=RUNNERS, max_concurrency=1, backend=_backend(emu.url)
        )
        with pool:
            barrier = threading.Barrier(RUNNERS + 1)
            results: list[object] = []

            def caller() -> None:
                barrier.wait()
                results.append(flame.call(pool, hold_until, str(go), timeout=60))

            threads = [threading.Thread(target=caller) for _ in range(RUNNERS)]
            for thread in threads:
                thread.start()
            barrier.wait()
            start = time.perf_counter()
            while pool.stats().in_flight < RUNNERS:
                time.sleep(0.005)
            booted = time.perf_counter() - start
            go.touch()
            for thread in threads:
                thread.join()
            done = time.perf_counter() - start
        limited = sum(1 for r in emu.requests if r.status == 429)
        assert len(set(results)) == RUNNERS, results
        return booted, done, limited


def invalid_once(kind: str) -> float:
    """Seconds from a call to its BootError when the create is invalid."""
    with _emulator(rate_limits=None) as emu:
        options: dict[str, object] = {}
        if kind == "422":
            emu.fail_next_creates(422, message="invalid config.guest.memory_mb")
        else:
            options["extra_config"] = {"stop_config": {"timeout": 10}}  # not a string
        pool = flame.Pool("bench-fly-invalid", max=1, backend=_backend(emu.url, **options))
        with pool:
            start = time.perf_counter()
            try:
                flame.call(pool, os.getpid, timeout=30)
            except flame.BootError as exc:
                elapsed = time.perf_counter() - start
                assert "HTTP 4" in str(exc), exc
                return elapsed
        raise AssertionError("the call did not fail")


def emulator_costs(count: int) -> dict[str, float]:
    """Microseconds per request (median of 5 rounds of ``count``)."""
    import httpx

    from flame.testing.fly import FlyMachinesEmulator

    options = {}
    if "rate_limits" in inspect.signature(FlyMachinesEmulator).parameters:
        options["rate_limits"] = None
    guest = {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}
    body = {"config": {"image": IMAGE, "guest": guest}, "skip_launch": True}
    out: dict[str, float] = {}
    with (
        FlyMachinesEmulator(token=TOKEN, app=APP, **options) as emu,  # type: ignore[arg-type]
        httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as client,
    ):
        base = f"{emu.url}/v1/apps/{APP}/machines"
        machine = client.post(base, json={**body, "name": "m"}).json()["id"]
        names = iter(range(10**9))
        cases: dict[str, Callable[[], object]] = {
            "get": lambda: client.get(f"{base}/{machine}"),
            "list (1 machine)": lambda: client.get(base),
            "create (skip_launch)": lambda: client.post(
                base, json={**body, "name": f"n{next(names)}"}
            ),
        }
        for label, call in cases.items():
            rounds = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(count):
                    call()
                rounds.append((time.perf_counter() - start) / count * 1e6)
            out[label] = statistics.median(rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print(f"emulator, per request ({args.requests} x 5 rounds, keep-alive, no rate limits):")
    for label, micros in emulator_costs(args.requests).items():
        print(f"  {label:22s} {micros:8.0f} us")
    if "rate_limits" not in inspect.signature(flame.FlyBackend).parameters:
        return  # an older flame: only the emulator's cost means something
    print(f"invalid create, call -> BootError (median of {args.repeat}):")
    for kind in ("422", "schema"):
        runs = [invalid_once(kind) for _ in range(args.repeat)]
        print(f"  {kind:22s} {statistics.median(runs):8.3f} s (max {max(runs):.3f})")
    print(f"burst of {RUNNERS} runners on Fly's published rate limits (median of {args.repeat}):")
    bursts = [burst_once() for _ in range(args.repeat)]
    booted = statistics.median(b[0] for b in bursts)
    done = statistics.median(b[1] for b in bursts)
    print(f"  8 runners busy          {booted:8.3f} s (max {max(b[0] for b in bursts):.3f})")
    print(f"  8 results               {done:8.3f} s")
    print(f"  429 answers             {sum(b[2] for b in bursts):8d} in all runs")


if __name__ == "__main__":
    main()
