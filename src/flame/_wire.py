"""The wire protocol between a parent and one runner: frames, handshake, heartbeats.

One TCP connection per runner, always dialled by the runner to the parent's listener.

Frames
------
Every frame is a 9-byte header, ``!QB`` (body length, kind), then the body. Before
authentication a frame may be at most :data:`PREAUTH_MAX_FRAME` bytes and its body is JSON;
after it, at most the configured ``max_frame`` (1 GiB by default). Bodies that carry Python
objects are "pickled sections": ``!H`` buffer count, one ``!Q`` length per buffer, then the
pickle stream, then the out-of-band buffers (pickle protocol 5) back to back. The receiver
reads a large body into one ``bytearray`` and hands ``memoryview`` slices of it to the
unpickler, so large payloads are copied neither on sending (``sendmsg`` gathers the parts)
nor on receiving (see :class:`Connection` for where a large body is received).

Handshake (mutual HMAC-SHA256 challenge-response with the per-runner secret)
------------------------------------------------------------------------------
::

    runner                                   parent
      HELLO     {"id", "nonce": Nr}      ->
                                         <-  CHALLENGE {"nonce": Np, "proof": H(s, "P"|Nr|Np)}
      (runner checks the parent's proof; on mismatch it hangs up)
      PROOF     {"proof": H(s, "R"|Np|Nr),
                 "versions": {...}}      ->
                                         <-  WELCOME {"config": {...}, "versions": {...}}
                                             or REFUSE {"reason": "..."}

The parent only answers HELLO for a runner id it is booting, each id is accepted once, and
a peer that does not complete the exchange within :data:`HANDSHAKE_TIMEOUT` is dropped.
Nothing is unpickled from either side before the exchange has completed: pre-authentication
frames are parsed as size-limited JSON only. Versions (flame, Python major.minor,
cloudpickle) are compared by the parent after the proofs; a mismatch is a REFUSE naming both.

Messages after the handshake
----------------------------
==============  ==================  =========================================================
kind            sent by             when / body
==============  ==================  =========================================================
PING            both                every heartbeat interval; empty. Any frame counts as life.
CALL            parent              run a function: ``!QBd`` (call id, flags, timeout or -1),
                                    then a pickled section of ``(fn, args)``.
CHILD_CALL      parent              call a method of a placed child: ``!QQd`` (call id, child
                                    id, timeout), pickled ``(method_name, args)``.
CANCEL          parent              ``!Q`` call id: the caller gave up (timeout, cancel).
CHILD_STOP      parent              ``!Q`` child id: stop that child (``close()`` it).
CONFIG          parent              right after WELCOME: pickled ``{"idle_check": fn|None}``.
RESULT          runner              ``!QB`` (call id, status) then a pickled section: the
                                    return value, or the exception (the statuses are
                                    ``flame._record.Status``).
CHILD_EXIT      runner              ``!QB`` (child id, status) then a pickled section: what
                                    the child's ``run()`` returned or raised; frees its slot.
IDLE            runner              idle long enough and its idle check passed: may I go?
KEEP            parent              ``!d`` ask again after that many seconds (-1: don't ask).
SHUTDOWN        parent              finish in-flight work within shutdown_timeout and exit.
GOODBYE         runner              ``!B`` exit code: the runner is about to exit on its own.
OUTPUT          runner              ``!B`` stream (1: stdout, 2: stderr), then bytes the runner
                                    wrote there (``Pool(forward_output=True)``).
==============  ==================  =========================================================

Heartbeats: each side sends PING every ``interval`` and declares the peer lost when nothing
has arrived for ``timeout`` (defaults 1 s and 8 s), which also catches a peer behind a
network that silently drops packets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import mmap
import os
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ._version import __version__

# -- frame kinds ----------------------------------------------------------------------------
HELLO, CHALLENGE, PROOF, WELCOME, REFUSE = 1, 2, 3, 4, 5
PING, CALL, CHILD_CALL, CANCEL, CHILD_STOP, CONFIG = 10, 11, 12, 13, 14, 15
RESULT, CHILD_EXIT, IDLE, KEEP, SHUTDOWN, GOODBYE, OUTPUT = 20, 21, 22, 23, 24, 25, 26
PREAUTH_KINDS = frozenset({HELLO, CHALLENGE, PROOF, WELCOME, REFUSE})

# CALL flags
FLAG_LINK = 1
FLAG_CAST = 2
FLAG_CHILD = 4

HEADER = struct.Struct("!QB")
CALL_HEAD = struct.Struct("!QBd")
CHILD_CALL_HEAD = struct.Struct("!QQd")
ID_HEAD = struct.Struct("!Q")
RESULT_HEAD = struct.Struct("!QB")
FLOAT = struct.Struct("!d")
BYTE = struct.Struct("!B")
_COUNT = struct.Struct("!H")
_LEN = struct.Struct("!Q")

PREAUTH_MAX_FRAME = 4096
DEFAULT_MAX_FRAME = 1 << 30
HANDSHAKE_TIMEOUT = 5.0
NONCE_BYTES = 32
DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_HEARTBEAT_TIMEOUT = 8.0
_READ_CHUNK = 64 * 1024  # the scratch buffer: small frames; larger ones get their own
_SMALL_FRAME = 16 * 1024
#: a body at least this large is received into the connection's spare buffer when nothing
#: of that buffer's last frame is still in use, else into a fresh buffer (which becomes
#: the spare); the spare is let go after _SPARE_KEEP seconds without such a frame
_REUSE_MIN = 1 << 20
_SPARE_KEEP = 5.0
#: the spare is reused for frames down to a quarter of its size, no smaller
_SPARE_SLACK = 4
#: only CPython's reference counts tell whether a buffer is still in use somewhere
_COUNTED = sys.implementation.name == "cpython"
#: anonymous memory whose pages the kernel fills in one go (Linux), not page by page
_POPULATE = (
    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    if hasattr(mmap, "MAP_POPULATE")
    else 0
)


@dataclass(frozen=True)
class RunnerConfig:
    """What one runner is told by its parent in WELCOME (its parent side uses the same).

    Every field is required: a missing or unknown key is a protocol error, never a silent
    default (the defaults live in ``flame._settings``).
    """

    heartbeat_interval: float
    heartbeat_timeout: float
    #: idle this long (and the idle check passes): ask the parent to go; None: never
    idle_after: float | None
    shutdown_timeout: float
    single_use: bool
    cancel_grace: float
    max_frame: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> RunnerConfig:
        """Read a configuration sent by a parent; ``ValueError`` names what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("the runner configuration is not an object")
        unknown = sorted(set(doc) - set(_CONFIG_TYPES))
        missing = sorted(set(_CONFIG_TYPES) - set(doc))
        if unknown or missing:
            raise ValueError(
                f"the runner configuration has unknown keys {unknown} and lacks {missing}"
            )
        for key, types in _CONFIG_TYPES.items():
            value = doc[key]
            if isinstance(value, bool) is not (bool in types) or not isinstance(value, types):
                raise ValueError(f"the runner configuration's {key} is {value!r}")
        return cls(**doc)


