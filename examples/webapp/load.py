"""What offloading buys a web server: the light endpoint's latency while heavy requests run.

    python examples/webapp/load.py                 # the full run: 3 rounds, about a minute
    python examples/webapp/load.py --json out.json # also write every figure
    python examples/webapp/load.py --smoke         # tiny counts: checks it works, nothing more

It starts ``app.py`` under uvicorn (one worker, as ``uvicorn app:app`` does), waits for its
warm pool, and then, in one run, for each way of serving the heavy endpoint: sends
``--heavy`` heavy requests at once and, until they are all answered, starts a ``/light``
request every ``--interval`` seconds (whether the previous ones were answered or not, as
independent users would), timing each. It does this ``--rounds`` times, every mode in
turn, and prints, as a Markdown table, the light requests' p50, p99 (and each round's own)
and worst times over all rounds, and how long the heavy batch took (median). The first row
is the light endpoint with no heavy load; the last, a control, with the same work done by
plain processes beside the server (no flame), what the shared cores alone cost. Latencies
are measured by this client, on the same machine, so they include its own share of the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable
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
    samples: int  # light requests answered, over every round
    p50_ms: float
    p99_ms: float
    max_ms: float
    p99_rounds_ms: list[float]  # each round's own p99: how much the machine's noise moved it
    heavy_s: float | None  # the heavy batch's time, median over rounds (None: the baseline)
    failed: int  # light requests that got no answer (connection errors)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of an ascending list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def summarize(mode: str, what: str, rounds: list[list[float | None]], heavy: list[float]) -> Row:
    """One row from every round's light times (pooled) and heavy batch times."""
    answered = [sorted(t for t in times if t is not None) for times in rounds]
    if not all(answered):
        raise SystemExit(f"{what}: no light request was answered in a round")
    ordered = sorted(t for times in answered for t in times)
    return Row(
        mode,
        what,
        len(ordered),
        ms(percentile(ordered, 0.50)),
        ms(percentile(ordered, 0.99)),
        ms(ordered[-1]),
        [ms(percentile(times, 0.99)) for times in answered],
        round(statistics.median(heavy), 2) if heavy else None,
        sum(len(times) for times in rounds) - len(ordered),
    )


async def light_until(
    client: httpx.AsyncClient, done: asyncio.Event, interval: float, closed: bool = False
) -> list[float | None]:
    """Start a ``/light`` request every ``interval`` seconds until ``done`` is set, without
    waiting for the previous ones (users do not wait for each other), and return each one's
    time (``None`` for one that failed). Waiting would hide the slow answers: a blocked
    server would get few requests. With ``closed``, wait for each answer all the same
    (``--closed``: a single user clicking again and again)."""

    async def one() -> float | None:
        started = time.perf_counter()
        try:
            (await client.get("/light")).raise_for_status()
        except httpx.TransportError:
            return None
        return time.perf_counter() - started

    if closed:  # one at a time: each waits for the previous answer
        times: list[float | None] = []
        while not times or not done.is_set():
            times.append(await one())
            await asyncio.sleep(interval)
        return times
    sent: list[asyncio.Task[float | None]] = []
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


async def neighbours(work: int, count: int, processes: int) -> float:
    """The control: the heavy batch's work in ``processes`` plain processes beside the
    server (no flame, no requests), so the cores are as busy as when runners do it."""
    started = time.perf_counter()
    each = math.ceil(count / processes)
    code = f"from work import crunch\nfor _ in range({each}): crunch({work})"
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=HERE)
        for _ in range(processes)
    ]
    for proc in procs:
        if await proc.wait() != 0:
            raise SystemExit(f"a neighbour process failed with status {proc.returncode}")
    return time.perf_counter() - started


async def measure(url: str, args: argparse.Namespace) -> list[Row]:
    """``args.rounds`` rounds, each of every mode in turn (so that a noisy spell of a shared
    machine hits them all)."""
    modes = [*MODES, "neighbours"]
    lights: dict[str, list[list[float | None]]] = {mode: [] for mode in ["idle", *modes]}
    heavies: dict[str, list[float]] = {mode: [] for mode in modes}
    limits = httpx.Limits(max_connections=args.heavy + 4)
    async with (
        httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as heavy,
        # idle connections are dropped well before uvicorn's keep-alive timeout (5 s), so a
        # request never goes out on a connection the server is closing
        httpx.AsyncClient(
            base_url=url,
            timeout=300,
            limits=httpx.Limits(max_connections=None, keepalive_expiry=1.0),
        ) as light,
    ):

        async def sample_while(work: Awaitable[float], mode: str) -> None:
            done = asyncio.Event()
            sampler = asyncio.create_task(light_until(light, done, args.interval, args.closed))
            heavies[mode].append(await work)
            done.set()
            lights[mode].append(await sampler)

        for _ in range(args.rounds):
            idle = asyncio.Event()
            asyncio.get_running_loop().call_later(args.baseline * args.interval, idle.set)
            lights["idle"].append(await light_until(light, idle, args.interval, args.closed))
            for mode in MODES:
                # warm-up: each runner imports app.py the first time a call reaches it
                await heavy_batch(heavy, mode, 1, args.heavy)
                await sample_while(heavy_batch(heavy, mode, args.work, args.heavy), mode)
            await sample_while(neighbours(args.work, args.heavy, args.runners), "neighbours")
    whats = {
        "idle": "no heavy requests",
        **MODES,
        "neighbours": f"(control) no heavy requests; the same work in {args.runners} plain "
        "processes beside the server",
    }
    return [summarize(m, whats[m], lights[m], heavies.get(m, [])) for m in lights]


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
        f" {os.cpu_count()} cores, {args.runners} runners, {args.rounds} rounds,"
        f" {'one light request at a time' if args.closed else 'lights at a fixed rate'}; load"
        f" average before the run {args.load_before:.2f}",
        "",
        "| heavy endpoint served by | light p50 | light p99 (each round's) | light max "
        f"| light requests | failed | {args.heavy} heavy done in |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        heavy = "" if r.heavy_s is None else f"{r.heavy_s:.2f} s"
        each = ", ".join(f"{p:.0f}" for p in r.p99_rounds_ms)
        lines.append(
            f"| {r.what} | {r.p50_ms:.1f} ms | {r.p99_ms:.1f} ms ({each}) | {r.max_ms:.1f} ms "
            f"| {r.samples} | {r.failed} | {heavy} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heavy", type=int, default=8, help="heavy requests at once (8)")
    parser.add_argument("--work", type=int, default=3_000_000, help="crunch(n) per request")
    parser.add_argument("--baseline", type=int, default=200, help="light requests, no load")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between lights")
    parser.add_argument("--runners", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every mode (3)")
    parser.add_argument("--closed", action="store_true", help="one light request at a time")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny counts")
    args = parser.parse_args()
    if args.smoke:
        args.heavy, args.work, args.baseline, args.rounds = 2, 20_000, 5, 1
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
