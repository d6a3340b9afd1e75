"""Parent-side tools for the wire, security, serialization and life-cycle tests.

* :class:`LoopThread`: an asyncio loop in a thread, on which ``flame._wire.Connection``
  objects live (they must be created and closed on their loop's thread); it records every
  exception that escapes a callback, so a test can assert that nothing "raised out".
* :class:`Peer`: a ``Connection`` plus a queue of the frames it received and an event set when
  it closes.
* raw protocol helpers (:func:`frame`, :func:`recv_frame`, :func:`wait_closed`,
  :class:`RawClient`) to speak, or abuse, the handshake from a plain blocking socket;
* :class:`RecordingProcessBackend`: a ``ProcessBackend`` that remembers what it launched (the
  decoded ``FLAME_PARENT`` and the process handles) and can tamper with ``FLAME_PARENT``
  (a wrong secret, another address), for what the public API cannot show (exit codes);
* :class:`TcpProxy`: sits between a runner and its parent; it can drop every byte silently
  (a network that loses packets) or cut the connection;
* :func:`rss_bytes` (this process's resident memory) and :func:`run_runner` (start
  ``python -m flame runner`` by hand).

Nothing here runs on a runner (that is ``helpers.runner.wire_work``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import flame
from flame import _wire
from flame._parent import LaunchInfo
from flame._wire import RunnerConfig
from flame.backends.process import ProcessHandle

#: what the wire tests tell a runner in WELCOME (a listener expecting one)
CONFIG = RunnerConfig(
    heartbeat_interval=1.0,
    heartbeat_timeout=8.0,
    idle_after=None,
    shutdown_timeout=1.0,
    single_use=False,
    cancel_grace=3.0,
    max_frame=1 << 30,
)

T = TypeVar("T")


# -- an event loop in a thread ---------------------------------------------------------------------
class LoopThread:
    """A running asyncio loop in a daemon thread; use as a context manager."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))
        self._thread = threading.Thread(target=self._main, name="test-loop", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """Run ``fn(*args)`` on the loop thread and return its result."""

        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)


