"""The recipes of ``docs/recipes/``, run on the real hosts, as their pages say.

A page's code blocks titled with a file name (```` ```python title="app.py" ````) are the
recipe's files, and those titled ``cell N`` a notebook's cells: each test writes them to a
fresh folder exactly as the page shows them (so page and test cannot drift) and runs them as
a user would: uvicorn, gunicorn, ``manage.py``, ``python script.py``, a Jupyter kernel
through ``jupyter_client``. It checks the answers, how long the host takes to stop, and that
no runner is left: runners work in their parent's folder, so any ``flame runner`` process
whose working directory is the test's folder is one of this recipe's, wherever it sits in
the process tree (an orphan included).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from helpers import assert_pids_gone, runner_pids, wait_until

pytestmark = pytest.mark.timeout(90)

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes"
BIN = Path(sys.executable).parent  # console scripts: uvicorn, gunicorn
_BLOCK = re.compile(r'^```\w+ title="([^"]+)"\n(.*?)^```$', re.M | re.S)

#: SPEC's bounds: Ctrl-C stops a web server in its normal time (we allow 5 s); gunicorn's
#: SIGTERM stops everything within 10 s
STOP_BOUND = 5.0
GUNICORN_STOP_BOUND = 10.0


# -- the pages ---------------------------------------------------------------------------
def page_blocks(page: str) -> dict[str, str]:
    """Title -> code of every titled block of ``docs/recipes/<page>``, in page order."""
    blocks = dict(_BLOCK.findall((RECIPES / page).read_text()))
    assert blocks, f"{page} has no titled code block"
    return blocks


def write_recipe(page: str, folder: Path) -> dict[str, str]:
    """Write the page's files under ``folder`` (every folder of Python files below it a
    package, as the pages say) and return all its blocks, cells included."""
    blocks = page_blocks(page)
    for title, code in blocks.items():
        if title.startswith("cell "):
            continue
        path = folder / title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    for py in list(folder.rglob("*.py")):
        if py.parent != folder:
            (py.parent / "__init__.py").touch()
    return blocks


# -- processes ---------------------------------------------------------------------------
def runners_in(folder: Path) -> set[int]:
    """Live ``flame runner`` processes working in ``folder`` (anywhere in the tree)."""
    found = set()
    for pid in runner_pids(1):
        try:
            if Path(os.readlink(f"/proc/{pid}/cwd")) == folder:
                found.add(pid)
        except OSError:
            continue
    return found


def assert_no_runner_in(folder: Path, timeout: float = 5.0) -> None:
    try:
        wait_until(lambda: not runners_in(folder), timeout)
    except AssertionError:
        raise AssertionError(
            f"runners {sorted(runners_in(folder))} still work in {folder} after {timeout:g}s"
        ) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _errors(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if "Traceback" in line or ("flame" in line and "rror" in line)
    ]


def run_ok(
    argv: list[str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a program to its end as a user would. It must succeed and print no error (its
    stderr is checked as a server's log is)."""
    out = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert not _errors(out.stderr), out.stderr
    return out


class Host:
    """A program started in a recipe's folder as its user starts it: its own session (a
    terminal's Ctrl-C reaches its process group), its output in ``host.log``. ``PORT`` in
    ``argv`` becomes a free port."""

    def __init__(self, folder: Path, argv: list[str]) -> None:
        self.folder = folder
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "host.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [a.replace("PORT", str(self.port)) for a in argv],
                cwd=folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_listening(self, timeout: float = 30) -> None:
        def listening() -> bool:
            assert self.proc.poll() is None, f"the host exited:\n{self.output()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(listening, timeout, interval=0.05, message="the server did not listen")

    def request(self, method: str, path: str, **kwargs: object) -> dict[str, object]:
        r = httpx.request(method, self.url + path, timeout=30, **kwargs)  # type: ignore[arg-type]
        assert r.status_code == 200, f"{r.status_code} {r.text}\n{self.output()}"
        doc: dict[str, object] = r.json()
        return doc

    def stop(self, sig: int, *, group: bool) -> float:
        """Send ``sig`` (to the process group, as a terminal's Ctrl-C does, or to the main
        process); the seconds until the host exited."""
        sent = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=40)
        return time.monotonic() - sent

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in runners_in(self.folder):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    started: list[Host] = []
    yield started
    for host in started:
        host.close()


def _sha256_rounds(data: bytes, rounds: int) -> str:
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()


