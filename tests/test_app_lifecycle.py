"""The application's life cycle (SPEC): exit, Ctrl-C and SIGTERM, and fork, with real programs.

Each test writes a small program, runs it as a user would (``python app.py``), and checks
what a user relies on: how long after its last statement it exits, that it prints no error
on the way out, that no runner outlives it (linked work is terminated; unlinked work
finishes, and then its runner exits by itself), and that a forked child's pools start
afresh while the parent's carry on. Programs report their runners' pids on stdout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flame.testing.fly import FlyMachinesEmulator
from flame.testing.kubernetes import KubernetesAPIEmulator
from helpers import assert_pids_gone, wait_until

pytestmark = pytest.mark.timeout(60)

#: the SPEC's bounds: a program that never stops its pools exits within 2 s of its last
#: statement; after Ctrl-C or SIGTERM, within 5 s
EXIT_BOUND = 2.0
SIGNAL_BOUND = 5.0

PRELUDE = """\
import os, sys, time, signal, threading, asyncio
import flame

def mark(*words):
    print(*words, flush=True)

def pid_and(x):
    return os.getpid(), x

def sleep_then_touch(seconds, path):
    time.sleep(seconds)
    open(path, "w").close()
    return os.getpid()

def blocked(path):
    open(path, "w").close()
    while True:
        time.sleep(0.05)

def backend():
    kind = os.environ.get("BACKEND", "process")
    if kind == "fly":
        return flame.FlyBackend(host=os.environ["FLY_API_HOSTNAME"], cpus=1,
                                advertise_host=os.environ["FLAME_FLY_ADVERTISE"])
    if kind == "kubernetes":
        return flame.KubernetesBackend(kubeconfig=os.environ["KUBECONFIG"],
                                       pod_name=os.environ["POD_NAME"],
                                       listen_host="127.0.0.1", advertise_host="127.0.0.1")
    return flame.ProcessBackend()
"""


@dataclass
class Run:
    """A program's run: its output, and when it printed LAST and when it exited."""

    out: list[str]
    err: str
    code: int
    exited_at: float
    last_at: float | None = None
    pids: set[int] = field(default_factory=set)

    @property
    def exit_after(self) -> float:
        assert self.last_at is not None, f"the program never reached its end: {self.out}"
        return self.exited_at - self.last_at


def _parse(proc: subprocess.Popen[str], exited_at: float) -> Run:
    out, err = (Path(f"{proc.args[1]}.{name}").read_text() for name in ("out", "err"))
    run = Run(out.splitlines(), err, proc.returncode, exited_at)
    for line in run.out:
        words = line.split()
        if words[:1] == ["LAST"]:
            run.last_at = float(words[1])
        elif words[:1] == ["PID"]:
            run.pids.add(int(words[1]))
    return run


