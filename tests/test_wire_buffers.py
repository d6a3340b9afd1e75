"""Large frames received into memory already in place (``flame._wire.Connection``).

A connection receives a large body into the buffer of its last large frame when nothing
holds a view of that buffer any more, and into fresh memory otherwise. What a user relies
on: a value unpickled from an earlier frame (a ``bytes`` copy, a NumPy array built on its
frame's memory, a ``memoryview``) is never overwritten by a later frame, whatever it is
and however long it is kept; and payloads cross intact both ways through real runners.
"""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import flame
from flame import _serialize, _wire
from helpers.parent.wire_tools import LoopThread
from helpers.runner import wire_work as work

MB = 1 << 20


@pytest.fixture(scope="module")
def lt() -> Iterator[LoopThread]:
    with LoopThread() as loop_thread:
        yield loop_thread


class Receiver:
    """A connection read by this thread (``read_frames``), fed by a raw socket."""

    def __init__(self, lt: LoopThread) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.lt = lt
        self.conn: _wire.Connection = lt.call(
            lambda: _wire.Connection(
                self.ours,
                lt.loop,
                on_frame=lambda kind, body: None,
                on_close=lambda reason: None,
                max_frame=1 << 30,
            )
        )
        lt.call(self.conn.read_in_threads)

    def frame(self, kind: int, *parts: bytes | memoryview) -> memoryview:
        """Send one frame from the other end and read it here; its body."""
        data = b"".join(bytes(p) for p in parts)
        sender = threading.Thread(
            target=self.theirs.sendall, args=(_wire.HEADER.pack(len(data), kind) + data,)
        )
        sender.start()
        frames = self.conn.read_frames()
        sender.join()
        assert frames is not None and len(frames) == 1
        return frames[0][1]

    def section(self, value: Any) -> Any:
        """Send ``value`` pickled as flame sends it, and unpickle it here."""
        data, buffers = _serialize.dumps_value(value, "value")
        body = self.frame(_wire.RESULT, *_wire.section_parts(data, buffers))
        data_view, views = _wire.split_section(body)
        return _serialize.loads(data_view, views)

    def close(self) -> None:
        self.theirs.close()
        assert self.conn.read_frames() is None
        self.conn.reader_done()
        self.lt.call(self.conn.close, "test done")


@pytest.fixture
def receiver(lt: LoopThread) -> Iterator[Receiver]:
    r = Receiver(lt)
    yield r
    r.close()


@pytest.mark.timeout(30)
def test_a_released_buffer_is_reused_and_a_held_one_never_is(receiver: Receiver) -> None:
    # (ids, not the buffers: holding one here would keep it from being reused)
    first = receiver.frame(_wire.RESULT, b"a" * (2 * MB))
    spare = id(first.obj)
    del first
    second = receiver.frame(_wire.RESULT, b"b" * (2 * MB))
    assert id(second.obj) == spare  # nobody held the first body: its memory served again
    third = receiver.frame(_wire.RESULT, b"c" * (2 * MB))
    assert id(third.obj) != spare  # the second body is still held: fresh memory
    assert bytes(second) == b"b" * (2 * MB) and bytes(third) == b"c" * (2 * MB)
    # a spare is not kept for frames much smaller than itself
    del second, third
    big = receiver.frame(_wire.RESULT, b"d" * (8 * MB))
    spare = id(big.obj)
    del big
    small = receiver.frame(_wire.RESULT, b"e" * (MB + 1))
    assert id(small.obj) != spare


@pytest.mark.timeout(30)
def test_values_unpickled_from_earlier_frames_stay_as_they_were(receiver: Receiver) -> None:
    size = 3 * MB
    kept_bytes = receiver.section(b"\x01" * size)
    array = receiver.section(np.full(size // 8, 2.5))
    view = receiver.section(memoryview(b"\x03" * size))
    for fill in range(4, 9):  # later frames of every kind, of the same size
        receiver.section(bytes([fill]) * size)
        receiver.section(np.full(size // 8, float(fill)))
        gc.collect()
    assert kept_bytes == b"\x01" * size
    assert isinstance(array, np.ndarray) and np.all(array == 2.5)
    assert bytes(view) == b"\x03" * size
    array[0] = 7.0  # the array's memory is its own to write
    assert array[0] == 7.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["bytes", "ndarray"])
def test_large_payloads_cross_runners_intact_both_ways(kind: str) -> None:
    size = 12 * MB

    def make(fill: int) -> Any:
        return bytes([fill]) * size if kind == "bytes" else np.full(size // 8, float(fill))

    with flame.Pool(f"wire-buffers-{kind}", max=1, backend=flame.ProcessBackend()) as pool:
        results = [pool.call(work.identity, make(fill)) for fill in range(1, 5)]
    for fill, result in enumerate(results, start=1):
        expected = make(fill)
        if kind == "bytes":
            assert result == expected
        else:
            assert np.array_equal(result, expected)