# -- FastAPI -----------------------------------------------------------------------------
def test_fastapi_pool_in_the_lifespan(hosts: list[Host], tmp_path: Path) -> None:
    write_recipe("fastapi.md", tmp_path)
    host = Host(tmp_path, [str(BIN / "uvicorn"), "main:app", "--port", "PORT"])
    hosts.append(host)
    host.wait_listening()
    (booted,) = runners_in(tmp_path)  # min=1: booted in the lifespan, before any request
    for body in (b"", b"abc", b"x" * 1000):
        doc = host.request("POST", "/digest?rounds=500", content=body)
        assert doc == {"digest": _sha256_rounds(body, 500), "runner_pid": booted}
    took = host.stop(signal.SIGINT, group=True)
    assert took < STOP_BOUND, f"uvicorn took {took:.2f}s to stop after Ctrl-C"
    assert "Finished server process" in host.output()
    assert not _errors(host.output()), host.output()
    assert_no_runner_in(tmp_path)


def test_fastapi_pool_at_import_with_an_engine_per_process(
    hosts: list[Host], tmp_path: Path
) -> None:
    write_recipe("fastapi.md", tmp_path)
    host = Host(tmp_path, [str(BIN / "uvicorn"), "reports:app", "--port", "PORT"])
    hosts.append(host)
    host.wait_listening()
    assert not runners_in(tmp_path), "a pool at import boots nothing before its first call"
    for region, amount in [("eu", 3), ("eu", 4), ("us", 10)]:
        host.request("POST", "/orders", json={"region": region, "amount": amount})
    eu, us = host.request("GET", "/report/eu"), host.request("GET", "/report/us")
    assert (eu["total"], us["total"]) == (7, 10)
    assert eu["runner_pid"] == us["runner_pid"] != host.proc.pid
    assert eu["runner_pid"] in runners_in(tmp_path)
    assert eu["runner_db_pool_size"] == 1, "the runner's engine was sized by flame.parent()"
    took = host.stop(signal.SIGINT, group=True)
    assert took < STOP_BOUND, f"uvicorn took {took:.2f}s to stop after Ctrl-C"
    assert not _errors(host.output()), host.output()
    assert_no_runner_in(tmp_path)


# -- Django ------------------------------------------------------------------------------
def _manage(folder: Path, *args: str) -> str:
    return run_ok([sys.executable, "manage.py", *args], folder).stdout


def test_django_view_and_management_command(hosts: list[Host], tmp_path: Path) -> None:
    write_recipe("django.md", tmp_path)
    _manage(tmp_path, "makemigrations", "reports")
    _manage(tmp_path, "migrate")
    with sqlite3.connect(tmp_path / "db.sqlite3") as db:  # a real file, shared by runners
        db.executemany(
            "insert into reports_order (region, amount) values (?, ?)",
            [("eu", 3), ("eu", 4), ("us", 10)],
        )
    db.close()

    out = _manage(tmp_path, "regional_totals", "eu", "us", "asia")
    assert out.splitlines() == ["eu: 7", "us: 10", "asia: 0"]
    assert_no_runner_in(tmp_path)  # the command's pool was stopped at its exit

    host = Host(
        tmp_path, [sys.executable, "manage.py", "runserver", "--noreload", "127.0.0.1:PORT"]
    )
    hosts.append(host)
    host.wait_listening()
    first = host.request("GET", "/totals/?region=eu")
    second = host.request("GET", "/totals/?region=us")
    assert (first["total"], second["total"]) == (7, 10)
    assert first["runner_pid"] == second["runner_pid"] != host.proc.pid
    # the closure in views.py used the runner's own module-level lock and counter
    assert (first["reports_built_by_this_runner"], second["reports_built_by_this_runner"]) == (
        1,
        2,
    )
    assert first["runner_conn_max_age"] == 0, "settings.py saw flame.parent() on the runner"
    took = host.stop(signal.SIGINT, group=True)
    assert took < STOP_BOUND, f"runserver took {took:.2f}s to stop after Ctrl-C"
    assert not _errors(host.output()), host.output()
    assert_no_runner_in(tmp_path)

    # the same project under gunicorn, as the page says for production
    host = Host(tmp_path, [str(BIN / "gunicorn"), "-b", "127.0.0.1:PORT", "mysite.wsgi"])
    hosts.append(host)
    host.wait_listening()
    assert host.request("GET", "/totals/?region=eu")["total"] == 7
    took = host.stop(signal.SIGTERM, group=False)
    assert took < GUNICORN_STOP_BOUND, f"gunicorn took {took:.2f}s to stop after SIGTERM"
    assert not _errors(host.output()), host.output()
    assert_no_runner_in(tmp_path)


