"""A parent that dies (SIGKILL) or freezes (SIGSTOP) never leaves runners behind.

Each test runs a parent script (written to ``tmp_path``) in a subprocess. The script starts a
ProcessBackend pool, puts work in flight, writes its runners' pids (as the runners reported
them) to a file, and waits to be killed. The test then kills (or freezes) it and asserts that
every runner is gone within the bound the SPEC promises (runner life cycle: parent lost,
heartbeats, failsafe), and that unlinked work still got to finish.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import pid_alive, wait_until

PARENT = textwrap.dedent(
    """
    import json
    import os
    import sys
    import threading
    import time
    from pathlib import Path

    import flame

    OUT = Path(os.environ["PARENT_OUT"])  # the runners import this too: no sys.argv here


    def hold(name, seconds):
        # pure-Python work in short steps: a cancel interrupts it at once
        (OUT / f"started-{name}").write_text(str(os.getpid()))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
        (OUT / f"finished-{name}").write_text(str(os.getpid()))


    def stuck(name, seconds):
        # one C call that no exception can interrupt
        (OUT / f"started-{name}").write_text(str(os.getpid()))
        time.sleep(seconds)
        (OUT / f"finished-{name}").write_text(str(os.getpid()))


    def call(pool, fn, name, seconds, link=True):
        try:
            pool.call(fn, name, seconds, timeout=None, link=link)
        except Exception:
            pass


    if __name__ == "__main__":
        MODE = sys.argv[1]
        options = {}
        if MODE == "frozen":
            flame.configure(heartbeat_interval=0.2, heartbeat_timeout=1.5)
        if MODE == "booting":
            flame.configure(failsafe_timeout=3)
            options["backend"] = flame.ProcessBackend(app=sys.argv[2])
        else:
            options["backend"] = "process"
        pool = flame.Pool(
            "doomed", max=2, max_concurrency=2, idle_shutdown_after=None,
            shutdown_timeout=20, **options,
        )
        pool.start()
        work = {
            "linked": [(hold, "a", 60, True), (hold, "b", 60, True), (hold, "c", 60, True),
                       (hold, "d", 60, True)],
            "frozen": [(hold, "a", 60, True), (hold, "b", 60, True), (hold, "c", 60, True)],
            "stuck": [(stuck, "a", 60, True), (hold, "b", 60, True)],
            "unlinked": [(hold, "a", 1.5, False), (hold, "b", 60, True)],
            "booting": [(hold, "a", 60, True)],
        }[MODE]
        for fn, name, seconds, link in work:
            threading.Thread(target=call, args=(pool, fn, name, seconds, link), daemon=True).start()
        if MODE != "booting":
            names = [w[1] for w in work]
            deadline = time.monotonic() + 30
            while not all((OUT / f"started-{n}").exists() for n in names):
                assert time.monotonic() < deadline, "work did not start"
                time.sleep(0.01)
            pids = sorted({int((OUT / f"started-{n}").read_text()) for n in names})
            (OUT / "pids.tmp").write_text(json.dumps(pids))
            (OUT / "pids.tmp").rename(OUT / "pids")
        time.sleep(600)  # until killed
    """
)

SLOW_APP = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path

    # a runner importing this app: report our pid, then take a while to boot
    Path(os.environ["BOOTING_PID_FILE"]).write_text(str(os.getpid()))
    time.sleep(1.0)
    """
)


