"""The runner is the whole app, in its modules (SPEC "The application's life cycle").

Real apps, written to files and run as users run them: a package whose ``views.py`` closes
over a module-level SQLAlchemy engine (a SQLite file) and a module-level list, a
``python -m pkg.app`` entry, a src-layout package installed editable with a console script,
``python -c``, code piped on stdin, a script without a main guard, pools used from inside
runners, exceptions of the app's own classes, and what runners print, through a pipe, a pty
and a flood. Each program reports what it saw on stdout; every test has a timeout and
leaves no runner.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import flame
from flame.testing.fly import FlyMachinesEmulator
from flame.testing.kubernetes import KubernetesAPIEmulator
from helpers import assert_pids_gone

pytestmark = pytest.mark.timeout(90)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def run(
    argv: list[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join([str(cwd), *(p for p in sys.path if p)])
    full.update(env or {})
    return subprocess.run(
        argv,
        cwd=cwd,
        env=full,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def pids_in(text: str) -> set[int]:
    return {int(p) for p in re.findall(r"PID (\d+)", text)}


# -- closures in any module ------------------------------------------------------------------------
SHOP = {
    "shop/__init__.py": "",
    "shop/db.py": """
        import os
        import sqlalchemy as sa

        engine = sa.create_engine(f"sqlite:///{os.environ['SHOP_DB']}")
        ENGINE_MADE_IN = os.getpid()  # the process whose import made this engine
        SEEN = []
        """,
    "shop/views.py": """
        import os
        import flame
        from shop import db
        from shop.db import engine, SEEN

        pool = flame.Pool("shop", max=1, backend="process", idle_shutdown_after=None)

        def record(n):
            # a closure in an imported module, over its module-level list
            return flame.call(pool, lambda: (SEEN.append(n), len(SEEN), os.getpid())[1:])

        def count_rows():
            def query():
                with engine.connect() as c:  # the runner's own engine
                    return c.exec_driver_sql("select count(*) from t").scalar(), db.ENGINE_MADE_IN
            return flame.call(pool, query)
        """,
    "shop/app.py": """
        import os
        from shop import views
        from shop.db import engine

        def main():
            with engine.begin() as c:
                c.exec_driver_sql("create table t (x int)")
                c.exec_driver_sql("insert into t values (1), (2), (3)")
            (n1, pid), (n2, _) = views.record("a"), views.record("b")
            rows, made_in = views.count_rows()
            print("SEEN", n1, n2, "ROWS", rows, "PID", pid, "OWN_ENGINE", made_in == pid)

        if __name__ == "__main__":
            main()
        """,
}


@pytest.mark.parametrize("how", ["-m", "script"])
def test_closures_in_an_imported_module_use_the_runners_own_globals(
    tmp_path: Path, how: str
) -> None:
    write(tmp_path, SHOP)
    argv = ["-m", "shop.app"]
    if how == "script":
        (tmp_path / "run.py").write_text(
            "from shop.app import main\n\nif __name__ == '__main__':\n    main()\n"
        )
        argv = ["run.py"]
    out = run([sys.executable, *argv], tmp_path, env={"SHOP_DB": str(tmp_path / "shop.db")})
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("SEEN"))
    # the list is the runner's own: the second call sees the first one's append
    assert line.split()[:5] == ["SEEN", "1", "2", "ROWS", "3"], line
    assert line.endswith("OWN_ENGINE True"), "the engine must be the runner's, not a copy"
    assert_pids_gone(pids_in(out.stdout), 10)


def test_a_src_layout_package_installed_editable_with_a_console_script(tmp_path: Path) -> None:
    write(
        tmp_path / "proj",
        {
            "pyproject.toml": """
                [build-system]
                requires = ["setuptools>=68"]
                build-backend = "setuptools.build_meta"

                [project]
                name = "tally"
                version = "0.1"

                [project.scripts]
                tally = "tally.cli:main"

                [tool.setuptools.packages.find]
                where = ["src"]
                """,
            "src/tally/__init__.py": "",
            "src/tally/counts.py": "TOTALS = []\n",
            "src/tally/cli.py": """
                import os
                import flame
                from tally.counts import TOTALS

                def main():
                    with flame.Pool("tally", max=1, backend="process") as pool:
                        for n in (5, 7):
                            size, pid = pool.call(
                                lambda: (TOTALS.append(n), len(TOTALS), os.getpid())[1:]
                            )
                        print("SIZE", size, "PID", pid)
                """,
        },
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # the venv sees this one's packages (flame, setuptools) and gets the project editable
    ours = [p for p in sys.path if p.endswith("site-packages")]
    (site / "ours.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    installed = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-q",
            "-e",
            str(tmp_path / "proj"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": ""}
    out = subprocess.run(
        [str(venv / "bin" / "tally")],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "SIZE 2" in out.stdout, out.stdout
    assert_pids_gone(pids_in(out.stdout), 10)


def test_python_dash_c_ships_its_closures_by_value(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import os, flame
        K = 6
        with flame.Pool("c", max=1, backend="process") as pool:
            print("GOT", pool.call(lambda x: (x * K, os.getpid()), 7))
        """
    )
    out = run([sys.executable, "-c", code], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "GOT (42," in out.stdout


def test_a_script_piped_on_stdin_fails_at_once_saying_to_save_it(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import flame
        pool = flame.Pool("stdin", max=1, backend="process")
        if __name__ == "__main__":
            try:
                pool.call(print, "hi")
            except flame.BootError as exc:
                print("BOOTERROR", exc)
        """
    )
    started = time.monotonic()
    out = run([sys.executable, "-"], tmp_path, stdin=code)
    assert time.monotonic() - started < 10
    assert out.returncode == 0, out.stderr
    assert "BOOTERROR" in out.stdout and "save the code to a file" in out.stdout
    assert "FileNotFoundError" not in out.stdout + out.stderr


def test_a_script_without_a_main_guard_gets_one_short_boot_error(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "noguard.py": """
                import os
                import flame

                pool = flame.Pool("noguard", max=2, backend="process")
                print("RESULT", flame.call(pool, os.getpid))
                """
        },
    )
    started = time.monotonic()
    out = run([sys.executable, "noguard.py"], tmp_path)
    took = time.monotonic() - started
    assert out.returncode == 1
    assert took < 5, f"{took:.1f}s"
    assert out.stderr.count("Traceback") == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("flame._errors.BootError:") and "noguard.py" in last
    assert 'if __name__ == "__main__":' in last


# -- nested pools ----------------------------------------------------------------------------------
NESTED = """
import os, sys
import flame

def backend():
    kind = os.environ.get("BACKEND", "process")
    if kind == "fly":
        return flame.FlyBackend(host=os.environ["FLY_API_HOSTNAME"], cpus=1,
                                advertise_host="127.0.0.1")
    if kind == "kubernetes":
        return flame.KubernetesBackend(kubeconfig=os.environ["KUBECONFIG"],
                                       pod_name=os.environ["POD_NAME"],
                                       listen_host="127.0.0.1", advertise_host="127.0.0.1")
    return flame.ProcessBackend()

outer = flame.Pool("outer", max=1, backend=backend())
inner = flame.Pool("inner", max=1, backend="process")

def leaf():
    return os.getpid(), flame.parent().pool

def middle():
    # runs on an outer runner, which calls a pool of its own: runners of the same app
    return os.getpid(), flame.call(inner, leaf)

if __name__ == "__main__":
    me, (mid, (low, pool)) = os.getpid(), flame.call(outer, middle)
    print("PIDS", me, mid, low, "POOL", pool)
    print("PID", mid, "PID", low)
"""


@pytest.mark.parametrize("backend_kind", ["process", "fly", "kubernetes"])
def test_a_runner_uses_pools_of_its_own_without_app(tmp_path: Path, backend_kind: str) -> None:
    write(tmp_path, {"nested.py": NESTED})
    image = {"PYTHONPATH": os.pathsep.join([str(tmp_path), *(p for p in sys.path if p)])}
    with contextlib.ExitStack() as stack:
        env = {"BACKEND": backend_kind}
        if backend_kind == "fly":
            emu = stack.enter_context(FlyMachinesEmulator(token="t", app="nest", extra_env=image))
            env |= {
                "FLY_API_HOSTNAME": emu.url,
                "FLY_API_TOKEN": "t",
                "FLY_APP_NAME": "nest",
                "FLY_IMAGE_REF": "nest:1",
            }
        elif backend_kind == "kubernetes":
            k8s = stack.enter_context(KubernetesAPIEmulator(env=image))
            k8s.add_parent_pod("nest-parent")
            env |= {"KUBECONFIG": k8s.kubeconfig, "POD_NAME": "nest-parent"}
        out = run([sys.executable, "nested.py"], tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("PIDS"))
    me, mid, low = (int(w) for w in line.split()[1:4])
    assert len({me, mid, low}) == 3 and line.endswith("POOL inner")
    assert_pids_gone({mid, low}, 10)


# -- exceptions ------------------------------------------------------------------------------------
def test_the_apps_own_exceptions_arrive_as_themselves(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "billing/__init__.py": "",
            "billing/errors.py": """
                class Declined(Exception):
                    def __init__(self, card, *, reason):
                        super().__init__(f"card {card} declined")
                        self.card, self.reason = card, reason
                """,
            "quota.py": """
                import sys
                import flame
                from billing.errors import Declined

                class QuotaError(Exception):
                    def __init__(self, user, limit):
                        super().__init__(f"{user} is over {limit}")
                        self.user, self.limit = user, limit

                def over(user):
                    raise QuotaError(user, 10)

                def decline():
                    raise Declined("4242", reason="expired")

                if __name__ == "__main__":
                    with flame.Pool("quota", max=1, backend="process") as pool:
                        try:
                            pool.call(over, "ada")
                        except QuotaError as exc:  # the parent's own __main__ class
                            print("CAUGHT", type(exc).__module__, exc.user, exc.limit,
                                  type(exc.__cause__).__name__)
                        try:
                            pool.call(decline)
                        except Declined as exc:
                            print("DECLINED", exc.card, exc.reason, exc)
                        try:
                            pool.call(sys.exit, 3)
                        except flame.RemoteError as exc:
                            print("REMOTE", exc.type_name)
                        print("STILL", pool.call(abs, -5))
                """,
        },
    )
    out = run([sys.executable, "quota.py"], tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "CAUGHT __main__ ada 10 RemoteTraceback" in lines
    assert "DECLINED 4242 expired card 4242 declined" in lines
    assert "REMOTE SystemExit" in lines
    assert "STILL 5" in lines


# -- output ----------------------------------------------------------------------------------------
CHATTY = """
import logging, os, subprocess, sys, time, warnings
import flame

pool = flame.Pool("chatty", max=1, backend="process")

def chat():
    print("via print")
    print("via stderr", file=sys.stderr)
    logging.getLogger("app").warning("via logging")
    warnings.warn("via warnings")
    os.write(1, b"via fd 1\\n")
    subprocess.run(["sh", "-c", "echo via a subprocess"], check=True)
    return os.getpid()

if __name__ == "__main__":
    pid = flame.call(pool, chat)
    time.sleep(0.5)  # output travels beside the result, not in front of it
    print("PID", pid, flush=True)
"""


def _prefixed(text: str) -> dict[str, str]:
    lines = {}
    for line in text.splitlines():
        m = re.match(r"\[(chatty-0-[0-9a-f]+)\] (.*)", line)
        if m:
            lines[m.group(2)] = m.group(1)
    return lines


def test_runner_output_reaches_the_parent_through_a_pipe_prefixed(tmp_path: Path) -> None:
    write(tmp_path, {"chatty.py": CHATTY})
    out = run([sys.executable, "chatty.py"], tmp_path)
    assert out.returncode == 0, out.stderr
    got_out, got_err = _prefixed(out.stdout), _prefixed(out.stderr)
    assert {"via print", "via fd 1", "via a subprocess"} <= set(got_out), out.stdout
    assert {"via stderr", "via logging"} <= set(got_err), out.stderr
    assert any("UserWarning: via warnings" in line for line in got_err), out.stderr
    assert len(set(got_out.values()) | set(got_err.values())) == 1  # one runner's id
    assert_pids_gone(pids_in(out.stdout), 10)


def test_runner_output_reaches_a_terminal_line_by_line(tmp_path: Path) -> None:
    write(tmp_path, {"chatty.py": CHATTY})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    pid, fd = pty.fork()
    if pid == 0:  # the child: the program, on a pty
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, "chatty.py"], env)
    text = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the program ended
                break
            if not chunk:
                break
            text += chunk
    os.waitpid(pid, 0)
    os.close(fd)
    lines = _prefixed(text.decode().replace("\r\n", "\n"))
    assert {"via print", "via stderr", "via fd 1", "via a subprocess"} <= set(lines), text
    assert_pids_gone(pids_in(text.decode()), 10)


def test_a_flood_of_output_slows_neither_calls_nor_memory(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "flood.py": """
                import os, sys, threading, time
                import flame

                pool = flame.Pool("flood", max=1, max_concurrency=4, backend="process")

                def flood(seconds):
                    line = "x" * 1023 + "\\n"
                    end = time.monotonic() + seconds
                    written = 0
                    while time.monotonic() < end:
                        sys.stdout.write(line * 64)
                        written += 65536
                    return written

                def quick():
                    return os.getpid()

                if __name__ == "__main__":
                    pid = flame.call(pool, quick)
                    cast = threading.Thread(target=flame.call, args=(pool, flood, 4))
                    cast.start()
                    time.sleep(0.5)
                    took = []
                    for _ in range(20):
                        t = time.monotonic()
                        flame.call(pool, quick)
                        took.append(time.monotonic() - t)
                    cast.join()
                    # this process's own peak (ru_maxrss would also count the peak of the
                    # process that started it, which Linux carries across a vfork and exec)
                    with open("/proc/self/status") as status:
                        rss = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
                    print("PID", pid, "SLOWEST", max(took), "RSS_KB", rss, file=sys.stderr)
                """
        },
    )
    with open(tmp_path / "out.txt", "wb") as sink:  # a fast sink: the parent's own stdout
        full = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.run(
            [sys.executable, "flood.py"],
            cwd=tmp_path,
            env=full,
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"PID (\d+) SLOWEST ([\d.e-]+) RSS_KB (\d+)", proc.stderr)
    assert m, proc.stderr
    slowest, rss_kb = float(m.group(2)), int(m.group(3))
    assert slowest < 2.0, f"a quick call took {slowest:.2f}s beside the flood"
    assert rss_kb < 400_000, f"the parent grew to {rss_kb} KiB"
    size = (tmp_path / "out.txt").stat().st_size
    assert size > 1 << 20, "the flood's output reached the parent"
    assert "dropped" in proc.stderr or size < 4 * 1024 * 65536  # bounded, and said so
    assert_pids_gone({int(m.group(1))}, 10)


# -- names -----------------------------------------------------------------------------------------
def test_pools_are_callable_by_name_from_construction_and_names_are_unique() -> None:
    pool = flame.Pool("thumbnails", max=1, backend=flame.LocalBackend())
    try:
        assert flame.call("thumbnails", abs, -3) == 3  # the first call starts it
        with pytest.raises(ValueError, match="thumbnails"):
            flame.Pool("thumbnails", max=1)
        with pytest.raises(flame.PoolNotFound) as info:
            flame.call("thumbnail", abs, 1)
        assert "'thumbnails'" in str(info.value) and "did you mean 'thumbnails'" in str(info.value)
    finally:
        pool.stop()
    flame.Pool("thumbnails", max=1).stop()  # a stopped pool frees its name