# -- Flask + gunicorn --------------------------------------------------------------------
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_flask_under_gunicorn(hosts: list[Host], tmp_path: Path, preload: bool) -> None:
    write_recipe("flask-gunicorn.md", tmp_path)
    argv = [str(BIN / "gunicorn"), "-b", "127.0.0.1:PORT", "app:app"]
    host = Host(tmp_path, [*argv, "--preload"] if preload else argv)
    hosts.append(host)
    host.wait_listening()
    # post_worker_init booted one runner per worker, before any request
    wait_until(lambda: len(runners_in(tmp_path)) == 2, 30, message="a runner per worker")
    runners = runners_in(tmp_path)
    workers: set[object] = set()

    def serve() -> bool:
        doc = host.request("POST", "/digest?rounds=200", content=b"flask")
        assert doc["digest"] == _sha256_rounds(b"flask", 200)
        assert doc["runner_pid"] in runners
        workers.add(doc["worker_pid"])
        return len(workers) == 2

    wait_until(serve, 30, message="both workers served requests")
    took = host.stop(signal.SIGTERM, group=False)
    assert took < GUNICORN_STOP_BOUND, f"gunicorn took {took:.2f}s to stop after SIGTERM"
    assert not _errors(host.output()), host.output()
    assert_no_runner_in(tmp_path)


# -- a batch script ------------------------------------------------------------------------
def _data(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir()
    files = []
    for i in range(count):
        path = folder / f"{i:02}.dat"
        path.write_bytes(os.urandom(size))
        files.append(path)
    return files


def _checksum(path: Path, rounds: int = 1_000) -> str:
    h = hashlib.sha256()
    data = path.read_bytes()
    for _ in range(rounds):
        h.update(data)
    return h.hexdigest()


def test_batch_script_maps_and_casts(tmp_path: Path) -> None:
    write_recipe("batch.md", tmp_path)
    files = _data(tmp_path / "data", 6, 1024)
    out = run_ok([sys.executable, "checksums.py", "data"], tmp_path)
    assert out.stderr == "", "nothing is printed on the way out"
    assert out.stdout.splitlines() == [f"{_checksum(p)} {p.name}" for p in files]
    assert (tmp_path / "data" / "SUMMARY").read_text() == "6 files\n", "stop() let the cast end"
    assert_no_runner_in(tmp_path)


def test_batch_script_killed_mid_batch_leaves_no_runner_and_no_work(tmp_path: Path) -> None:
    """The trade-off the page states: no persistence, and nothing left running."""
    write_recipe("batch.md", tmp_path)
    _data(tmp_path / "data", 8, 300_000)  # ~0.3 GB hashed per job: about a second
    log = tmp_path / "out.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "checksums.py", "data"], cwd=tmp_path, stdout=f, stderr=f
        )
    try:
        wait_until(lambda: log.read_text() or proc.poll() is not None, 60)
        assert proc.poll() is None, log.read_text()
        runners = runners_in(tmp_path)
        assert runners
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_no_runner_in(tmp_path)
    done = log.read_text().splitlines()
    assert 1 <= len(done) < 8, "the batch was cut short"
    assert not (tmp_path / "data" / "SUMMARY").exists()


