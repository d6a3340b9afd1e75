"""What offloading buys a web server: the light endpoint's latency while heavy requests run.

    python examples/webapp/load.py                 # the full run, about a minute
    python examples/webapp/load.py --json out.json # also write every figure
    python examples/webapp/load.py --smoke         # tiny counts: checks it works, nothing more

It starts ``app.py`` under uvicorn (one worker, as ``uvicorn app:app`` does), waits for its
warm pool, and then, in one run, for each way of serving the heavy endpoint: sends
``--heavy`` heavy requests at once and, until they are all answered, starts a ``/light``
request every ``--interval`` seconds (whether the previous ones were answered or not, as
independent users would), timing each. It prints the light requests' p50, p99
and worst times, and how long the heavy batch took, as a Markdown table. The first row is
the light endpoint with no heavy load. Latencies are measured by this client, on the same
machine, so they include its own share of the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
MODES = {
    "async": "inline `async def` (blocks the loop)",
    "thread": "inline `def` (thread pool)",
    "flame": "`await flame.acall`, warm ProcessBackend pool",
}


@dataclass
class Row:
    mode: str
    what: str
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    heavy_s: float | None  # how long the heavy batch took, None for the baseline


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of an ascending list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summarize(mode: str, what: str, times: list[float], heavy_s: float | None) -> Row:
    ordered = sorted(times)
    return Row(
        mode,
        what,
        len(ordered),
        round(percentile(ordered, 0.50) * 1000, 1),
        round(percentile(ordered, 0.99) * 1000, 1),
        round(ordered[-1] * 1000, 1),
        None if heavy_s is None else round(heavy_s, 2),
    )


async def light_until(
    client: httpx.AsyncClient, done: asyncio.Event, interval: float
) -> list[float]:
    """Start a ``/light`` request every ``interval`` seconds until ``done`` is set, without
    waiting for the previous ones (users do not wait for each other), and return each one's
    time. Waiting would hide the slow answers: a blocked server would get few requests."""

    async def one() -> float:
        started = time.perf_counter()
        (await client.get("/light")).raise_for_status()
        return time.perf_counter() - started

    sent: list[asyncio.Task[float]] = []
    while not sent or not done.is_set():
        sent.append(asyncio.create_task(one()))
        await asyncio.sleep(interval)
    return list(await asyncio.gather(*sent))


async def heavy_batch(client: httpx.AsyncClient, mode: str, n: int, count: int) -> float:
    started = time.perf_counter()
    answers = await asyncio.gather(*(client.get(f"/heavy/{mode}/{n}") for _ in range(count)))
    for r in answers:
        r.raise_for_status()
    return time.perf_counter() - started


async def measure(url: str, args: argparse.Namespace) -> list[Row]:
    limits = httpx.Limits(max_connections=args.heavy + 4)
    async with (
        httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as heavy,
        httpx.AsyncClient(
            base_url=url, timeout=300, limits=httpx.Limits(max_connections=None)
        ) as light,
    ):
        idle = asyncio.Event()
        asyncio.get_running_loop().call_later(args.baseline * args.interval, idle.set)
        times = await light_until(light, idle, args.interval)
        rows = [summarize("idle", "no heavy requests", times, None)]
        for mode, what in MODES.items():
            # warm-up: each runner imports app.py the first time a call reaches it
            await heavy_batch(heavy, mode, 1, args.heavy)
            done = asyncio.Event()
            sampler = asyncio.create_task(light_until(light, done, args.interval))
            took = await heavy_batch(heavy, mode, args.work, args.heavy)
            done.set()
            rows.append(summarize(mode, what, await sampler, took))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--log-level", "warning"],
        cwd=HERE,
    )
    deadline = time.monotonic() + 120
    while True:  # uvicorn listens once the lifespan has booted the pool
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/light", timeout=2).raise_for_status()
            return server
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                server.kill()
                raise SystemExit("the server did not come up within 120 s") from None
            time.sleep(0.1)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGINT)  # Ctrl-C: the lifespan stops the pool and its runners
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"light endpoint latency while {args.heavy} heavy requests (crunch({args.work:_})) run;"
        f" {os.cpu_count()} cores, {args.runners} runners; load average before the run"
        f" {args.load_before:.2f}",
        "",
        "| heavy endpoint served by | light p50 | light p99 | light max | light requests "
        f"| {args.heavy} heavy done in |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        heavy = "" if r.heavy_s is None else f"{r.heavy_s:.2f} s"
        lines.append(
            f"| {r.what} | {r.p50_ms:.1f} ms | {r.p99_ms:.1f} ms | {r.max_ms:.1f} ms "
            f"| {r.samples} | {heavy} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heavy", type=int, default=8, help="heavy requests at once (8)")
    parser.add_argument("--work", type=int, default=3_000_000, help="crunch(n) per request")
    parser.add_argument("--baseline", type=int, default=200, help="light requests, no load")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between lights")
    parser.add_argument("--runners", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny counts")
    args = parser.parse_args()
    if args.smoke:
        args.heavy, args.work, args.baseline = 2, 20_000, 5
    args.load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    os.environ["WEBAPP_RUNNERS"] = str(args.runners)
    port = _free_port()
    server = start_server(port)
    try:
        rows = asyncio.run(measure(f"http://127.0.0.1:{port}", args))
    finally:
        stop_server(server)
    print(table(rows, args))
    if args.json:
        params = {k: v for k, v in vars(args).items() if k not in ("json", "smoke")}
        params.update(cores=os.cpu_count(), load_average=os.getloadavg())
        doc = {"params": params, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