_SECONDS = (int, float)
#: the JSON types each field of RunnerConfig accepts (bool is not a number here)
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "heartbeat_interval": _SECONDS,
    "heartbeat_timeout": _SECONDS,
    "idle_after": (*_SECONDS, type(None)),
    "shutdown_timeout": _SECONDS,
    "single_use": (bool,),
    "cancel_grace": _SECONDS,
    "max_frame": (int,),
}


class ProtocolError(Exception):
    """The peer broke the protocol (bad frame, bad proof, unexpected message)."""


def local_versions() -> dict[str, str]:
    """The versions both sides must agree on."""
    return {
        "flame": __version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "cloudpickle": str(getattr(cloudpickle, "__version__", "?")),
    }


def proof(secret: bytes, role: bytes, first: bytes, second: bytes) -> str:
    return hmac.new(secret, role + first + second, hashlib.sha256).hexdigest()


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


# -- pickled sections -------------------------------------------------------------------------
def section_parts(data: bytes, buffers: Sequence[memoryview]) -> list[bytes | memoryview]:
    """The parts of a pickled section, ready to be gathered by ``sendmsg``."""
    head = bytearray(_COUNT.pack(len(buffers)))
    for b in buffers:
        head += _LEN.pack(b.nbytes)
    return [bytes(head), data, *buffers]