# -- Jupyter -------------------------------------------------------------------------------
class Kernel:
    """A real IPython kernel (``jupyter_client``) executing cells; what each prints."""

    def __init__(self, folder: Path) -> None:
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(
            kernel_name="python3", cwd=str(folder), startup_timeout=60
        )

    @property
    def pid(self) -> int:
        return int(self.manager.provisioner.process.pid)  # type: ignore[union-attr]

    def run(self, code: str) -> str:
        out: list[str] = []

        def hook(msg: dict[str, object]) -> None:
            content: dict[str, object] = msg["content"]  # type: ignore[assignment]
            if msg["msg_type"] == "stream":
                out.append(str(content["text"]))
            elif msg["msg_type"] == "error":
                out.append(f"ERROR {content['ename']}: {content['evalue']}")

        reply = self.client.execute_interactive(code, timeout=60, output_hook=hook)
        text = "".join(out)
        assert reply["content"]["status"] == "ok", text
        return text

    def interrupted(self, code: str, started: Callable[[], object]) -> str:
        """Execute ``code``, interrupt the kernel once ``started()`` is true (the kernel's
        interrupt button), and return the name of the exception the cell ended with."""
        # (stop_on_error=False: the kernel would otherwise abort the cells sent right after)
        msg_id = self.client.execute(code, stop_on_error=False)
        wait_until(started, 30, message="the cell's work did not start")
        self.manager.interrupt_kernel()
        while True:
            reply = self.client.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                return str(reply["content"].get("ename"))

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` so far, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_jupyter_notebook(tmp_path: Path) -> None:
    blocks = write_recipe("jupyter.md", tmp_path)
    cells = {int(t.split()[1]): code for t, code in blocks.items() if t.startswith("cell ")}
    assert sorted(cells) == list(range(1, 9))
    kernel = Kernel(tmp_path)
    try:
        assert kernel.run(cells[1]) == ""
        assert kernel.run(cells[2]) == "True\n"
        assert kernel.run(cells[3]) == "caught: seed 7 went too far: 92.1 - seed 7\n"
        assert kernel.run(cells[4]) == "[1, 1, 1] []\n", "a cell's globals travel by value"
        assert kernel.run(cells[5]).startswith(
            "cannot pickle the function 'guarded': the global 'lock' it uses "
            "(a _thread.lock object) cannot be pickled"
        )
        answers = ast.literal_eval(kernel.run(cells[6]))
        assert [n for _, n in answers] == [1, 2, 3], "the module's globals are the runner's"
        ((runner,),) = [{pid for pid, _ in answers}]
        assert runner in runners_in(tmp_path)
        # the long call, interrupted once it runs on the runner; the runner stays up
        ticks = _cpu_ticks(runner)
        assert kernel.interrupted(cells[7], lambda: _cpu_ticks(runner) > ticks + 20) == (
            "KeyboardInterrupt"
        )
        answers = ast.literal_eval(kernel.run(cells[6]))
        assert answers == [(runner, 4), (runner, 5), (runner, 6)], "the same runner serves on"
        wait_until(lambda: kernel.run("print(pool.stats().in_flight)") == "0\n", 10)
        assert kernel.run(cells[8]) == ""
        assert_no_runner_in(tmp_path)
        # run the first cells again, as users do; then shutting the kernel down stops them
        kernel.run(cells[1])
        assert kernel.run(cells[2]) == "True\n"
        assert runners_in(tmp_path)
        pid = kernel.pid
    finally:
        kernel.shutdown()
    assert_pids_gone({pid}, 10, what="kernel")
    assert_no_runner_in(tmp_path)


# -- examples/webapp ------------------------------------------------------------------------
def test_the_webapp_load_script_runs_every_mode(tmp_path: Path) -> None:
    """``examples/webapp/load.py --smoke``: the one command behind the figures in
    docs/performance.md works (tiny counts; its figures mean nothing)."""
    webapp = RECIPES.parent.parent / "examples" / "webapp"
    smoke = ["--smoke", "--runners", "1", "--json", str(tmp_path / "r.json")]
    out = run_ok([sys.executable, str(webapp / "load.py"), *smoke], timeout=80)
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["idle", "async", "thread", "flame", "neighbours"]
    assert all(r["samples"] >= 1 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] for r in rows)
    assert "| `await flame.acall`, warm ProcessBackend pool |" in out.stdout
    assert_no_runner_in(webapp)


# -- the pages themselves ------------------------------------------------------------------
PAGES = sorted(p.name for p in RECIPES.glob("*.md") if p.name != "README.md")


def test_the_index_links_every_recipe() -> None:
    index = (RECIPES / "README.md").read_text()
    assert set(PAGES) == set(re.findall(r"\]\(([\w-]+\.md)\)", index))


@pytest.mark.parametrize("page", PAGES)
def test_the_recipe_code_is_lint_clean(tmp_path: Path, page: str) -> None:
    """What users copy passes ruff with its defaults (as in their own project, where
    ``flame`` is a third-party import), and is formatted; a notebook's cells as one file."""
    blocks = write_recipe(page, tmp_path)
    cells = [code for title, code in blocks.items() if title.startswith("cell ")]
    if cells:
        (tmp_path / "notebook.py").write_text("\n\n".join(cells))
    common = ["--isolated", "--line-length", "100", "--target-version", "py311"]
    rules = ["--select", "E,F,W,I,B,UP,SIM,RUF,C4", "--ignore", "E402"]  # cells import late
    for argv in (["check", *common, *rules, "."], ["format", "--check", *common, "."]):
        run_ok([str(BIN / "ruff"), *argv], tmp_path, timeout=30)


# -- what the recipes found (both fixed) -----------------------------------------------------
def test_a_pool_created_and_not_kept_is_callable_by_name() -> None:
    """As in ``def ready(self): flame.Pool('reports', ...)``: only stop() frees a name."""
    import gc
    import weakref

    import flame

    ref = weakref.ref(flame.Pool("recipes-unkept", max=1, backend=flame.LocalBackend()))
    gc.collect()
    try:
        assert flame.call("recipes-unkept", abs, -2) == 2
    finally:
        pool = ref()
        if pool is not None:
            pool.stop()


def test_a_main_script_closure_assigning_a_global_updates_the_runners_module(
    tmp_path: Path,
) -> None:
    script = tmp_path / "lazy.py"
    script.write_text(
        """\
import flame

pool = flame.Pool("lazy", max=1, backend="process")
client = None
builds = []  # mutated, not assigned: this reaches the runner's module either way

if __name__ == "__main__":

    def fetch():
        global client
        if client is None:  # build the (expensive) client once per runner
            builds.append(1)
            client = object()
        return len(builds)

    print([flame.call(pool, fetch) for _ in range(3)])
"""
    )
    out = run_ok([sys.executable, str(script)], tmp_path)
    assert out.stdout == "[1, 1, 1]\n", "the client was built once, on the one runner"
