"""flame inside the programs people run it in: uvicorn, gunicorn (with and without
``--preload``) and multiprocessing's fork workers, each started as a user would start it.

Each test checks requests (or tasks) served through a ProcessBackend pool, how long the host
takes to stop, and that no runner is left, from the runners' pids the app reports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import assert_pids_gone, pid_alive, wait_until

pytestmark = pytest.mark.timeout(90)

APP_COMMON = """\
import os
import flame

# short heartbeats: a runner whose parent vanished notices within 1.5 s
flame.configure(heartbeat_interval=0.3, heartbeat_timeout=1.5)
pool = flame.Pool("web", max=2, max_concurrency=4, backend="process")

def runner_pid():
    return os.getpid()

def heavy(n):
    return sum(i * i for i in range(n)), os.getpid()
"""

FASTAPI_APP = (
    APP_COMMON
    + """
from fastapi import FastAPI

app = FastAPI()

@app.get("/heavy/{n}")
async def heavy_endpoint(n: int):
    total, runner = await flame.acall(pool, heavy, n)
    return {"total": total, "runner": runner, "worker": os.getpid()}
"""
)

FLASK_APP = (
    APP_COMMON
    + """
from flask import Flask

app = Flask(__name__)

@app.get("/heavy/<int:n>")
def heavy_endpoint(n):
    total, runner = flame.call(pool, heavy, n)
    return {"total": total, "runner": runner, "worker": os.getpid()}
"""
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, tmp: Path, app: str, argv: list[str]) -> None:
        (tmp / "app.py").write_text(textwrap.dedent(app))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp), *(p for p in sys.path if p)])
        self.port = _free_port()
        argv = [a.replace("PORT", str(self.port)) for a in argv]
        self.log = open(tmp / "server.log", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=tmp,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.runners: set[int] = set()
        self.workers: set[int] = set()

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.output()
            try:
                return httpx.get(f"{self.url}/heavy/1", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, interval=0.1, message="the server did not come up")

    def get(self, n: int = 10_000) -> dict[str, int]:
        r = httpx.get(f"{self.url}/heavy/{n}", timeout=30)
        assert r.status_code == 200, r.text
        doc: dict[str, int] = r.json()
        assert doc["total"] == sum(i * i for i in range(n))
        self.runners.add(doc["runner"])
        self.workers.add(doc["worker"])
        return doc

    def signal(self, sig: int) -> float:
        """Send ``sig`` to the server's main process; the seconds it took to end."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout=40)
        return time.monotonic() - sent

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.workers | self.runners:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for s in made:
        s.stop()


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "flame" in line and "rror" in line]


def test_uvicorn_serves_acall_and_stops_on_ctrl_c(server: list[Server], tmp_path: Path) -> None:
    s = Server(
        tmp_path, FASTAPI_APP, [sys.executable, "-m", "uvicorn", "app:app", "--port", "PORT"]
    )
    server.append(s)
    s.wait_ready()
    for _ in range(6):
        s.get()
    took = s.signal(signal.SIGINT)
    assert took < 5, f"uvicorn took {took:.2f}s to stop after Ctrl-C"
    assert "Finished server process" in s.output()
    assert not _errors(s.output()), s.output()
    assert_pids_gone(s.runners, 5)


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_sync_workers_serve_and_stop_on_sigterm(
    server: list[Server], tmp_path: Path, preload: bool
) -> None:
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:PORT", "app:app"]
    s = Server(tmp_path, FLASK_APP, [*argv, "--preload"] if preload else argv)
    server.append(s)
    s.wait_ready()
    wait_until(lambda: (s.get(), len(s.workers) == 2)[1], 30, message="both workers served")
    assert len(s.runners) >= 2, "each worker boots runners of its own"
    took = s.signal(signal.SIGTERM)
    assert took < 10, f"gunicorn took {took:.2f}s to stop after SIGTERM"
    assert not _errors(s.output()), s.output()
    assert_pids_gone(s.workers | s.runners, 5)


def test_a_sigkilled_gunicorn_master_leaves_no_runner(server: list[Server], tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:PORT", "app:app"]
    s = Server(tmp_path, FLASK_APP, [*argv, "--preload"])
    server.append(s)
    s.wait_ready()
    wait_until(lambda: (s.get(), len(s.workers) == 2)[1], 30, message="both workers served")
    s.signal(signal.SIGKILL)
    # the workers notice their master is gone and exit; their runners follow (heartbeats)
    assert_pids_gone(s.workers | s.runners, 20)


def test_multiprocessing_fork_workers_use_a_pool_created_at_import(tmp_path: Path) -> None:
    script = tmp_path / "batch.py"
    script.write_text(
        APP_COMMON
        + textwrap.dedent(
            """
            import multiprocessing, sys

            def task(n):
                return os.getpid(), flame.call(pool, heavy, n)

            if __name__ == "__main__":
                with multiprocessing.get_context("fork").Pool(2) as workers:
                    results = workers.map(task, [1000] * 8)
                for worker, (total, runner) in results:
                    assert total == sum(i * i for i in range(1000))
                    print("WORKER", worker, "RUNNER", runner, flush=True)
                print("PARENT", os.getpid(), flush=True)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    pairs = [line.split() for line in out.stdout.splitlines() if line.startswith("WORKER")]
    assert len(pairs) == 8
    runners = {int(p[3]) for p in pairs}
    workers = {int(p[1]) for p in pairs}
    assert len(workers) >= 1 and len(runners) >= len(workers)
    assert not _errors(out.stderr), out.stderr
    assert_pids_gone(runners, 10)