class Programs:
    """Runs programs with their output in files (``app0.py.out``...): a runner that outlives
    its parent on purpose (unlinked work) holds the parent's stdout, so the end of a pipe
    would not say when the program itself ended."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, body: str, *args: str) -> subprocess.Popen[str]:
        path = self.tmp / f"app{len(self.procs)}.py"
        path.write_text(PRELUDE + textwrap.dedent(body))
        with open(f"{path}.out", "w") as out, open(f"{path}.err", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(path), *args],
                cwd=self.tmp,
                env=self.env,
                stdout=out,
                stderr=err,
                text=True,
            )
        self.procs.append(proc)
        return proc

    def run(self, body: str, *args: str, timeout: float = 40) -> Run:
        proc = self.start(body, *args)
        proc.wait(timeout=timeout)
        return _parse(proc, time.monotonic())

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[Programs]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    progs = Programs(tmp_path, env)
    try:
        yield progs
    finally:
        progs.close()


def _backend_env(kind: str, stack: contextlib.ExitStack) -> dict[str, str]:
    """Environment that makes ``backend=BACKEND`` in a program pick this backend."""
    image = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if kind == "process":
        return {"BACKEND": "process"}
    if kind == "fly":
        emu = stack.enter_context(FlyMachinesEmulator(token="t0k", app="life", extra_env=image))
        return {
            "BACKEND": "fly",
            "FLY_API_HOSTNAME": emu.url,
            "FLY_API_TOKEN": "t0k",
            "FLY_APP_NAME": "life",
            "FLY_IMAGE_REF": "life:latest",
            "FLAME_FLY_ADVERTISE": "127.0.0.1",
        }
    emu = stack.enter_context(KubernetesAPIEmulator(env=image))
    emu.add_parent_pod("life-parent")
    return {"BACKEND": "kubernetes", "KUBECONFIG": emu.kubeconfig, "POD_NAME": "life-parent"}


# -- exit ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_kind", ["process", "fly", "kubernetes"])
@pytest.mark.parametrize("idle", ["30", "None"])
def test_a_program_that_never_stops_its_pool_exits_at_once(
    programs: Programs, backend_kind: str, idle: str
) -> None:
    with contextlib.ExitStack() as stack:
        programs.env.update(_backend_env(backend_kind, stack))
        run = programs.run(
            f"""
            pool = flame.Pool("thumbs", max=2, backend=backend(), idle_shutdown_after={idle})

            if __name__ == "__main__":
                for x in range(3):
                    mark("PID", flame.call(pool, pid_and, x)[0])
                mark("PID", flame.call("thumbs", pid_and, 0)[0])
                mark("LAST", time.monotonic())
            """
        )
        assert run.code == 0, run.err
        assert run.pids
        assert run.exit_after < EXIT_BOUND, f"exit took {run.exit_after:.2f}s"
        assert run.err == "", "nothing may be printed on the way out"
        assert_pids_gone(run.pids, 5)


def test_at_exit_linked_work_is_terminated_and_unlinked_work_finishes(
    programs: Programs, tmp_path: Path
) -> None:
    linked, unlinked = tmp_path / "linked-entered", tmp_path / "unlinked-done"
    run = programs.run(
        f"""
        pool = flame.Pool("work", max=2, max_concurrency=2, backend="process",
                          idle_shutdown_after=None, shutdown_timeout=10)

        if __name__ == "__main__":
            flame.cast(pool, blocked, {str(linked)!r})
            flame.cast(pool, sleep_then_touch, 4, {str(unlinked)!r}, link=False)
            while not os.path.exists({str(linked)!r}):
                time.sleep(0.01)
            for pid in {{flame.call(pool, pid_and, 0)[0] for _ in range(4)}}:
                mark("PID", pid)
            mark("LAST", time.monotonic())
        """
    )
    assert run.code == 0, run.err
    assert run.exit_after < EXIT_BOUND, f"exit took {run.exit_after:.2f}s"
    assert not unlinked.exists(), "the parent left before its unlinked work was done"
    # the unlinked work finishes on its runner, which then exits by itself
    wait_until(unlinked.exists, 10, message="the unlinked work did not finish")
    assert_pids_gone(run.pids, 10)


# -- signals ------------------------------------------------------------------------------
def _started(proc: subprocess.Popen[str], entered: Path) -> None:
    wait_until(lambda: entered.exists() or proc.poll() is not None, 20)
    assert proc.poll() is None, Path(f"{proc.args[1]}.err").read_text()


def _after_signal(proc: subprocess.Popen[str], sig: int) -> tuple[Run, float]:
    sent = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=20)
    run = _parse(proc, time.monotonic())
    return run, run.exited_at - sent


@pytest.mark.parametrize("how", ["sync", "async", "thread"])
def test_ctrl_c_interrupts_a_blocked_call_and_cancels_its_work(
    programs: Programs, tmp_path: Path, how: str
) -> None:
    entered = tmp_path / "entered"
    body = f"""
        pool = flame.Pool("work", max=1, backend="process")

        def runner_pid():
            mark("PID", flame.call(pool, pid_and, 0)[0])

        if __name__ == "__main__":
            runner_pid()
            try:
                if {how!r} == "sync":
                    flame.call(pool, blocked, {str(entered)!r})
                elif {how!r} == "async":
                    asyncio.run(flame.acall(pool, blocked, {str(entered)!r}))
                else:  # a worker thread is blocked; the main thread waits for it
                    t = threading.Thread(target=flame.call, args=(pool, blocked, {str(entered)!r}),
                                         daemon=True)
                    t.start()
                    t.join()
            except KeyboardInterrupt:
                mark("INTERRUPTED", time.monotonic())
                raise
        """
    proc = programs.start(body)
    _started(proc, entered)
    run, took = _after_signal(proc, signal.SIGINT)
    assert any(line.startswith("INTERRUPTED") for line in run.out), run.out
    assert run.code != 0
    assert took < SIGNAL_BOUND, f"the program took {took:.2f}s to end after Ctrl-C"
    assert "KeyboardInterrupt" in run.err
    assert_pids_gone(run.pids, 5)


def test_a_sigterm_handler_that_calls_sys_exit_ends_the_program_promptly(
    programs: Programs, tmp_path: Path
) -> None:
    entered = tmp_path / "entered"
    proc = programs.start(
        f"""
        pool = flame.Pool("work", max=2, backend="process", idle_shutdown_after=None)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))

        if __name__ == "__main__":
            mark("PID", flame.call(pool, pid_and, 0)[0])
            flame.call(pool, blocked, {str(entered)!r})
        """
    )
    _started(proc, entered)
    run, took = _after_signal(proc, signal.SIGTERM)
    assert run.code == 3, run.err
    assert took < SIGNAL_BOUND, f"the program took {took:.2f}s to end after SIGTERM"
    assert_pids_gone(run.pids, 5)


# -- fork ------------------------------------------------------------------------------
@pytest.mark.parametrize("before_fork", ["created", "used"])
def test_a_forked_child_starts_its_pools_afresh(programs: Programs, before_fork: str) -> None:
    run = programs.run(
        f"""
        pool = flame.Pool("forky", max=2, backend="process")

        if __name__ == "__main__":
            if {before_fork!r} == "used":
                mark("PARENT", flame.call(pool, pid_and, 0)[0])
            pid = os.fork()
            if pid == 0:
                started = time.monotonic()
                runner, x = flame.call("forky", pid_and, 21, timeout=10)
                mark("CHILD", runner, x, time.monotonic() - started)
                mark("CHILDSTATS", pool.stats().runners)
                os._exit(0)
            mark("PARENT", flame.call(pool, pid_and, 1)[0])
            os.waitpid(pid, 0)
            mark("PARENT", flame.call(pool, pid_and, 2)[0])
            mark("LAST", time.monotonic())
        """
    )
    assert run.code == 0, run.err
    lines = [line.split() for line in run.out]
    parents = {int(w[1]) for w in lines if w[0] == "PARENT"}
    (child,) = [w for w in lines if w[0] == "CHILD"]
    assert len(parents) == 1, "the parent's pool kept its runner across its child's fork"
    assert int(child[1]) not in parents, "the child must boot its own runner"
    assert child[2] == "21"
    assert ["CHILDSTATS", "1"] in lines
    assert_pids_gone(parents | {int(child[1])}, 10)


def test_fork_while_other_threads_are_mid_call_does_not_deadlock_the_child(
    programs: Programs,
) -> None:
    """Threads hammer the pool (its locks, the connection's locks) while the main thread
    forks; every child must still get its call through, with nothing of the parent's."""
    run = programs.run(
        """
        pool = flame.Pool("busy", max=1, max_concurrency=8, backend="process")
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                flame.call(pool, pid_and, 0)

        if __name__ == "__main__":
            flame.call(pool, pid_and, 0)
            threads = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            for i in range(6):
                time.sleep(0.05)
                pid = os.fork()
                if pid == 0:
                    try:
                        runner, x = flame.call(pool, pid_and, i, timeout=10)
                        mark("CHILD", runner, x)
                    finally:
                        os._exit(0)
                os.waitpid(pid, 0)
            stop.set()
            mark("LAST", time.monotonic())
        """,
        timeout=50,
    )
    assert run.code == 0, run.err
    children = [line.split() for line in run.out if line.startswith("CHILD")]
    assert [c[2] for c in children] == [str(i) for i in range(6)], run.out
    assert len({c[1] for c in children}) == 6, "each child booted a runner of its own"
    assert_pids_gone({int(c[1]) for c in children}, 10)