def split_section(body: memoryview) -> tuple[memoryview, list[memoryview]]:
    """Split a pickled section into the pickle stream and its out-of-band buffers."""
    (count,) = _COUNT.unpack_from(body, 0)
    pos = _COUNT.size
    lengths = []
    for _ in range(count):
        (n,) = _LEN.unpack_from(body, pos)
        lengths.append(n)
        pos += _LEN.size
    total = sum(lengths)
    end = len(body) - total
    if end < pos:
        raise ProtocolError("pickled section shorter than its buffers")
    data = body[pos:end]
    buffers = []
    for n in lengths:
        buffers.append(body[end : end + n])
        end += n
    return data, buffers


def json_body(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def parse_json(body: memoryview | bytes) -> dict[str, Any]:
    try:
        doc = json.loads(bytes(body))
    except (ValueError, UnicodeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise ProtocolError("handshake frame is not JSON") from exc
    if not isinstance(doc, dict):
        raise ProtocolError("handshake frame is not a JSON object")
    return doc


FrameHandler = Callable[[int, memoryview], None]


class Connection:
    """One framed, heartbeated connection, writable from any thread.

    Reading happens first in ``loop`` through ``add_reader`` (the handshake: one
    ``recv_into`` per readiness, large frames into a buffer of their own: see below), then, after
    :meth:`read_in_threads`, in whichever thread calls :meth:`read_frames` (one at a time;
    the last one releases the socket with :meth:`reader_done`). Writing is thread-safe: a
    small frame joins an outbox that the holder of the write lock flushes, several frames per
    ``send`` under load, so no writer waits for another; a large frame is written by its own
    thread. ``on_frame(kind, body)`` (loop reading only) and ``on_close(reason)`` run on the
    loop thread; ``on_close`` exactly once.

    Large bodies (at least ``_REUSE_MIN`` bytes) are received into memory already in
    place: the connection keeps the buffer of its last large frame (its "spare") and
    receives the next large frame into it if no memoryview of it is alive any more
    anywhere (every consumer of a body holds one while it uses it: a ``bytes`` payload is
    copied out of it when unpickled, and its views are gone after that; a NumPy array made
    on it keeps one for as long as it lives, and so keeps it from ever being reused). Else
    the body gets fresh memory whose pages the kernel fills in one go (``MAP_POPULATE``),
    which becomes the spare. A spare unused for ``_SPARE_KEEP`` seconds is let go.
    """

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        *,
        on_frame: FrameHandler,
        on_close: Callable[[str], None],
        max_frame: int = PREAUTH_MAX_FRAME,
        scratch: int = _READ_CHUNK,
    ) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.sock = sock
        self.loop = loop
        self.on_frame = on_frame
        self.on_close = on_close
        self.max_frame = max_frame
        self.closed = False
        self.close_reason = ""
        self.last_recv = time.monotonic()
        self.last_send = 0.0
        self._fd = sock.fileno()
        self._wlock = threading.Lock()
        self._outbox: deque[bytes] = deque()  # small frames, whole
        self._scratch = bytearray(scratch)
        self._have = 0  # bytes of the scratch buffer in use
        self._big: memoryview | None = None  # body being received outside the scratch
        self._big_kind = 0
        self._big_fill = 0
        self._spare: Any = None  # the buffer of the last large frame (bytearray or mmap)
        self._spare_used = 0.0
        self._hb_handle: asyncio.TimerHandle | None = None
        #: after :meth:`read_in_threads`: frames are read by threads, not the loop
        self._threaded = False
        self._poll: Any = None
        self._fd_lock = threading.Lock()  # the fd is closed by the last reader, under this
        self._fd_open = True
        #: threaded reading ended (why), before the loop has run close()
        self._ended: str | None = None
        #: TLS (flame._tls): one OpenSSL connection must not be used by two threads at once
        self._ssl_lock = threading.Lock() if isinstance(sock, ssl.SSLSocket) else None
        loop.add_reader(self._fd, self._on_readable)

    # -- the socket, plain or TLS ---------------------------------------------------------------
    def _recv(self, into: memoryview) -> int:
        """Non-blocking ``recv_into``: ``BlockingIOError`` when there is nothing to read."""
        if self._ssl_lock is None:
            return self.sock.recv_into(into)
        with self._ssl_lock:
            try:
                return self.sock.recv_into(into)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise BlockingIOError from None
            except ssl.SSLZeroReturnError:
                return 0

    def _send_some(self, data: bytes | memoryview) -> int:
        if self._ssl_lock is None:
            return self.sock.send(data)
        with self._ssl_lock:
            try:
                return self.sock.send(data)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise BlockingIOError from None

    def _tls_pending(self) -> bool:
        """Decrypted bytes held by the TLS layer, which no poll or epoll can see."""
        if self._ssl_lock is None:
            return False
        with self._ssl_lock:
            return bool(self.sock.pending())  # type: ignore[attr-defined]

    # -- reading (loop thread) ----------------------------------------------------------------
    def _recv_now(self, into: memoryview, where: str = "") -> int:
        """One non-blocking read: the bytes read, 0 if none yet, -1 once the stream ended."""
        try:
            n = self._recv(into)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._fail(f"connection error: {exc.strerror or exc}")
            return -1
        if n == 0:
            self._fail(f"connection closed by peer {where}".rstrip())
            return -1
        self.last_recv = time.monotonic()
        return n

    def _on_readable(self) -> None:
        while not self.closed:
            if self._big is not None:
                self._read_big()
                if self._big is not None or not self._tls_pending():
                    return
                continue
            n = self._recv_now(memoryview(self._scratch)[self._have :])
            if n <= 0:
                return
            self._have += n
            self._parse_scratch()
            if self._threaded or not self._tls_pending():
                return

    def _parse_scratch(self, out: list[tuple[int, memoryview]] | None = None) -> bool:
        """Deliver (or, given ``out``, collect) the whole frames in the scratch buffer.
        Returns False if the stream broke the protocol."""
        buf = self._scratch
        pos = 0
        hsize = HEADER.size
        while not self.closed and self._have - pos >= hsize:
            length, kind = HEADER.unpack_from(buf, pos)
            if length > self.max_frame:
                self._fail(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
                return False
            start = pos + hsize
            available = self._have - start
            if available >= length:
                body = memoryview(bytes(memoryview(buf)[start : start + length]))
                pos = start + length
                if out is None:
                    self.deliver([(kind, body)])
                else:
                    out.append((kind, body))
                continue
            if length > len(buf) - hsize:
                # a large frame: give it a buffer of its own and read the rest into it
                big = self._body_buffer(length)
                big[:available] = memoryview(buf)[start : self._have]
                self._big, self._big_kind, self._big_fill = big, kind, available
                self._have = 0
                return True
            break
        # keep the incomplete tail at the front of the scratch buffer
        rest = self._have - pos
        if pos and rest:
            buf[:rest] = buf[pos : self._have]
        self._have = rest
        return True

    def _body_buffer(self, length: int) -> memoryview:
        """Where a body of ``length`` bytes (too large for the scratch buffer) is received:
        the spare if nothing holds a view of it any more, else fresh memory (see the class's
        docstring). One reader at a time."""
        if length < _REUSE_MIN:
            return memoryview(bytearray(length))
        now = time.monotonic()
        spare = self._spare
        # three references when free: the attribute, this name, getrefcount's argument
        if (
            spare is not None
            and length <= len(spare) <= length * _SPARE_SLACK
            and _COUNTED
            and sys.getrefcount(spare) <= 3
        ):
            self._spare_used = now
            return memoryview(spare)[:length]
        fresh: Any = None
        if _POPULATE:
            try:
                fresh = mmap.mmap(-1, length, flags=_POPULATE)
            except OSError:  # no memory to commit at once: let the pages come as touched
                fresh = None
        if fresh is None:
            fresh = bytearray(length)
        self._spare, self._spare_used = fresh, now
        return memoryview(fresh)

    def _read_big(self) -> None:
        big = self._big
        assert big is not None
        view = big
        while self._big_fill < len(big):
            n = self._recv_now(view[self._big_fill :], "in the middle of a frame")
            if n <= 0:
                return
            self._big_fill += n
        kind = self._big_kind
        self._big = None
        self.deliver([(kind, view)])

    def deliver(
        self, frames: Sequence[tuple[int, memoryview]], handler: FrameHandler | None = None
    ) -> None:
        """Hand frames to ``handler`` (default: ``on_frame``) in order, on the loop thread,
        until the connection closes; a :class:`ProtocolError` from it closes the connection.
        Reader threads pass what the loop must handle through this."""
        handle = handler or self.on_frame
        for kind, body in frames:
            if self.closed:
                return
            try:
                handle(kind, body)
            except ProtocolError as exc:
                self.close(f"protocol error: {exc}")

    # -- reading in threads (after the handshake) ------------------------------------------
    def read_in_threads(self) -> None:
        """Stop reading on the loop; from now on threads call :meth:`read_frames`.

        Called once, on the loop thread, after the handshake. A thread blocked in
        ``read_frames`` delivers a reply to its caller, or starts a call, without a hop
        through the event loop; this is the hot path of every call."""
        if self._threaded or self.closed:
            return
        self.loop.remove_reader(self._fd)
        self._threaded = True
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def read_frames(self) -> list[tuple[int, memoryview]] | None:
        """Block until at least one whole frame has arrived and return the whole frames
        read, in order; ``None`` once the connection is closed (then the caller must call
        :meth:`reader_done`). One thread at a time."""
        out: list[tuple[int, memoryview]] = []
        while not out:
            if self.closed:
                return None
            big = self._big
            if big is not None:
                view = big
                while self._big_fill < len(big):
                    n = self._recv_blocking(view[self._big_fill :], "in the middle of a frame")
                    if n < 0:
                        return None
                    self._big_fill += n
                self._big = None
                out.append((self._big_kind, view))
                break
            n = self._recv_blocking(memoryview(self._scratch)[self._have :], "")
            if n < 0:
                return None
            self._have += n
            if not self._parse_scratch(out):
                return None
        return out

    def _recv_blocking(self, into: memoryview, where: str) -> int:
        """recv_into, waiting (GIL released) until data comes; -1 once the stream ended."""
        while True:
            n = self._recv_now(into, where)
            if n:
                return n
            if self.closed:
                return -1
            try:
                self._poll.poll()
            except InterruptedError:
                pass

    def reader_done(self) -> None:
        """The last reader leaves: release the socket (after ``read_frames`` returned None)."""
        if self._ended is None:
            self._ended = self.close_reason or "connection closed"
        with self._wlock, self._fd_lock:
            if self._fd_open:
                self._fd_open = False
                self.sock.close()

    def _fail(self, reason: str) -> None:
        """Close because of what was read: at once on the loop, from a reader thread soon."""
        if not self._threaded:
            self.close(reason)
            return
        if self._ended is None:
            self._ended = reason  # writers stop at once, with this reason, not a bad fd
        with contextlib.suppress(RuntimeError):  # the loop is gone: the process is ending
            self.loop.call_soon_threadsafe(self.close, reason)

    def enlarge(self) -> None:
        """Switch to the full-size read buffer (after authentication)."""
        if len(self._scratch) < _READ_CHUNK:
            bigger = bytearray(_READ_CHUNK)
            bigger[: self._have] = self._scratch[: self._have]
            self._scratch = bigger

    # -- writing (any thread) -----------------------------------------------------------------
    def send(self, kind: int, parts: Sequence[bytes | memoryview] = ()) -> None:
        """Send one frame. Raises ``ConnectionError`` if the connection is already closed.

        A small frame never waits for another writer: it joins the outbox, which the holder
        of the write lock flushes, several frames per ``send`` when they pile up (so under
        load frames are batched). A large frame is written by this thread, which blocks
        until it is out (and so pays for its own backpressure)."""
        self._check_open()
        frame = self._frame(kind, parts)
        if _size(frame) <= _SMALL_FRAME:
            self._outbox.append(b"".join(frame))
            self._try_flush()
            return
        with self._wlock:
            self._flush_outbox()  # what this thread queued before goes first
            self._write(frame)
            self._flush_outbox()
        if self._outbox:
            self._try_flush()

    @property
    def backlog(self) -> int:
        """Frames waiting in the outbox (a peer or network that does not keep up)."""
        return len(self._outbox)

    def send_soon(self, kind: int, parts: Sequence[bytes | memoryview] = ()) -> None:
        """Send a small frame without ever blocking on another writer (for the loop thread)."""
        if self.closed:
            return
        self._outbox.append(b"".join(self._frame(kind, parts)))
        self._try_flush()

    def _try_flush(self) -> None:
        while self._outbox and not self.closed:
            if not self._wlock.acquire(blocking=False):
                return  # the holder flushes before it lets go
            try:
                self._flush_outbox()
            except ConnectionError:
                return
            finally:
                self._wlock.release()

    def _flush_outbox(self) -> None:
        outbox = self._outbox
        while outbox:
            first = outbox.popleft()
            if not outbox:
                self._write([first])
                continue
            batch, size = [first], len(first)
            while outbox and size < _READ_CHUNK:
                data = outbox.popleft()
                batch.append(data)
                size += len(data)
            self._write([b"".join(batch)])

    def _frame(self, kind: int, parts: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
        length = 0
        for p in parts:
            length += p.nbytes if isinstance(p, memoryview) else len(p)
        return [HEADER.pack(length, kind), *parts]

    def _check_open(self) -> None:
        if self.closed or self._ended is not None:
            raise ConnectionError(self.close_reason or self._ended or "connection closed")

    def _write(self, frame: list[bytes | memoryview]) -> None:
        self._check_open()
        sock = self.sock
        if len(frame) == 1 or _size(frame) <= _SMALL_FRAME:
            # small frames (the common case): one buffer, one send(), no gather bookkeeping
            data = b"".join(frame)
            try:
                sent = self._send_some(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.loop.call_soon_threadsafe(self.close, f"send failed: {exc.strerror or exc}")
                raise ConnectionError(f"send failed: {exc.strerror or exc}") from exc
            if sent == len(data):
                self.last_send = time.monotonic()
                return
            frame = [memoryview(data)[sent:]]
        views = [memoryview(p).cast("B") for p in frame]
        views = [v for v in views if v.nbytes]
        while views:
            try:
                if len(views) > 64 or self._ssl_lock is not None:  # TLS: no sendmsg
                    sent = self._send_some(views[0])
                else:
                    sent = sock.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                self._wait_writable()
                continue
            except OSError as exc:
                self.loop.call_soon_threadsafe(self.close, f"send failed: {exc.strerror or exc}")
                raise ConnectionError(f"send failed: {exc.strerror or exc}") from exc
            while sent:
                first = views[0]
                if sent >= first.nbytes:
                    sent -= first.nbytes
                    views.pop(0)
                else:
                    views[0] = first[sent:]
                    sent = 0
        self.last_send = time.monotonic()

    def _wait_writable(self) -> None:
        # poll, not select: select cannot watch a descriptor numbered 1024 or more
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while True:
            if self.closed:
                raise ConnectionError(self.close_reason or "connection closed")
            try:
                ready = poller.poll(250)
            except OSError as exc:
                raise ConnectionError(self.close_reason or "connection closed") from exc
            if any(event & select.POLLNVAL for _, event in ready):  # fd closed underneath us
                raise ConnectionError(self.close_reason or "connection closed")
            if ready:
                return

    # -- heartbeats (loop thread) ---------------------------------------------------------------
    def start_heartbeats(self, interval: float, timeout: float) -> None:
        def beat() -> None:
            if self.closed:
                return
            now = time.monotonic()
            if now - self.last_recv > timeout:
                self.close(f"no heartbeat from the peer for {now - self.last_recv:.1f}s")
                return
            if now - self.last_send >= interval * 0.5:
                self.send_soon(PING)
            if self._spare is not None and now - self._spare_used > _SPARE_KEEP:
                self._spare = None  # a reader holding it keeps it to the end of its frame
            self._hb_handle = self.loop.call_later(interval, beat)

        self.last_recv = time.monotonic()
        self._hb_handle = self.loop.call_later(interval, beat)

    # -- closing (loop thread, or any thread through call_soon_threadsafe) ----------------------
    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._hb_handle is not None:
            self._hb_handle.cancel()
        with self._fd_lock:
            if not self._threaded:
                with contextlib.suppress(ValueError, OSError, RuntimeError):
                    self.loop.remove_reader(self._fd)
            if self._fd_open:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in poll
                if not self._threaded:
                    self._fd_open = False
                    self.sock.close()
        self._big = None
        self._outbox.clear()
        self.on_close(reason)


def _size(parts: Sequence[bytes | memoryview]) -> int:
    size = 0
    for p in parts:
        size += p.nbytes if isinstance(p, memoryview) else len(p)
    return size


class FrameQueue:
    """Collects frames on the loop thread during the handshake, for a coroutine to await."""

    def __init__(self) -> None:
        self._q: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self.reason = ""
        self.welcomed = False
        #: frames that arrived after WELCOME, before the session took over the connection
        self.later: list[tuple[int, memoryview]] = []

    def on_frame(self, kind: int, body: memoryview) -> None:
        if self.welcomed:
            self.later.append((kind, body))
            return
        if kind not in PREAUTH_KINDS:
            raise ProtocolError(f"unexpected message kind {kind} before authentication")
        if kind == WELCOME:
            self.welcomed = True
        self._q.put_nowait((kind, bytes(body)))

    def on_close(self, reason: str) -> None:
        self.reason = reason
        self._q.put_nowait(None)

    async def get(self, expected: int) -> dict[str, Any]:
        item = await self._q.get()
        if item is None:
            raise ProtocolError(self.reason or "connection closed during the handshake")
        kind, body = item
        if kind == REFUSE:
            raise RefusedError(str(parse_json(body).get("reason", "refused")))
        if kind != expected:
            raise ProtocolError(f"expected message kind {expected}, got {kind}")
        return parse_json(body)


class RefusedError(ProtocolError):
    """The parent refused the runner after authentication (e.g. version mismatch)."""


def versions_mismatch(parent: dict[str, Any], runner: dict[str, Any]) -> str | None:
    """A message naming both sides' versions if they differ, else ``None``."""
    keys = ("flame", "python", "cloudpickle")
    if all(parent.get(k) == runner.get(k) for k in keys):
        return None
    left = ", ".join(f"{k} {parent.get(k)}" for k in keys)
    right = ", ".join(f"{k} {runner.get(k)}" for k in keys)
    return f"version mismatch between parent ({left}) and runner ({right})"
