"""Runners behind a real network link that a test can cut: Linux network namespaces.

Used by ``tests/test_partition.py`` and by the partition chaos of ``bench/soak.py``. Needs
root, ``ip`` (iproute2) and ``nft`` (nftables); :func:`unavailable` says why not, if not.

Topology of one :class:`Netns`::

    this process (root namespace)                   namespace <name>
    veth <parent_if>  10.213.A.B+1/30  <------->  veth <runner_if>  10.213.A.B+2/30, lo up

or, with a :class:`Bridge`, the parent side of every namespace's veth pair is a port of one
bridge that holds the parent's address (one listener for runners in many namespaces).

A runner is started inside a namespace by a generated wrapper script used as
``ProcessBackend(python=...)``: ``exec ip netns exec "$FLAME_NETNS" <python> "$@"``.
``ip netns exec`` execs (no fork), so the pid the backend sees is the runner's own.

Two ways to cut (:meth:`Netns.cut`), both silent (no FIN, no RST reaches either side):

* ``"link"``: ``ip link set <parent_if> down``: the wire is pulled on the parent's side;
* ``"drop"``: an nftables table in the namespace whose input and output chains drop
  everything (a firewall that silently discards packets).

:meth:`Netns.heal` undoes either. Nothing here uses ``sleep`` to wait for anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flame
from flame.backends.process import ProcessHandle

CUTS = ("link", "drop")
NFT_TABLE = "flamecut"
NETNS_ENV = "FLAME_NETNS"
_counter = itertools.count(1)
_lock = threading.Lock()


def _next() -> int:
    with _lock:
        return next(_counter)


def tool(name: str) -> str | None:
    """The absolute path of ``name`` (also looking in the sbin directories)."""
    path = os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
    ).strip(os.pathsep)
    return shutil.which(name, path=path)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one ``ip`` / ``nft`` command (bounded); raise with its stderr if ``check``."""
    exe = tool(argv[0]) or argv[0]
    proc = subprocess.run(
        [exe, *argv[1:]],
        check=False,
        capture_output=True,
        text=True,
        timeout=15,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _names(tag: str) -> tuple[str, str, str]:
    """A namespace name and the two veth names, unique to this process (pid + counter).
    Interface names are at most 15 characters."""
    n = _next()
    base = f"{os.getpid() % 100000}{tag}{n}"
    return f"flame-{base}", f"flp{base}"[:15], f"flr{base}"[:15]


def _subnet(n: int) -> tuple[str, str]:
    """Parent and runner addresses of the ``n``-th /30 of this process, in 10.213.0.0/16."""
    third = (os.getpid() * 7 + n // 64) % 256
    fourth = (n % 64) * 4
    return f"10.213.{third}.{fourth + 1}", f"10.213.{third}.{fourth + 2}"


# -- /proc/net/tcp ---------------------------------------------------------------------------
TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


@dataclass(frozen=True)
class TcpSocket:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    inode: int


def _addr(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    return socket.inet_ntoa(int(host, 16).to_bytes(4, "little")), int(port, 16)


def parse_tcp(text: str) -> list[TcpSocket]:
    """The IPv4 sockets listed in a ``/proc/net/tcp`` text."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        out.append(TcpSocket(_addr(f[1]), _addr(f[2]), TCP_STATES.get(f[3], f[3]), int(f[9])))
    return out


def my_sockets() -> set[int]:
    """Inodes of the sockets this process holds open."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def root_tcp() -> list[TcpSocket]:
    """IPv4 TCP sockets of this process's (the root) network namespace."""
    with open("/proc/self/net/tcp") as fh:
        return parse_tcp(fh.read())


# -- namespaces ------------------------------------------------------------------------------
class Bridge:
    """A bridge in the root namespace holding the parent's address, 10.214.X.1/24; the
    namespaces attached to it get .2 to .254."""

    def __init__(self) -> None:
        n = _next()
        self.name = f"flb{os.getpid() % 100000}n{n}"[:15]
        third = (os.getpid() * 7 + 128 + n) % 256
        self.prefix = f"10.214.{third}"
        self.address = f"{self.prefix}.1"
        self._hosts = iter(range(2, 255))
        self._free: list[int] = []
        self.created = False

    def create(self) -> Bridge:
        run("ip", "link", "add", self.name, "type", "bridge")
        self.created = True
        run("ip", "addr", "add", f"{self.address}/24", "dev", self.name)
        run("ip", "link", "set", self.name, "up")
        return self

    def take(self) -> str:
        with _lock:
            host = self._free.pop() if self._free else next(self._hosts)
        return f"{self.prefix}.{host}"

    def give_back(self, address: str) -> None:
        with _lock:
            self._free.append(int(address.rsplit(".", 1)[1]))

    def close(self) -> None:
        if self.created:
            run("ip", "link", "del", self.name, check=False)
            self.created = False


class Netns:
    """One network namespace joined to the root namespace by a veth pair."""

    def __init__(self, bridge: Bridge | None = None, tag: str = "n") -> None:
        self.name, self.parent_if, self.runner_if = _names(tag)
        self.bridge = bridge
        if bridge is None:
            self.parent_addr, self.runner_addr = _subnet(_next())
            self.prefixlen = 30
        else:
            self.parent_addr, self.runner_addr = bridge.address, bridge.take()
            self.prefixlen = 24
        self.cut_mode: str | None = None
        self._made: list[str] = []

    def __repr__(self) -> str:
        return f"Netns({self.name!r}, {self.runner_addr} -> {self.parent_addr})"

    # -- life cycle
    def create(self) -> Netns:
        try:
            run("ip", "netns", "add", self.name)
            self._made.append("netns")
            run("ip", "link", "add", self.parent_if, "type", "veth", "peer", "name", self.runner_if)
            self._made.append("veth")
            run("ip", "link", "set", self.runner_if, "netns", self.name)
            if self.bridge is None:
                run("ip", "addr", "add", f"{self.parent_addr}/30", "dev", self.parent_if)
            else:
                run("ip", "link", "set", self.parent_if, "master", self.bridge.name)
            run("ip", "link", "set", self.parent_if, "up")
            ns = ("ip", "-n", self.name)
            run(*ns, "addr", "add", f"{self.runner_addr}/{self.prefixlen}", "dev", self.runner_if)
            run(*ns, "link", "set", self.runner_if, "up")
            run(*ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill whatever still runs in the namespace, delete the veth pair and the namespace.
        Safe to call twice, and after a failed :meth:`create`."""
        if "netns" in self._made:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if "veth" in self._made:
            run("ip", "link", "del", self.parent_if, check=False)
        if "netns" in self._made:
            run("ip", "netns", "del", self.name, check=False)
        if self.bridge is not None and self._made:
            self.bridge.give_back(self.runner_addr)
        self._made.clear()

    def __enter__(self) -> Netns:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cutting
    def cut(self, mode: str) -> None:
        """Partition the namespace from the parent, silently (see the module docstring)."""
        if mode == "link":
            run("ip", "link", "set", self.parent_if, "down")
        elif mode == "drop":
            nft = ("ip", "netns", "exec", self.name, tool("nft") or "nft")
            run(*nft, "add", "table", "inet", NFT_TABLE)
            for chain, hook in (("in", "input"), ("out", "output")):
                run(
                    *nft,
                    f"add chain inet {NFT_TABLE} {chain} "
                    f"{{ type filter hook {hook} priority 0; policy drop; }}",
                )
        else:
            raise ValueError(f"unknown cut {mode!r}; one of {CUTS}")
        self.cut_mode = mode

    def heal(self, check: bool = True) -> None:
        """Undo :meth:`cut` (whichever it was); a no-op if not cut. ``check=False``: ignore
        failures (the namespace may have been deleted meanwhile)."""
        if self.cut_mode == "link":
            run("ip", "link", "set", self.parent_if, "up", check=check)
        elif self.cut_mode == "drop":
            nft = ("ip", "netns", "exec", self.name, tool("nft") or "nft")
            run(*nft, "delete", "table", "inet", NFT_TABLE, check=check)
        self.cut_mode = None

    # -- looking inside
    def pids(self) -> set[int]:
        """Pids of the processes in the namespace (``ip netns pids``)."""
        proc = run("ip", "netns", "pids", self.name, check=False)
        return {int(p) for p in proc.stdout.split()} if proc.returncode == 0 else set()

    def inode(self) -> int:
        return os.stat(f"/run/netns/{self.name}").st_ino

    def holds(self, pid: int) -> bool:
        """True if process ``pid`` lives in this namespace (its ``/proc/<pid>/ns/net``)."""
        try:
            link = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            return False
        return link == f"net:[{self.inode()}]"

    def tcp(self) -> list[TcpSocket]:
        """IPv4 TCP sockets inside the namespace, orphaned ones included."""
        return parse_tcp(run("ip", "netns", "exec", self.name, "cat", "/proc/net/tcp").stdout)


def write_wrapper(directory: str, python: str | None = None) -> str:
    """An executable script that runs ``python`` inside the namespace named by
    ``$FLAME_NETNS``; use it as ``ProcessBackend(python=...)``."""
    path = os.path.join(directory, "python-in-netns")
    ip = tool("ip") or "ip"
    with open(path, "w") as fh:
        fh.write(
            "#!/bin/sh\n"
            "# start flame's runner inside the network namespace named by $FLAME_NETNS\n"
            f'exec {shlex.quote(ip)} netns exec "${NETNS_ENV}" '
            f'{shlex.quote(python or sys.executable)} "$@"\n'
        )
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def unavailable() -> str | None:
    """Why partition tests cannot run here, or ``None`` if they can (tries it once)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for name in ("ip", "nft"):
        if tool(name) is None:
            return f"`{name}` is not installed (apt-get install iproute2 nftables)"
    probe = Netns(tag="p")
    try:
        probe.create()
        probe.cut("drop")
        probe.heal()
        probe.cut("link")
        probe.heal()
    except Exception as exc:
        return f"cannot create a network namespace with a veth pair and nftables: {exc}"
    finally:
        probe.close()
    return None


# -- backends ----------------------------------------------------------------------------------
class WatchedHandle(flame.RunnerHandle):
    """A ``ProcessHandle`` that notes when the pool asked to stop it, and with ``patience``
    first waits that long for the runner to exit by itself before killing it: the parent
    of a runner across a partition may well be unable to reach its host to kill it, so the
    runner must leave on its own. ``killed`` says whether the pool had to kill it.

    ``blind``: do not tell the pool when the runner exits (``wait()`` never resolves), like
    a backend that cannot reach its platform's API across the partition; only heartbeats
    can tell the pool then."""

    def __init__(
        self,
        inner: ProcessHandle,
        patience: float,
        netns: Netns | None = None,
        *,
        blind: bool = False,
    ) -> None:
        self.inner = inner
        self.patience = patience
        self.blind = blind
        self.netns = netns  # closed with the runner (a namespace of its own)
        self.stop_asked_at: float | None = None
        self.killed = False
        self.stopped = False  # stop() has finished

    @property
    def id(self) -> str:
        return self.inner.id

    @property
    def pid(self) -> int:
        return self.inner.pid

    @property
    def returncode(self) -> int | None:
        return self.inner.proc.returncode

    async def wait(self) -> str:
        if self.blind:
            return await super().wait()  # never resolves
        return await self.inner.wait()

    async def stop(self) -> None:
        if self.stop_asked_at is None:
            self.stop_asked_at = time.monotonic()
        if self.patience > 0 and self.inner.proc.returncode is None:
            await asyncio.wait({asyncio.ensure_future(self.inner.wait())}, timeout=self.patience)
        if self.inner.proc.returncode is None:
            self.killed = True
        await self.inner.stop()
        if self.netns is not None:
            await asyncio.to_thread(self.netns.close)
        self.stopped = True

    def diagnostics(self) -> str:
        return self.inner.diagnostics()


class NetnsBackend(flame.ProcessBackend):
    """``ProcessBackend`` whose runners all start inside ``netns`` and dial the parent
    across its veth pair; the parent's listener binds the parent-side address. Its handles
    are :class:`WatchedHandle` with the given ``patience`` and ``blind``."""

    def __init__(
        self,
        netns: Netns,
        wrapper: str,
        *,
        patience: float = 0.0,
        blind: bool = False,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python=wrapper, env={**(env or {}), NETNS_ENV: netns.name}, **kwargs)
        self.netns = netns
        self.patience = patience
        self.blind = blind
        self.handles: list[WatchedHandle] = []

    def listen_host(self) -> str:
        return self.netns.parent_addr

    def advertise_hosts(self) -> list[str]:
        return [self.netns.parent_addr]

    async def boot(self, launch: flame.RunnerLaunch) -> flame.RunnerHandle:
        inner = await super().boot(launch)
        assert isinstance(inner, ProcessHandle)
        handle = WatchedHandle(inner, self.patience, blind=self.blind)
        self.handles.append(handle)
        return handle

    def handle_of(self, pid: int) -> WatchedHandle:
        (handle,) = [h for h in self.handles if h.pid == pid]
        return handle


class NetnsPerRunnerBackend(flame.ProcessBackend):
    """``ProcessBackend`` that gives each runner a namespace of its own, attached to
    ``bridge`` (whose address the parent listens on); the namespace is deleted when the
    pool stops the runner. ``live()`` maps each running runner's pid to its handle (whose
    ``netns`` is its namespace); a handle's ``patience`` may be raised while it is cut off."""

    def __init__(self, bridge: Bridge, wrapper: str, **kwargs: Any) -> None:
        super().__init__(python=wrapper, **kwargs)
        self.bridge = bridge
        self._live: dict[int, WatchedHandle] = {}
        self._made: list[Netns] = []
        self._making: set[asyncio.Future[Any]] = set()
        self._guard = threading.Lock()

    def listen_host(self) -> str:
        return self.bridge.address

    def advertise_hosts(self) -> list[str]:
        return [self.bridge.address]

    async def boot(self, launch: flame.RunnerLaunch) -> flame.RunnerHandle:
        netns = Netns(self.bridge, tag="s")
        with self._guard:
            self._made.append(netns)
        # a boot may be cancelled (pool stop, boot_timeout) while the namespace is being
        # made in a thread: aclose() waits for those threads, then deletes every namespace
        making = asyncio.ensure_future(asyncio.to_thread(netns.create))
        self._making.add(making)
        making.add_done_callback(self._making.discard)
        try:
            await asyncio.shield(making)
        except Exception as exc:
            raise flame.BootError(f"could not create a network namespace: {exc}") from exc
        launch = dataclasses.replace(launch, env={**launch.env, NETNS_ENV: netns.name})
        try:
            inner = await super().boot(launch)
        except BaseException:
            # (cancelled while Popen ran in its thread, the process may still start: deleting
            # the namespace kills whatever runs in it, now or in aclose)
            await asyncio.to_thread(netns.close)
            raise
        assert isinstance(inner, ProcessHandle)
        handle = _ForgettingHandle(inner, 0.0, netns, self)
        with self._guard:
            self._live[inner.pid] = handle
        return handle

    async def aclose(self) -> None:
        """Delete every namespace this backend made (the pool has stopped its runners)."""
        if self._making:
            await asyncio.wait(set(self._making))
        with self._guard:
            made, self._made = self._made, []
        for netns in made:
            await asyncio.to_thread(netns.close)
        await super().aclose()

    def forget(self, pid: int) -> None:
        with self._guard:
            self._live.pop(pid, None)

    def live(self) -> dict[int, WatchedHandle]:
        with self._guard:
            return dict(self._live)


class _ForgettingHandle(WatchedHandle):
    def __init__(
        self, inner: ProcessHandle, patience: float, netns: Netns, owner: NetnsPerRunnerBackend
    ) -> None:
        super().__init__(inner, patience, netns)
        self.owner = owner

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            self.owner.forget(self.pid)


def leftovers(prefix: str | None = None) -> list[str]:
    """Namespaces and links made by this process that still exist."""
    mark = str(os.getpid() % 100000)
    names = run("ip", "netns", "list", check=False).stdout.split()
    links = run("ip", "-o", "link", "show", check=False).stdout.splitlines()
    found = [n for n in names if n.startswith(f"flame-{mark}")]
    for line in links:
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name[:3] in ("flp", "flr", "flb") and name[3:].startswith(mark):
            found.append(name)
    return [f for f in found if prefix is None or f.startswith(prefix)]