class Parent:
    def __init__(self, tmp_path: Path, mode: str) -> None:
        self.out = tmp_path / "out"
        self.out.mkdir()
        script = tmp_path / "parent_app.py"
        script.write_text(PARENT)
        app = tmp_path / "slow_app.py"
        app.write_text(SLOW_APP)
        env = dict(
            os.environ, PARENT_OUT=str(self.out), BOOTING_PID_FILE=str(self.out / "booting-pid")
        )
        env.pop("FLAME_BACKEND", None)
        self.log = (tmp_path / "parent.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), mode, str(app)],
            cwd=tmp_path,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.runner_pids: list[int] = []

    def wait_for_runners(self) -> list[int]:
        pids_file = self.out / "pids"
        wait_until(
            lambda: pids_file.exists() or self.proc.poll() is not None,
            30,
            message="the parent script never reported its runners",
        )
        assert self.proc.poll() is None, f"the parent script died early:\n{self.output()}"
        self.runner_pids = json.loads(pids_file.read_text())
        assert all(pid_alive(p) for p in self.runner_pids)
        return self.runner_pids

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> float:
        """SIGKILL the parent; return when (monotonic) it happened."""
        self.proc.send_signal(signal.SIGKILL)
        at = time.monotonic()
        self.proc.wait(10)
        return at

    def close(self) -> None:
        # whatever happened, leave nothing behind: the parent, then any runner it reported
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.runner_pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture
def parent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Parent]:
    p = Parent(tmp_path, request.param)
    try:
        yield p
    finally:
        p.close()


def _all_gone_after(pids: list[int], since: float, bound: float) -> float:
    wait_until(
        lambda: not any(pid_alive(p) for p in pids),
        bound + 5,
        message=f"runners {[p for p in pids if pid_alive(p)]} outlived their parent",
    )
    took = time.monotonic() - since
    assert took < bound, f"runners took {took:.1f}s to go (bound {bound}s)"
    return took


@pytest.mark.timeout(40)
@pytest.mark.parametrize("parent", ["linked"], indirect=True)
def test_sigkilled_parent_takes_its_runners_and_their_linked_work_down(parent: Parent) -> None:
    pids = parent.wait_for_runners()
    assert len(pids) == 2  # four calls, two per runner
    killed = parent.kill()
    # default heartbeat settings: the connection drop is noticed at once, linked work is
    # cancelled, and the runner exits
    _all_gone_after(pids, killed, 10)
    assert not list(parent.out.glob("finished-*"))


@pytest.mark.timeout(40)
@pytest.mark.parametrize("parent", ["stuck"], indirect=True)
def test_runner_stuck_in_c_code_still_exits_when_its_parent_dies(parent: Parent) -> None:
    (pid,) = parent.wait_for_runners()
    killed = parent.kill()
    # the stuck call cannot be interrupted: the runner exits after the cancel grace (3 s)
    _all_gone_after([pid], killed, 10)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("parent", ["unlinked"], indirect=True)
def test_unlinked_work_finishes_after_its_parent_died(parent: Parent) -> None:
    (pid,) = parent.wait_for_runners()
    killed = parent.kill()
    # the linked call is cancelled at once, the unlinked one runs to completion (1.5 s,
    # within shutdown_timeout), then the runner exits
    _all_gone_after([pid], killed, 10)
    assert (parent.out / "finished-a").read_text() == str(pid)
    assert not (parent.out / "finished-b").exists()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("parent", ["frozen"], indirect=True)
def test_frozen_parent_is_noticed_by_heartbeats(parent: Parent) -> None:
    pids = parent.wait_for_runners()
    # SIGSTOP: the parent's sockets stay open but it answers nothing, as when the network
    # silently drops packets; heartbeat_timeout is 1.5 s in the script
    parent.proc.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    _all_gone_after(pids, frozen, 6)
    assert not list(parent.out.glob("finished-*"))


@pytest.mark.timeout(40)
@pytest.mark.parametrize("parent", ["booting"], indirect=True)
def test_runner_whose_parent_dies_while_it_boots_exits_by_the_failsafe(parent: Parent) -> None:
    booting_pid = parent.out / "booting-pid"
    wait_until(booting_pid.exists, 30, message="no runner started booting")
    pid = int(wait_until(booting_pid.read_text, 5))
    parent.runner_pids = [pid]
    killed = parent.kill()
    # it is still importing the app; then it cannot reach its parent, and the failsafe
    # (3 s from its start, configured in the script) ends it
    _all_gone_after([pid], killed, 8)
