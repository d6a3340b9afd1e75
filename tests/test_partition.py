"""Real network partitions between a parent and its runner (Linux network namespaces).

The runner of a ``ProcessBackend`` pool starts inside a network namespace, joined to this
process by a veth pair (``helpers.parent.netns``): the parent's listener binds the parent-side
address and the runner dials it across the pair. The test then cuts the pair in one of two
silent ways, neither of which sends a FIN or an RST to anyone:

* ``link``: the parent-side veth is set down (the cable is pulled);
* ``drop``: nftables in the namespace drops every packet in and out (a silent firewall).

What must hold, with ``heartbeat_interval=0.2`` and ``heartbeat_timeout=1.5``:

* the call in flight fails with ``flame.RunnerLost`` within the heartbeat timeout plus slack;
* the runner notices the silent parent by itself: its linked work is cancelled and it exits
  with code 205 (parent lost) within the same bound. Its backend does not kill it when the
  pool asks, but waits for it to leave first, as a parent that cannot reach the runner's
  host would have to (``WatchedHandle``), so the exit is the runner's own doing. In the
  ``drop-unobserved`` case the backend does not even report the exit (as a cloud API out
  of reach could not): the parent has only its heartbeats to go by;
* the pool replaces it; once the link is healed the next call runs on the replacement, and
  nothing half-dead remains: no process of the old runner in the namespace, no slot held,
  no connection of the old runner on either side of the link;
* a partition shorter than the heartbeat timeout loses nothing: the call in flight
  completes on the same runner.

Skipped (with the reason) without root, ``ip`` or ``nft``, or where a namespace with a veth
pair and an nftables table cannot be made. The figures (how long each side took to notice)
are printed: ``pytest tests/test_partition.py -s``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import flame
from flame._exits import ExitCode
from helpers import pid_alive, wait_until
from helpers.parent.callers import Caller
from helpers.parent.netns import (
    CUTS,
    Netns,
    NetnsBackend,
    TcpSocket,
    my_sockets,
    root_tcp,
    unavailable,
)
from helpers.parent.netns import write_wrapper as make_wrapper
from helpers.runner import wire_work as work

HB_INTERVAL = 0.2
HB_TIMEOUT = 1.5
# what may pass beyond the heartbeat timeout before a side has noticed: the last heartbeat
# heard may be one interval old at the cut, the parent waits up to 1 s for the backend to
# report an exit status, plus scheduling on a busy machine. A bound on the guarantee, not a
# performance target.
SLACK = 3.0
BOUND = HB_TIMEOUT + SLACK


@pytest.fixture(scope="session")
def netns_available() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"network partition tests need network namespaces: {reason}")


@pytest.fixture
def netns(netns_available: None) -> Iterator[Netns]:
    ns = Netns()
    ns.create()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def wrapper(tmp_path: Path) -> str:
    return make_wrapper(str(tmp_path))


@pytest.fixture
def fast_heartbeats(flame_defaults: None) -> None:
    flame.configure(heartbeat_interval=HB_INTERVAL, heartbeat_timeout=HB_TIMEOUT, cancel_grace=0.5)


def _pool(name: str, backend: flame.Backend) -> flame.Pool:
    # min=1: a lost runner is replaced at once; boot_timeout covers the partition, so the
    # replacement that boots while it lasts can still dial in once it is healed
    return flame.Pool(
        name,
        min=1,
        max=1,
        max_concurrency=2,
        backend=backend,
        idle_shutdown_after=None,
        boot_timeout=20,
        shutdown_timeout=2,
    )


def _listener_port(address: str) -> int:
    (port,) = {s.local[1] for s in root_tcp() if s.local[0] == address and s.state == "LISTEN"}
    return port


# a connection in these states is one that some side still takes for open
OPEN = ("ESTABLISHED", "CLOSE_WAIT")


def _parent_side(address: str, port: int) -> list[TcpSocket]:
    """Open connections on the parent's listener at ``address:port`` (whoever holds them)."""
    return [s for s in root_tcp() if s.local == (address, port) and s.state in OPEN]


def _runner_side(ns: Netns, port: int) -> list[TcpSocket]:
    """Open connections to the parent's listener inside the namespace."""
    return [s for s in ns.tcp() if s.remote == (ns.parent_addr, port) and s.state in OPEN]


class ExitWatch(threading.Thread):
    """Polls (every 10 ms, for at most ``limit`` seconds) until process ``pid`` is gone and
    notes when: the runner's exit is timed while the test waits for the caller."""

    def __init__(self, pid: int, limit: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.limit = pid, limit
        self.gone_at: float | None = None
        self.start()

    def run(self) -> None:
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not pid_alive(self.pid), self.limit)
            self.gone_at = time.monotonic()