class Peer:
    """One end of a framed connection, living on a :class:`LoopThread`."""

    def __init__(
        self,
        lt: LoopThread,
        sock: socket.socket,
        *,
        max_frame: int = _wire.DEFAULT_MAX_FRAME,
        scratch: int | None = None,
        handler: Callable[[int, memoryview], None] | None = None,
    ) -> None:
        self.lt = lt
        self.frames: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self.closed = threading.Event()
        self.reason = ""
        self._handler = handler
        kwargs: dict[str, Any] = {"max_frame": max_frame}
        if scratch is not None:
            kwargs["scratch"] = scratch
        self.conn: _wire.Connection = lt.call(
            lambda: _wire.Connection(
                sock, lt.loop, on_frame=self._on_frame, on_close=self._on_close, **kwargs
            )
        )

    def _on_frame(self, kind: int, body: memoryview) -> None:
        if self._handler is not None:
            self._handler(kind, body)  # may raise ProtocolError: the connection closes
        self.frames.put((kind, bytes(body)))

    def _on_close(self, reason: str) -> None:
        self.reason = reason
        self.closed.set()

    def send(self, kind: int, *parts: bytes | memoryview) -> None:
        self.conn.send(kind, list(parts))

    def get(self, timeout: float = 10.0) -> tuple[int, bytes]:
        return self.frames.get(timeout=timeout)

    def drain(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            try:
                out.append(self.frames.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        if not self.conn.closed:
            with contextlib.suppress(RuntimeError):
                self.lt.call(self.conn.close, "test done")


@contextlib.contextmanager
def peer_pair(lt: LoopThread, **kwargs: Any) -> Iterator[tuple[Peer, Peer]]:
    """Two connected :class:`Peer` objects over a real socketpair."""
    a, b = socket.socketpair()
    pa, pb = Peer(lt, a, **kwargs), Peer(lt, b, **kwargs)
    try:
        yield pa, pb
    finally:
        pa.close()
        pb.close()


# -- the raw protocol, from a blocking socket ------------------------------------------------------
def frame(kind: int, body: bytes = b"") -> bytes:
    return _wire.HEADER.pack(len(body), kind) + body


def jframe(kind: int, doc: Any) -> bytes:
    return frame(kind, json.dumps(doc).encode())


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no data within the deadline ({len(buf)}/{n} bytes)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """The next frame, or ``None`` if the peer closed the connection."""
    deadline = time.monotonic() + timeout
    head = _recv_exact(sock, _wire.HEADER.size, deadline)
    if head is None:
        return None
    length, kind = _wire.HEADER.unpack(head)
    body = _recv_exact(sock, length, deadline)
    if body is None:
        return None
    return kind, body


def wait_closed(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Read until the peer closes; return (seconds it took, what it sent meanwhile).

    Raises ``TimeoutError`` if the connection is still open after ``timeout``.
    """
    start = time.monotonic()
    got = bytearray()
    while True:
        left = start + timeout - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the peer kept the connection open for {timeout:g}s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        except TimeoutError:
            continue
        if not chunk:
            return time.monotonic() - start, bytes(got)
        got += chunk


def is_closed_now(sock: socket.socket) -> bool:
    """True if the peer has closed (EOF or reset is readable), without blocking."""
    r, _, _ = select.select([sock], [], [], 0)
    if not r:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


class RawClient:
    """A runner's half of the handshake, step by step, from a blocking socket."""

    def __init__(self, port: int, runner_id: str, secret: bytes) -> None:
        self.sock = connect(port)
        self.runner_id = runner_id
        self.secret = secret
        self.nonce = _wire.new_nonce()
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.sock.sendall(data)

    def hello(self) -> dict[str, Any]:
        """Send HELLO and return the parent's CHALLENGE (checking its proof)."""
        self.send(jframe(_wire.HELLO, {"id": self.runner_id, "nonce": self.nonce.hex()}))
        got = recv_frame(self.sock)
        assert got is not None, "the parent closed the connection after HELLO"
        kind, body = got
        assert kind == _wire.CHALLENGE, kind
        challenge: dict[str, Any] = json.loads(body)
        return challenge

    def proof(
        self,
        challenge: dict[str, Any],
        secret: bytes | None = None,
        versions: dict[str, str] | None = None,
    ) -> None:
        nonce_p = bytes.fromhex(challenge["nonce"])
        mine = _wire.proof(secret or self.secret, b"R", nonce_p, self.nonce)
        body = {"proof": mine, "versions": versions or _wire.local_versions()}
        self.send(jframe(_wire.PROOF, body))

    def close(self) -> None:
        self.sock.close()


# -- a ProcessBackend that shows what it did -------------------------------------------------------
class RecordingProcessBackend(flame.ProcessBackend):
    """Remembers each runner's decoded ``FLAME_PARENT`` and process; may rewrite it first."""

    def __init__(
        self,
        tamper: Callable[[LaunchInfo], LaunchInfo] | None = None,
        patience: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tamper = tamper
        #: when the pool stops a runner, first wait this long for it to exit by itself (a
        #: parent cut off from its runner could not kill it: the runner must leave alone)
        self.patience = patience
        self.infos: list[LaunchInfo] = []
        self.handles: list[ProcessHandle] = []

    async def boot(self, launch: flame.RunnerLaunch) -> flame.RunnerHandle:
        info = LaunchInfo.decode(launch.env["FLAME_PARENT"])
        self.infos.append(info)
        if self.tamper is not None:
            env = dict(launch.env)
            env["FLAME_PARENT"] = self.tamper(info).encode()
            launch = dataclasses.replace(launch, env=env)
        handle = await super().boot(launch)
        assert isinstance(handle, ProcessHandle)
        self.handles.append(handle)
        if self.patience > 0:
            kill, patience = handle.stop, self.patience

            async def patient_stop() -> None:
                if handle.proc.poll() is None:
                    await asyncio.wait({asyncio.ensure_future(handle.wait())}, timeout=patience)
                await kill()

            handle.stop = patient_stop  # type: ignore[method-assign]
        return handle

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        return [h.proc for h in self.handles]


def with_secret(secret: bytes) -> Callable[[LaunchInfo], LaunchInfo]:
    return lambda info: dataclasses.replace(info, secret=secret)


def via(proxy: TcpProxy) -> Callable[[LaunchInfo], LaunchInfo]:
    """Make the runner dial ``proxy`` instead of its parent (the proxy forwards there)."""

    def tamper(info: LaunchInfo) -> LaunchInfo:
        proxy.target = info.addresses[0]
        return dataclasses.replace(info, addresses=(("127.0.0.1", proxy.port),))

    return tamper


# -- a TCP proxy that can lose packets -------------------------------------------------------------
class TcpProxy:
    """Forwards connections to ``target``; :meth:`blackhole` silently drops all traffic from
    then on (both directions, connections left open), :meth:`cut` closes them.

    With ``coalesce`` (seconds), what the parent sends is held that long after the first byte
    of each burst and passed on in one piece, as a slow network (or Nagle) would: a frame
    that closely follows another then arrives in the same read."""

    def __init__(self, coalesce: float = 0.0) -> None:
        self.coalesce = coalesce
        self.target: tuple[str, int] | None = None
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._srv.getsockname()[1]
        self._dropping = threading.Event()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.connected = threading.Event()
        #: every byte passed on, both directions (to check what an eavesdropper would see)
        self.seen = bytearray()
        self._seen_lock = threading.Lock()
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        self._srv.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            assert self.target is not None
            upstream = socket.create_connection(self.target)
            self._socks += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client, self.coalesce)
            self.connected.set()

    def _pump(self, src: socket.socket, dst: socket.socket, coalesce: float = 0.0) -> None:
        src.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
                if coalesce and data:
                    until = time.monotonic() + coalesce
                    while (left := until - time.monotonic()) > 0:
                        src.settimeout(left)
                        try:
                            more = src.recv(65536)
                        except TimeoutError:
                            break
                        if not more:
                            break
                        data += more
                    src.settimeout(0.1)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if self._dropping.is_set():
                continue  # lost in the network
            with self._seen_lock:
                self.seen += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def blackhole(self) -> None:
        self._dropping.set()

    def cut(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        for t in self._threads:
            t.join(2)
        for s in self._socks:
            s.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- processes and memory --------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident memory of this process (VmRSS from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def runner_env(flame_parent: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FLAME_PARENT"}
    if flame_parent is not None:
        env["FLAME_PARENT"] = flame_parent
    env.update(extra)
    return env


def start_runner(flame_parent: str | None, **extra: str) -> subprocess.Popen[str]:
    """Start ``python -m flame runner`` by hand (stderr captured as text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flame", "runner"],
        env=runner_env(flame_parent, **extra),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, float]:
    """Wait for a hand-started runner: (exit code, its stderr, seconds waited).
    Kills it (and fails) if it is still running after ``timeout``."""
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the runner was still running after {timeout:g}s") from None
    return proc.returncode, err, time.monotonic() - start


def launch_info(**overrides: Any) -> LaunchInfo:
    fields: dict[str, Any] = {
        "runner_id": "by-hand-1",
        "secret": os.urandom(32),
        "addresses": (("127.0.0.1", 9),),
        "pool": "by-hand",
        "backend": "process",
        "failsafe": 1.0,
    }
    fields.update(overrides)
    return LaunchInfo(**fields)
