"""A runner's own output (fd 1 and 2), sent to its parent through its connection.

With ``Pool(forward_output=True)`` the runner points its file descriptors 1 and 2 at pipes
as soon as it starts, so everything written there is caught: ``print``, logging handlers,
warnings, tracebacks, C extensions and subprocesses alike. A reader thread per stream sends
it as OUTPUT frames while the runner is connected; the parent writes each line to its own
stdout or stderr, prefixed with the runner's id (``flame._output``). What is written
before the connection is up goes to the original descriptors at once (so a runner that
hangs or dies at boot still shows it where the backend keeps runner output) and is also
held, to be sent once the connection is up; what is written after it ended goes to the
originals only, and at the end the descriptors are pointed back where they were.

Bounded: while connected, at most :data:`RATE` bytes a second are sent (bursts of
:data:`BURST`), and nothing is queued behind a connection that does not keep up; what is
dropped is counted and said in a notice. Before the connection, :data:`HELD` bytes per
stream are kept. A runner that floods its output slows neither its calls nor its parent.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from .. import _wire

RATE = 8 << 20  # bytes a second, per runner
BURST = 1 << 20
HELD = 1 << 20  # per stream, before the runner is connected
_CHUNK = 16 * 1024  # the largest OUTPUT frame's data
_BACKLOG = 64  # frames waiting in the connection's outbox beyond which output is dropped


class OutputCapture:
    """Catches fd 1 and 2 from now on (see the module's docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: _wire.Connection | None = None
        self._streams: list[_Stream] = []
        self._tokens = float(BURST)
        self._refilled = time.monotonic()
        self._dropped = 0
        self._restored = False
        for fd in (1, 2):
            self._streams.append(_Stream(self, fd))
        for stream in self._streams:
            stream.start()

    def attach(self, conn: _wire.Connection) -> None:
        """The runner is connected: send what was held, and what comes from now on."""
        with self._lock:
            self._conn = conn
            held = [(stream, bytes(stream.held)) for stream in self._streams]
            for stream in self._streams:
                stream.held.clear()
            dropped = sum(stream.held_dropped for stream in self._streams)
        for stream, data in held:
            self.send(stream.fd, data)
        if dropped:
            self._notice(dropped, "before the runner was connected")

    def restore(self, wait: float = 0.5) -> None:
        """Point fd 1 and 2 back where they were, and let what was caught go out: to the
        parent while the connection lasts, else to the original descriptors."""
        with self._lock:
            if self._restored:
                return
            self._restored = True
        for stream in self._streams:
            stream.restore()
        deadline = time.monotonic() + wait
        for stream in self._streams:
            stream.thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._conn = None
            for stream in self._streams:  # already written to the originals
                stream.held.clear()

    # -- from the reader threads ------------------------------------------------------------
    def caught(self, stream: _Stream, data: bytes) -> None:
        with self._lock:
            conn = self._conn
            if conn is None or conn.closed:
                # not connected (yet, or any more): to the original at once, so the backend
                # shows it (a runner that hangs at import, or dies, keeps its last words);
                # and before the connection, held too, to be sent once it is up
                stream.write_original(data)
                if conn is None and not self._restored:
                    room = HELD - len(stream.held)
                    stream.held += data[:room]
                    stream.held_dropped += max(0, len(data) - room)
                return
        self.send(stream.fd, data)

    def send(self, fd: int, data: bytes) -> None:
        with self._lock:  # the two reader threads share the rate and the count
            conn = self._conn
            if conn is None or not data:
                return
            for start in range(0, len(data), _CHUNK):
                chunk = data[start : start + _CHUNK]
                if not self._take(len(chunk)) or conn.backlog > _BACKLOG:
                    self._dropped += len(chunk)
                    continue
                if self._dropped:
                    dropped, self._dropped = self._dropped, 0
                    self._notice(dropped, "to keep the runner's calls and its parent going")
                conn.send_soon(_wire.OUTPUT, [_wire.BYTE.pack(fd), chunk])

    def _take(self, n: int) -> bool:
        now = time.monotonic()
        self._tokens = min(BURST, self._tokens + (now - self._refilled) * RATE)
        self._refilled = now
        if self._tokens < n:
            return False
        self._tokens -= n
        return True

    def _notice(self, dropped: int, why: str) -> None:
        conn = self._conn
        if conn is not None:
            text = f"\n[{dropped} bytes of this runner's output were dropped {why}]\n"
            conn.send_soon(_wire.OUTPUT, [_wire.BYTE.pack(2), text.encode()])


class _Stream:
    """One caught descriptor: its pipe, its reader thread, and the original it replaced."""

    def __init__(self, capture: OutputCapture, fd: int) -> None:
        self.capture = capture
        self.fd = fd
        self.original = os.dup(fd)
        os.set_inheritable(self.original, False)
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        self.pipe = read
        self.held = bytearray()
        self.held_dropped = 0
        self.thread = threading.Thread(target=self._read, name=f"flame-output-{fd}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.pipe, 65536)
            except OSError:
                return
            if not data:
                os.close(self.pipe)
                return
            self.capture.caught(self, data)

    def restore(self) -> None:
        _flush_python(self.fd)
        os.dup2(self.original, self.fd)  # the pipe's last writer here: its reader sees EOF

    def write_original(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.original, view)
            except OSError:  # the original is gone too (a parent that died): nothing to do
                return
            view = view[n:]


def _flush_python(fd: int) -> None:
    stream: Any = sys.stdout if fd == 1 else sys.stderr
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):
        pass


def line_buffered() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` write each line as it is printed."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)
            except (OSError, ValueError):
                pass