def _settled(pool: flame.Pool, runners: int) -> bool:
    s = pool.stats()
    return (s.runners, s.booting, s.in_flight, s.waiting) == (runners, 0, 0, 0)


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("cut", "blind"),
    [*((c, False) for c in CUTS), ("drop", True)],
    ids=[*CUTS, "drop-unobserved"],
)
def test_a_partition_is_noticed_by_both_sides_and_leaves_nothing_half_dead(
    cut: str,
    blind: bool,
    netns: Netns,
    wrapper: str,
    fast_heartbeats: None,
    runner_pids_seen: set[int],
    tmp_path: Path,
) -> None:
    # blind: the backend cannot tell the pool that the runner exited (as a cloud API out of
    # reach would): the parent has only its heartbeats to go by
    backend = NetnsBackend(netns, wrapper, patience=BOUND + 2.0, blind=blind)
    name = f"{cut}-unobserved" if blind else cut
    with _pool(f"partition-{name}", backend) as pool:
        old, _ = pool.call(work.whoami, timeout=10)
        runner_pids_seen.add(old)
        assert netns.holds(old), "the runner is not inside the namespace"
        assert not netns.holds(os.getpid())
        assert netns.pids() == {old}
        port = _listener_port(netns.parent_addr)
        assert [s.remote for s in _parent_side(netns.parent_addr, port)] == [
            (netns.runner_addr, s.local[1]) for s in _runner_side(netns, port)
        ], "the runner does not reach the parent across the veth pair"

        caller = Caller(pool.call, work.timed, str(tmp_path), "inflight", 30, timeout=25)
        wait_until((tmp_path / "inflight.started").exists, 10)
        cut_at = time.monotonic()
        netns.cut(cut)
        exit_watch = ExitWatch(old, BOUND + 5)

        # the parent: the call in flight fails with RunnerLost within the heartbeat bound
        err = caller.failure(BOUND + 5)
        parent_noticed = caller.started_at + caller.elapsed - cut_at
        assert isinstance(err, flame.RunnerLost), repr(err)
        assert parent_noticed < BOUND, f"the parent noticed after {parent_noticed:.2f}s"
        if blind:
            assert "heartbeat" in str(err), str(err)

        # the runner: cancels its linked work and exits on its own (205), within the bound
        exit_watch.join(BOUND + 6)
        assert exit_watch.gone_at is not None, "the partitioned runner did not exit"
        runner_exited = exit_watch.gone_at - cut_at
        assert runner_exited < BOUND, f"the runner exited after {runner_exited:.2f}s"
        handle = backend.handle_of(old)
        wait_until(lambda: handle.returncode is not None and handle.stopped, 5)
        assert handle.returncode == ExitCode.PARENT_LOST, handle.returncode
        assert not handle.killed, "the pool had to kill the runner: it did not leave by itself"
        cancelled = (tmp_path / "inflight.cancelled").read_text().split()
        runner_noticed = float(cancelled[1]) - cut_at
        assert not (tmp_path / "inflight.done").exists()
        print(
            f"\npartition[{name}]: parent noticed (RunnerLost) after {parent_noticed:.2f}s, "
            f"runner cancelled its call after {runner_noticed:.2f}s and exited (205) after "
            f"{runner_exited:.2f}s (heartbeat {HB_INTERVAL}s/{HB_TIMEOUT}s)\n  caller saw: {err}"
        )

        # the parent let go of the old runner's connection while the partition lasts
        mine = my_sockets()
        assert not [s for s in _parent_side(netns.parent_addr, port) if s.inode in mine]

        # heal: the replacement (booting in the same namespace meanwhile) dials in
        netns.heal()
        healed_at = time.monotonic()
        new = pool.call(work.nap, 0, timeout=15)
        runner_pids_seen.add(new)
        served = time.monotonic() - healed_at
        assert new != old and netns.holds(new)
        print(f"partition[{name}]: healed; the replacement served a call {served:.2f}s later")

        # nothing half-dead: the old runner is gone, no slot is held, and the only
        # connection on either side of the link is the replacement's
        assert netns.pids() == {new}
        wait_until(lambda: _settled(pool, runners=1), 5, message="the pool did not settle")
        wait_until(
            lambda: (
                len(_parent_side(netns.parent_addr, port)) == 1
                and len(_runner_side(netns, port)) == 1
            ),
            5,
            message="a connection of the old runner is still open on one side",
        )
        (conn,) = _parent_side(netns.parent_addr, port)
        (peer,) = _runner_side(netns, port)
        assert conn.state == peer.state == "ESTABLISHED"
        assert conn.remote == (netns.runner_addr, peer.local[1])
        assert conn.inode in my_sockets()
        assert peer.inode in _socket_inodes(new), "the connection is not the replacement's"
        assert pool.call(work.nap, 0, timeout=10) == new
    assert netns.pids() == set()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cut", CUTS)
def test_a_partition_shorter_than_the_heartbeat_timeout_loses_nothing(
    cut: str,
    netns: Netns,
    wrapper: str,
    fast_heartbeats: None,
    runner_pids_seen: set[int],
    tmp_path: Path,
) -> None:
    backend = NetnsBackend(netns, wrapper)
    with _pool(f"blip-{cut}", backend) as pool:
        first, _ = pool.call(work.whoami, timeout=10)
        runner_pids_seen.add(first)
        caller = Caller(pool.call, work.timed, str(tmp_path), "blip", 1.5, timeout=25)
        wait_until((tmp_path / "blip.started").exists, 10)
        netns.cut(cut)
        # a silent outage well under the timeout (TCP retransmits what was lost in it):
        # a bounded wait, not a synchronisation; nothing can be awaited during a partition
        time.sleep(0.3)
        netns.heal()
        assert caller.outcome(10) == "blip done"
        assert pool.call(work.nap, 0, timeout=10) == first
        s = pool.stats()
        assert (s.runners, s.in_flight, s.waiting) == (1, 0, 0)
        assert pid_alive(first)
