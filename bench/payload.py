"""Payloads of 1, 10 and 100 MB in both directions, as ``bytes`` and as a NumPy array.

Parent to runner: ``flame.call(pool, payload_size, payload)`` with the payload built in the
parent beforehand. Runner to parent: ``flame.call(pool, make_payload, kind, size)``, so the
runner builds it; the same ``make_payload`` is also timed in the parent and reported on its
own row, so the reader can see what creating the payload costs (nothing is subtracted).
Each transfer is related to ``ProcessPoolExecutor(1)`` doing the same, and reported as
time and as MB/s (payload size over median time).

Round trips: ``flame.call(pool, echo, payload)`` (the payload there and back) against the
floor for moving those bytes, a bare TCP loopback round trip of the same bytes between
this process and an echo process (``python -m bench.payload --tcp-echo``), both ends
receiving into buffers they reuse, with the same sampling in turns.
"""

from __future__ import annotations

import concurrent.futures
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import flame

from .harness import (
    INSTALL_HINT,
    MB,
    Counts,
    Figure,
    each,
    figure,
    have,
    interleaved,
    relate,
    sample,
    skipped,
)
from .harness import with_rate as rated
from .work import make_payload, noop, payload_size

GROUP = "payloads (MB/s = size / median time)"
KINDS = ("bytes", "ndarray")
_LENGTH = struct.Struct("!Q")


def echo(payload: Any) -> Any:
    return payload


class TcpEcho:
    """A bare TCP loopback round trip: send the bytes, receive them back into a buffer
    reused from one round trip to the next (the echo process does the same)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.payload", "--tcp-echo"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def round_trip(self, payload: bytes) -> None:
        n = len(payload)
        if len(self.buf) < n:
            self.buf = bytearray(n)
        self.sock.sendall(_LENGTH.pack(n))
        self.sock.sendall(payload)
        _recv_exactly(self.sock, memoryview(self.buf)[:n])

    def close(self) -> None:
        self.sock.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc.wait(10)


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the echo process went away")
        got += n


def _tcp_echo_server() -> None:
    """The echo process: each message (a length, then that many bytes) straight back."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytearray(_LENGTH.size)
    buf = bytearray()
    with conn:
        while True:
            try:
                _recv_exactly(conn, memoryview(head))
            except ConnectionError:
                return
            (n,) = _LENGTH.unpack(head)
            if len(buf) < n:
                buf = bytearray(n)
            view = memoryview(buf)[:n]
            _recv_exactly(conn, view)
            conn.sendall(view)


def _round_trips(
    pool: flame.Pool, tcp: TcpEcho, kind: str, size_mb: int, runs: int
) -> list[Figure]:
    size = size_mb * MB
    label = f"{size_mb} MB {kind} round trip"
    payload = make_payload(kind, size)
    raw = payload if kind == "bytes" else payload.tobytes()
    tcp.round_trip(raw)
    flame.call(pool, echo, payload)
    samplers = [each(lambda: tcp.round_trip(raw)), each(lambda: flame.call(pool, echo, payload))]
    if kind == "bytes":  # what each side must do at least: copy the bytes into a new object
        in_place = memoryview(bytearray(raw))
        samplers.append(each(lambda: bytes(in_place)))
    times = interleaved(samplers, runs, rounds=runs)
    # MB/s counts the bytes moved: there and back
    base = rated(figure(GROUP, f"bare TCP loopback, reused buffers: {label}", times[0]), 2 * size)
    fig = rated(figure(GROUP, f"flame.call(pool, echo, payload): {label}", times[1]), 2 * size)
    figs = [base, relate(fig, base)]
    if kind == "bytes":
        copy = f"bytes(memoryview) of {size_mb} MB in memory: the copy into a new bytes"
        figs.append(rated(figure(GROUP, copy, times[2]), size))
    return figs


def _pair(
    label: str, size: int, runs: int, ppe: Callable[[], object], ours: Callable[[], object]
) -> list[Figure]:
    ppe_times, our_times = interleaved([each(ppe), each(ours)], runs, rounds=runs)
    base = rated(figure(GROUP, f"ProcessPoolExecutor(1): {label}", ppe_times), size)
    fig = rated(figure(GROUP, f"flame.call: {label}", our_times), size)
    return [base, relate(fig, base)]


def _to_runner(
    ex: concurrent.futures.Executor, pool: flame.Pool, label: str, payload: Any, runs: int
) -> list[Figure]:
    size = payload_size(payload)
    # warm both sides for this size (allocator, first large frame)
    ex.submit(payload_size, payload).result()
    flame.call(pool, payload_size, payload)
    return _pair(
        label,
        size,
        runs,
        lambda: ex.submit(payload_size, payload).result(),
        lambda: flame.call(pool, payload_size, payload),
    )


def _one_size(
    ex: concurrent.futures.Executor, pool: flame.Pool, kind: str, size_mb: int, runs: int
) -> list[Figure]:
    size = size_mb * MB
    to_runner = f"{size_mb} MB {kind} parent -> runner"
    local = f"make_payload({kind}, {size_mb} MB) in the parent"
    from_runner = f"{size_mb} MB {kind} runner -> parent"
    if kind == "ndarray" and not have("numpy"):
        return [skipped(GROUP, name, INSTALL_HINT) for name in (to_runner, local, from_runner)]
    figs = _to_runner(ex, pool, to_runner, make_payload(kind, size), runs)
    figs.append(rated(figure(GROUP, local, sample(lambda: make_payload(kind, size), runs)), size))
    ex.submit(make_payload, kind, size).result()
    flame.call(pool, make_payload, kind, size)
    figs += _pair(
        from_runner,
        size,
        runs,
        lambda: ex.submit(make_payload, kind, size).result(),
        lambda: flame.call(pool, make_payload, kind, size),
    )
    return figs


def bench_payloads(counts: Counts) -> list[Figure]:
    figs: list[Figure] = []
    with (
        concurrent.futures.ProcessPoolExecutor(1) as ex,
        flame.Pool("bench-payload", min=1, max=1, backend=flame.ProcessBackend()) as pool,
    ):
        ex.submit(noop).result()
        flame.call(pool, noop)
        for kind in KINDS:
            for size_mb in counts.payload_sizes_mb:
                figs += _one_size(ex, pool, kind, size_mb, counts.payload_runs(size_mb))
        tcp = TcpEcho()
        try:
            for kind in KINDS:
                if kind == "ndarray" and not have("numpy"):
                    continue
                size_mb = max(counts.payload_sizes_mb)
                figs += _round_trips(pool, tcp, kind, size_mb, counts.payload_runs(size_mb))
        finally:
            tcp.close()
    return figs


if __name__ == "__main__" and sys.argv[1:] == ["--tcp-echo"]:
    _tcp_echo_server()
