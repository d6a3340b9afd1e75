"""``ProcessBackend``'s fork server (``flame.backends._zygote``), with real processes.

What a user relies on: a runner forked by the fork server is a runner like a spawned one
(its own session, a runner's command line, no secret in its command line or initial
environment, the leak checks find it, its exit status reaches the error messages, its
output goes where it went), the fork server is shared and never outlives its parent, the
``preload`` modules are imported there once, and where forking would not be safe (a
preload that starts a thread or fails, another ``python``, ``fork_server=False``) runners
are spawned instead and still work. A boot abandoned while its runner is being forked
leaves no process behind, and a fork server that dies takes no runner's end unnoticed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import flame
from flame import _loop
from flame._exits import ExitCode
from flame._parent import LaunchInfo
from flame.backends import _zygote
from helpers import assert_pids_gone, pid_alive, runner_pids, wait_until
from helpers.parent.wire_tools import RecordingProcessBackend
from helpers.runner import fork_work as work

pytestmark = pytest.mark.skipif(not _zygote.supported(), reason="no fork server here")

HELPERS = Path(__file__).parent / "helpers"


def _cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[:-1]


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _where(backend: flame.ProcessBackend, name: str, **opts: Any) -> dict[str, Any]:
    with flame.Pool(name, max=1, backend=backend, **opts) as pool:
        where: dict[str, Any] = pool.call(work.whereami)
        assert where["pid"] in runner_pids(), "the leak checks must see this runner"
        return where


@pytest.mark.timeout(30)
def test_a_forked_runner_is_a_runner_in_every_way_the_system_shows(
    runner_pids_seen: set[int],
) -> None:
    backend = RecordingProcessBackend()
    where = _where(backend, "fork-where")
    runner_pids_seen.add(where["pid"])
    zygote = where["ppid"]
    # forked by the fork server, our child, whose command line says what it is
    assert zygote != os.getpid() and _ppid(zygote) == os.getpid()
    assert _cmdline(zygote)[-3:] == [b"-m", b"flame", b"zygote"]
    assert isinstance(backend.handles[0].proc, _zygote.ForkedProcess)
    # a runner's command line, its own session and process group
    assert where["cmdline"][1:] == [b"-m", b"flame", b"runner"]
    assert where["sid"] == where["pid"] == where["pgid"]
    # the secret was in no command line and no initial environment, and is gone now
    secret = backend.infos[0].secret.hex()
    assert not where["flame_parent_in_environ"] and where["flame_parent_now"] is None
    assert where["zygote_fd_var"] is None
    assert all(secret not in arg.decode() for arg in _cmdline(zygote))
    # nothing of the fork server's descriptors: 0-2, and what the runner opened itself
    assert where["fds"][:3] == [0, 1, 2]
    # the next pool's runner comes from the same fork server
    again = _where(flame.ProcessBackend(), "fork-where-again")
    runner_pids_seen.add(again["pid"])
    assert again["ppid"] == zygote


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("how", "expected"), [("3", "exited with code 3"), ("kill", "SIGKILL")])
def test_the_exit_status_of_a_forked_runner_reaches_the_error(
    how: str, expected: str, runner_pids_seen: set[int]
) -> None:
    backend = RecordingProcessBackend()
    with flame.Pool(f"fork-exit-{how}", max=1, backend=backend) as pool:
        runner_pids_seen.add(pool.call(work.whereami)["pid"])
        with pytest.raises(flame.RunnerLost) as info:
            pool.call(work.die, how, timeout=15)
    assert expected in str(info.value)
    proc = backend.procs[0]
    assert isinstance(proc, _zygote.ForkedProcess)
    assert proc.wait(5) == (3 if how == "3" else -signal.SIGKILL)


@pytest.mark.timeout(30)
def test_a_forked_runner_whose_app_fails_shows_its_output_in_the_boot_error() -> None:
    backend = RecordingProcessBackend(app=str(HELPERS / "runner" / "lifecycle_bad_app.py"))
    pool = flame.Pool("fork-bad-app", min=1, max=1, backend=backend, boot_timeout=15)
    with pytest.raises(flame.BootError) as info:
        pool.start()
    message = str(info.value)
    assert f"exited with code {int(ExitCode.APP_FAILED)}" in message
    assert "RuntimeError: lifecycle_bad_app_marker" in message  # the pipe's last lines
    assert isinstance(backend.procs[0], _zygote.ForkedProcess)


@pytest.mark.timeout(30)
def test_a_forked_runner_that_does_not_forward_writes_to_our_descriptors(
    capfd: pytest.CaptureFixture[str],
) -> None:
    backend = flame.ProcessBackend()
    with flame.Pool("fork-quiet", max=1, backend=backend, forward_output=False) as pool:
        assert pool.call(work.whereami)["ppid"] != os.getpid()
        pool.call(work.say, "fork-server-output-marker")
    out, err = capfd.readouterr()
    assert "fork-server-output-marker" in out and "fork-server-output-marker" in err
    assert "[" not in out.split("fork-server-output-marker")[0][-2:]  # not forwarded


@pytest.mark.timeout(30)
def test_preloaded_modules_are_imported_once_in_the_fork_server(
    runner_pids_seen: set[int],
) -> None:
    backend = flame.ProcessBackend(preload=["helpers.runner.fork_preload_marker"])
    first = _where(backend, "fork-preload-1")
    second = _where(
        flame.ProcessBackend(preload=["helpers.runner.fork_preload_marker"]), "fork-p-2"
    )
    runner_pids_seen.update((first["pid"], second["pid"]))
    assert first["preloaded_in"] == first["ppid"] == second["preloaded_in"]
    assert first["pid"] != second["pid"]
    # another preload list is another fork server, which has not imported it
    plain = _where(flame.ProcessBackend(), "fork-preload-none")
    runner_pids_seen.add(plain["pid"])
    assert plain["ppid"] != first["ppid"] and plain["preloaded_in"] is None


@pytest.mark.timeout(40)
@pytest.mark.parametrize(
    ("module", "why"),
    [
        ("helpers.runner.fork_preload_thread", "2 threads after preloading (Python threads: pre"),
        ("helpers.no_such_module_here", "ModuleNotFoundError"),
        ("helpers.runner.fork_preload_calls", "CalledWhileImporting"),
    ],
)
def test_an_unsafe_or_failing_preload_falls_back_to_spawning(
    module: str, why: str, caplog: pytest.LogCaptureFixture, runner_pids_seen: set[int]
) -> None:
    caplog.set_level(logging.WARNING, logger="flame")
    where = _where(flame.ProcessBackend(preload=[module]), "fork-unsafe")
    runner_pids_seen.add(where["pid"])
    assert where["ppid"] == os.getpid()  # spawned by us
    warned = [r.getMessage() for r in caplog.records if "fork server" in r.getMessage()]
    assert len(warned) == 1 and why in warned[0], warned
    # said once: the next runner is spawned without another word
    runner_pids_seen.add(_where(flame.ProcessBackend(preload=[module]), "fork-unsafe-2")["pid"])
    assert len([r for r in caplog.records if "fork server" in r.getMessage()]) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["fork_server=False", "python=other"])
def test_runners_are_spawned_where_forking_is_not_asked_for(
    how: str, tmp_path: Path, runner_pids_seen: set[int]
) -> None:
    if how == "fork_server=False":
        backend = flame.ProcessBackend(fork_server=False)
    else:  # another interpreter (here a wrapper of ours): it may do things per runner
        other = tmp_path / "python"
        other.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        other.chmod(0o755)
        backend = flame.ProcessBackend(python=str(other))
    where = _where(backend, "fork-no")
    runner_pids_seen.add(where["pid"])
    assert where["ppid"] == os.getpid()
    assert where["cmdline"][1:] == [b"-m", b"flame", b"runner"]


@pytest.mark.timeout(30)
def test_a_changed_environment_reaches_new_runners(
    monkeypatch: pytest.MonkeyPatch, runner_pids_seen: set[int]
) -> None:
    before = _where(flame.ProcessBackend(), "fork-env-1")
    monkeypatch.setenv("FLAME_TEST_FORK_ENV", "changed")
    after = _where(flame.ProcessBackend(), "fork-env-2")
    runner_pids_seen.update((before["pid"], after["pid"]))
    assert after["env"] == {"FLAME_TEST_FORK_ENV": "changed"}
    assert after["ppid"] != before["ppid"]  # a fork server started with that environment
    assert _ppid(after["ppid"]) == os.getpid()


class PerRunnerEnv(flame.ProcessBackend):
    """Gives each runner a variable of its own in its launch (as FLAME_PARENT is)."""

    async def boot(self, launch: flame.RunnerLaunch) -> flame.RunnerHandle:
        env = {**launch.env, "FLAME_TEST_RUNNER": launch.runner_id}
        return await super().boot(dataclasses.replace(launch, env=env))


@pytest.mark.timeout(30)
def test_what_a_launch_sets_for_one_runner_reaches_it_from_the_shared_fork_server(
    runner_pids_seen: set[int],
) -> None:
    with flame.Pool("fork-launch-env", max=2, max_concurrency=1, backend=PerRunnerEnv()) as pool:
        first = pool.call(work.whereami)
        again = _where(PerRunnerEnv(), "fork-launch-env-2")
    runner_pids_seen.update((first["pid"], again["pid"]))
    assert first["env"]["FLAME_TEST_RUNNER"].startswith("fork-launch-env-")
    assert again["env"]["FLAME_TEST_RUNNER"].startswith("fork-launch-env-2-")
    assert first["ppid"] == again["ppid"] != os.getpid()  # one fork server for both


@pytest.mark.timeout(40)
def test_a_dead_fork_server_loses_no_runner_and_is_replaced(
    runner_pids_seen: set[int],
) -> None:
    backend = RecordingProcessBackend()
    with flame.Pool("fork-zygote-dies", max=2, max_concurrency=1, backend=backend) as pool:
        where = pool.call(work.whereami)
        runner_pids_seen.add(where["pid"])
        os.kill(where["ppid"], signal.SIGKILL)
        assert_pids_gone([where["ppid"]], what="fork server")
        # the runner lives on, serves, and its end is still noticed (without its status)
        assert pool.call(work.whereami)["pid"] == where["pid"]
        handle = backend.handles[0]
        os.kill(where["pid"], signal.SIGKILL)
        assert "exit status was lost" in _loop.run(handle.wait(), timeout=10)
        assert handle.proc.poll() is None and handle.proc.status_lost
        # the next runner comes from a new fork server
        wait_until(lambda: pool.stats().runners == 0, 10)
        fresh = pool.call(work.whereami)
        runner_pids_seen.add(fresh["pid"])
        assert fresh["ppid"] not in (where["ppid"], os.getpid())


@pytest.mark.timeout(30)
def test_a_boot_abandoned_while_forking_leaves_no_runner() -> None:
    """The boot is cancelled before the fork server answers: the runner it forked anyway
    is killed as soon as the answer comes."""
    info = LaunchInfo(
        runner_id="abandoned",
        secret=os.urandom(32),
        addresses=(("127.0.0.1", 9),),  # nobody there: it would retry until the failsafe
        pool="fork-abandoned",
        backend="process",
        failsafe=30.0,
    )
    env = dict(os.environ)
    server = _zygote.server_for(sys.executable, env, os.getcwd(), sys.path, ())
    assert server is not None
    before = runner_pids()

    async def abandon() -> None:
        await server._wait_ready()
        env = {"FLAME_PARENT": info.encode()}
        task = asyncio.ensure_future(server.fork(env, forward_output=True))
        await asyncio.sleep(0)  # the request is out
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(abandon())
    wait_until(lambda: not server._pending and not server._children, 10)
    assert runner_pids() <= before


@pytest.mark.timeout(60)
def test_the_fork_server_does_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            import flame
            sys.path.insert(0, sys.argv[1])
            from helpers.runner import fork_work

            if __name__ == "__main__":
                with flame.Pool("fork-parent", max=1, backend=flame.ProcessBackend()) as p:
                    where = p.call(fork_work.whereami)
                    print(where["ppid"], where["pid"], flush=True)
                    time.sleep(60)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(HELPERS.parent)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        zygote, runner = map(int, proc.stdout.readline().split())
        assert pid_alive(zygote) and pid_alive(runner)
        proc.kill()
        proc.wait()
        assert_pids_gone([zygote], 10, what="fork server")
        assert_pids_gone([runner], 20)  # it lost its parent, as a spawned runner does
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.timeout(30)
def test_a_fork_server_closed_while_starting_fails_its_boots_at_once() -> None:
    """Whoever waits for a fork server that will never be ready hears so (and spawns)."""
    server = _zygote.ForkServer(sys.executable, dict(os.environ), os.getcwd(), sys.path, ())
    server.close(wait=10)
    with pytest.raises(_zygote.Unavailable):
        asyncio.run(asyncio.wait_for(server.fork({"FLAME_PARENT": "x"}, True), 10))
    wait_until(lambda: server.state in ("gone", "failed"), 10)
    assert server._proc is not None and server._proc.poll() is not None
