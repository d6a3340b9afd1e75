"""The runner's terminator (SPEC "Runner life cycle"), with real runner processes.

Each way a runner ends is checked through what a user sees (``BootError`` messages, pool
stats, calls that complete or fail) and through the runner's exit code, which names the
reason (``flame._exits.ExitCode``). Exit codes are read from the process handles a
``RecordingProcessBackend`` keeps, or from runners started by hand with a ``FLAME_PARENT``
built with ``LaunchInfo(...).encode()``.

* failsafe: a runner that cannot reach its parent, or whose parent never answers the
  handshake, exits with FAILSAFE after the failsafe time;
* a missing or malformed ``FLAME_PARENT`` exits with BAD_ENV and a message that says what is
  wrong, never showing the secret;
* an app whose import raises exits with APP_FAILED, and the pool's ``BootError`` carries the
  tail of its stderr; an app that hangs at import fails the boot after ``boot_timeout`` and
  leaves no process behind;
* idle shutdown, plain and with a check run on the runner; single use (and ``min`` kept);
* drain on ``pool.stop()``: in-flight work finishes within ``shutdown_timeout``, and is
  cancelled after it;
* parent loss (the parent process is SIGKILLed): linked work is terminated at once,
  unlinked work runs to completion within ``shutdown_timeout`` (and is cancelled past it),
  and the runner exits afterwards.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flame
from flame._exits import ExitCode
from helpers import pid_alive, wait_until
from helpers.parent.callers import Caller
from helpers.parent.wire_tools import (
    RecordingProcessBackend,
    finish,
    launch_info,
    start_runner,
)
from helpers.runner import wire_work as work

HELPERS = Path(__file__).parent / "helpers"
BAD_APP = str(HELPERS / "runner" / "lifecycle_bad_app.py")
HANG_APP = str(HELPERS / "runner" / "lifecycle_hang_app.py")


@pytest.fixture
def fast(flame_defaults: None) -> None:
    flame.configure(heartbeat_interval=0.2, heartbeat_timeout=1.0, cancel_grace=0.5)


def exit_code(proc: Any, timeout: float = 10.0) -> int:
    wait_until(lambda: proc.poll() is not None, timeout, message="the runner is still running")
    return int(proc.returncode)


def assert_secret_absent(text: str, secret: bytes) -> None:
    assert secret.hex() not in text and secret.hex().upper() not in text


# -- failsafe --------------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_failsafe_when_the_parent_is_unreachable() -> None:
    with socket.socket() as reserved:  # bound, not listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        info = launch_info(addresses=(("127.0.0.1", reserved.getsockname()[1]),), failsafe=1.0)
        code, err, took = finish(start_runner(info.encode()), 10)
    assert code == ExitCode.FAILSAFE, err
    assert "failsafe" in err or "could not reach the parent" in err
    assert took < 4
    assert_secret_absent(err, info.secret)


@pytest.mark.timeout(20)
def test_failsafe_when_the_parent_never_answers_the_handshake() -> None:
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts (backlog), never speaks
        info = launch_info(addresses=(("127.0.0.1", mute.getsockname()[1]),), failsafe=1.0)
        code, err, took = finish(start_runner(info.encode()), 10)
    assert code == ExitCode.FAILSAFE, err
    # well before the 5 s the handshake itself would wait
    assert took < 3.5, took
    assert_secret_absent(err, info.secret)


# -- FLAME_PARENT ----------------------------------------------------------------------------------
def _b64(doc: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()


SECRET = os.urandom(32)
_GOOD: dict[str, Any] = json.loads(base64.urlsafe_b64decode(launch_info(secret=SECRET).encode()))
BAD_ENVS: dict[str, tuple[str | None, str]] = {
    "missing": (None, "FLAME_PARENT is not set"),
    "empty": ("", "FLAME_PARENT is not set"),
    "not-base64": ("!!! not base64 !!!", "not base64-encoded JSON"),
    "base64-not-json": (base64.urlsafe_b64encode(b"\x80\x81garbage").decode(), "not base64"),
    "not-an-object": (_b64([1, 2, 3]), "must hold a JSON object"),
    "other-encoding": (_b64({**_GOOD, "v": 99}), "encoding version 99"),
    "no-address": (_b64({k: v for k, v in _GOOD.items() if k != "addrs"}), "malformed field"),
    "bad-secret": (_b64({**_GOOD, "secret": SECRET.hex() + "zz"}), "malformed field"),
}


@pytest.mark.parametrize("case", list(BAD_ENVS))
def test_a_bad_flame_parent_exits_with_bad_env(case: str) -> None:
    value, expected = BAD_ENVS[case]
    code, err, _ = finish(start_runner(value), 10)
    assert code == ExitCode.BAD_ENV, err
    assert "FLAME_PARENT" in err and expected in err, err
    assert "Traceback" not in err  # a clear message, not a crash
    assert_secret_absent(err, SECRET)


# -- booting the app -------------------------------------------------------------------------------
@pytest.mark.timeout(20)
def test_an_app_that_raises_at_import_fails_the_boot_with_its_stderr() -> None:
    backend = RecordingProcessBackend(app=BAD_APP)
    pool = flame.Pool("life-bad-app", min=1, max=1, backend=backend, boot_timeout=15)
    started = time.monotonic()
    with pytest.raises(flame.BootError) as info:
        pool.start()
    assert time.monotonic() - started < 10  # at once, not after boot_timeout
    message = str(info.value)
    assert f"exited with code {int(ExitCode.APP_FAILED)}" in message
    assert "importing the application raised" in message
    # the tail of the runner's stderr: what the app printed, and its traceback
    assert "lifecycle_bad_app: configuring the database" in message
    assert "RuntimeError: lifecycle_bad_app_marker" in message
    assert exit_code(backend.procs[0]) == ExitCode.APP_FAILED
    assert_secret_absent(message, backend.infos[0].secret)


@pytest.mark.timeout(20)
def test_an_app_that_hangs_at_import_fails_after_boot_timeout_and_is_killed() -> None:
    backend = RecordingProcessBackend(app=HANG_APP)
    pool = flame.Pool("life-hang-app", min=1, max=1, backend=backend, boot_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(flame.BootError) as info:
        pool.start()
    took = time.monotonic() - started
    assert 1.0 <= took < 4, took
    message = str(info.value)
    assert "boot_timeout=1s" in message
    assert "lifecycle_hang_app: waiting for a lock" in message
    proc = backend.procs[0]
    assert proc.poll() is not None, "the hung runner was left running"
    assert not pid_alive(proc.pid)


# -- idle shutdown ---------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_an_idle_runner_shuts_down_and_the_pool_shrinks(fast: None) -> None:
    shrinks: list[dict[str, Any]] = []
    backend = RecordingProcessBackend()
    with flame.Pool(
        "life-idle",
        max=1,
        backend=backend,
        idle_shutdown_after=0.5,
        on_shrink=shrinks.append,
    ) as pool:
        pid, _ = pool.call(work.whoami)
        # work longer than the idle time does not count as idle
        assert pool.call(work.nap, 1.0) == pid
        assert pool.stats().runners == 1
        wait_until(lambda: pool.stats().runners == 0, 5, message="the idle runner stayed")
        assert exit_code(backend.procs[0]) == ExitCode.IDLE
        wait_until(lambda: shrinks, 5)
        assert shrinks[-1] == {"name": "life-idle", "count": 0}
        # and the pool grows again on demand
        again, _ = pool.call(work.whoami)
        assert again != pid
    assert not pid_alive(again)


@pytest.mark.timeout(30)
def test_an_idle_check_on_the_runner_decides(fast: None, tmp_path: Path) -> None:
    gate, log = tmp_path / "may-go", tmp_path / "checks.log"
    check = functools.partial(work.idle_check, str(gate), str(log))
    backend = RecordingProcessBackend()
    with flame.Pool(
        "life-idle-check", max=1, backend=backend, idle_shutdown_after=(0.2, check)
    ) as pool:
        pid, _ = pool.call(work.whoami)
        # the check runs on the runner, again and again, and says "not yet"
        wait_until(lambda: log.exists() and len(log.read_text().split()) >= 4, 10)
        assert set(log.read_text().split()) == {str(pid)}
        assert pool.stats().runners == 1 and backend.procs[0].poll() is None
        gate.touch()
        wait_until(lambda: pool.stats().runners == 0, 5, message="the check passed, runner stayed")
        assert exit_code(backend.procs[0]) == ExitCode.IDLE


# -- single use ------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_a_single_use_runner_exits_after_its_call_and_min_is_kept(fast: None) -> None:
    backend = RecordingProcessBackend()
    with flame.Pool("life-single", min=1, max=2, backend=backend, single_use=True) as pool:
        assert len(backend.procs) == 1
        first, _ = pool.call(work.whoami)
        assert backend.procs[0].pid == first
        assert exit_code(backend.procs[0]) == ExitCode.SINGLE_USE
        # a replacement keeps min=1
        wait_until(lambda: pool.stats().runners == 1 and len(backend.procs) == 2, 10)
        second, _ = pool.call(work.whoami)
        assert second != first and backend.procs[1].pid == second
        assert exit_code(backend.procs[1]) == ExitCode.SINGLE_USE
        wait_until(lambda: pool.stats().runners == 1, 10)
    for proc in backend.procs:
        assert proc.poll() is not None


# -- drain -----------------------------------------------------------------------------------------
def _stopping(pool: flame.Pool) -> bool:
    try:
        pool.call(work.nap, 0)
    except flame.PoolClosed:
        return True
    return False


@pytest.mark.timeout(30)
def test_stop_lets_in_flight_work_finish_within_shutdown_timeout(
    fast: None, tmp_path: Path
) -> None:
    backend = RecordingProcessBackend()
    pool = flame.Pool("life-drain", max=1, backend=backend, shutdown_timeout=10).start()
    call = Caller(pool.call, work.gated, str(tmp_path), "a")
    wait_until((tmp_path / "a.started").exists, 10)
    stopper = Caller(pool.stop)
    wait_until(lambda: _stopping(pool), 5)
    # the pool takes no calls, but the one in flight keeps running
    assert stopper.is_alive() and call.is_alive()
    assert backend.procs[0].poll() is None
    (tmp_path / "a.gate").touch()
    assert call.outcome(10) == "a done"
    stopper.outcome(10)
    assert exit_code(backend.procs[0]) == ExitCode.STOPPED


@pytest.mark.timeout(30)
def test_stop_cancels_work_that_outlasts_shutdown_timeout(fast: None, tmp_path: Path) -> None:
    backend = RecordingProcessBackend()
    pool = flame.Pool("life-drain-late", max=1, backend=backend, shutdown_timeout=0.5).start()
    call = Caller(pool.call, work.gated, str(tmp_path), "b")
    wait_until((tmp_path / "b.started").exists, 10)
    started = time.monotonic()
    pool.stop()
    took = time.monotonic() - started
    assert 0.5 <= took < 0.5 + 0.5 + 2.5, took  # shutdown_timeout, then the cancel grace
    err = call.failure(5)
    assert isinstance(err, flame.FlameError), err
    assert (tmp_path / "b.cancelled").exists()  # the work was interrupted on the runner
    assert not (tmp_path / "b.done").exists()
    assert exit_code(backend.procs[0]) == ExitCode.STOPPED


# -- parent loss -----------------------------------------------------------------------------------
@pytest.fixture
def parent_process(tmp_path: Path) -> Iterator[Any]:
    """Starts ``helpers/parent/lifecycle_parent.py`` (a parent with one runner doing linked and
    unlinked work); yields a function that starts it and returns (parent, runner pid)."""
    procs: list[subprocess.Popen[bytes]] = []
    pids: list[int] = []

    def start(shutdown_timeout: float, unlinked_seconds: float) -> tuple[Any, int]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HELPERS.parent), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen(
            [
                sys.executable,
                str(HELPERS / "parent" / "lifecycle_parent.py"),
                str(tmp_path),
                str(shutdown_timeout),
                str(unlinked_seconds),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        procs.append(proc)
        pid_file = tmp_path / "runner.pid"
        wait_until(pid_file.exists, 15, message="the parent did not boot its runner")
        wait_until(lambda: pid_file.read_text().strip(), 5)
        pids.append(int(pid_file.read_text()))
        wait_until((tmp_path / "linked.started").exists, 10)
        wait_until((tmp_path / "unlinked.started").exists, 10)
        return proc, pids[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for pid in pids:  # an orphaned runner is no longer our descendant: check it by pid
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"runner {pid} outlived its parent")


def _stamp(path: Path) -> float:
    return float(path.read_text().split()[-1])


@pytest.mark.timeout(40)
def test_parent_loss_terminates_linked_work_and_lets_unlinked_work_finish(
    parent_process: Any, tmp_path: Path
) -> None:
    parent, runner = parent_process(shutdown_timeout=10.0, unlinked_seconds=1.5)
    parent.kill()  # SIGKILL: no goodbye, the kernel closes its sockets
    killed_at = time.monotonic()
    parent.wait()
    linked_cancelled = tmp_path / "linked.cancelled"
    wait_until(linked_cancelled.exists, 5, message="linked work kept running")
    assert _stamp(linked_cancelled) - killed_at < 1.0  # at once
    # unlinked work goes on to the end, and the runner waits for it
    unlinked_done = tmp_path / "unlinked.done"
    wait_until(unlinked_done.exists, 10, message="unlinked work did not complete")
    assert not (tmp_path / "unlinked.cancelled").exists()
    wait_until(lambda: not pid_alive(runner), 5, message="the runner stayed after its work")
    assert not (tmp_path / "linked.done").exists()


@pytest.mark.timeout(40)
def test_parent_loss_gives_unlinked_work_only_shutdown_timeout(
    parent_process: Any, tmp_path: Path
) -> None:
    parent, runner = parent_process(shutdown_timeout=1.0, unlinked_seconds=60.0)
    parent.kill()
    killed_at = time.monotonic()
    parent.wait()
    wait_until((tmp_path / "linked.cancelled").exists, 5)
    unlinked_cancelled = tmp_path / "unlinked.cancelled"
    wait_until(unlinked_cancelled.exists, 10, message="unlinked work ran past shutdown_timeout")
    assert 0.8 <= _stamp(unlinked_cancelled) - killed_at < 1.0 + 1.5
    wait_until(lambda: not pid_alive(runner), 5, message="the runner did not exit")
    assert not (tmp_path / "unlinked.done").exists()
