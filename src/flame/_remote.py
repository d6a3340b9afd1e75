"""The parent side of a remote runner's connection: ``WireLink``, frames to and from a peer.

After the handshake (``flame._listener``), one reader thread per connection reads frames:
a RESULT goes straight to its caller (no hop through the event loop: this is the hot path of
every call); every other frame is handled on the pool's loop, in order. Sending is done by
whichever thread calls: a call's frame is written by the caller's own thread.
"""

from __future__ import annotations

import threading
from typing import Any

from . import _lifecycle, _wire
from ._link import Peer, Section
from ._record import Form, Status, Wakes, wake_all
from ._wire import RunnerConfig

_STATUS = {int(s): s for s in Status}


def status_of(code: int) -> Status:
    try:
        return _STATUS[code]
    except KeyError:
        raise _wire.ProtocolError(f"unknown result status {code}") from None


class WireLink:
    """A runner's connection, as the parent side's :class:`flame._link.Link`."""

    def __init__(self, conn: _wire.Connection, queue: _wire.FrameQueue) -> None:
        self.conn = conn
        self._queue = queue
        self._peer: Peer | None = None

    @property
    def closed(self) -> bool:
        return self.conn.closed

    @property
    def close_reason(self) -> str:
        return self.conn.close_reason

    def start(self, peer: Peer, config: RunnerConfig, name: str) -> None:
        """Report to ``peer`` from now on; heartbeats, then reading in a thread of its own."""
        conn = self.conn
        self._peer = peer
        conn.on_frame = self._on_frame
        conn.on_close = peer.closed
        conn.max_frame = config.max_frame
        for kind, body in self._queue.later:
            self._on_frame(kind, body)
        conn.start_heartbeats(config.heartbeat_interval, config.heartbeat_timeout)
        conn.read_in_threads()
        threading.Thread(target=self._read, name=f"flame-reader-{name}", daemon=True).start()

    # -- frames from the runner ------------------------------------------------------------
    def _read(self) -> None:
        conn, peer = self.conn, self._peer
        assert peer is not None
        loop = conn.loop
        try:
            while True:
                frames = conn.read_frames()
                if frames is None:
                    return
                rest = []
                wakes: Wakes = {}
                for kind, body in frames:
                    if kind == _wire.RESULT:
                        call_id, status = _wire.RESULT_HEAD.unpack_from(body, 0)
                        peer.result(
                            call_id,
                            Form.ENCODED,
                            status_of(status),
                            body[_wire.RESULT_HEAD.size :],
                            wakes,
                        )
                    elif kind == _wire.OUTPUT:
                        peer.output(body[0], bytes(body[1:]))
                    elif kind != _wire.PING:
                        rest.append((kind, body))
                if wakes:
                    wake_all(wakes)
                if rest:
                    loop.call_soon_threadsafe(conn.deliver, rest, self._on_frame)
                # hold no body while blocked in the next read: a large body's buffer can
                # then take the next large frame (flame._wire.Connection._body_buffer)
                del frames, body, rest
        except _wire.ProtocolError as exc:
            conn._fail(f"protocol error: {exc}")
        except RuntimeError:  # the loop is closed: the process is ending
            return
        finally:
            conn.reader_done()

    def _on_frame(self, kind: int, body: memoryview) -> None:
        peer = self._peer
        assert peer is not None
        if kind == _wire.RESULT:
            call_id, status = _wire.RESULT_HEAD.unpack_from(body, 0)
            peer.result(call_id, Form.ENCODED, status_of(status), body[_wire.RESULT_HEAD.size :])
        elif kind == _wire.CHILD_EXIT:
            child_id, status = _wire.RESULT_HEAD.unpack_from(body, 0)
            peer.child_exit(
                child_id, Form.ENCODED, status_of(status), body[_wire.RESULT_HEAD.size :]
            )
        elif kind == _wire.IDLE:
            peer.idle()
        elif kind == _wire.GOODBYE:
            (code,) = _wire.BYTE.unpack_from(body, 0)
            peer.goodbye(code)
        elif kind == _wire.OUTPUT:
            peer.output(body[0], bytes(body[1:]))
        elif kind != _wire.PING:
            raise _wire.ProtocolError(f"unexpected message kind {kind} from a runner")

    # -- to the runner (any thread) ------------------------------------------------------------
    def call(
        self,
        call_id: int,
        flags: int,
        timeout: float | None,
        fn: Any,
        args: tuple[Any, ...],
        section: Section,
    ) -> None:
        assert section is not None
        head = _wire.CALL_HEAD.pack(call_id, flags, -1.0 if timeout is None else timeout)
        self.conn.send(_wire.CALL, [head, *_wire.section_parts(*section)])

    def child_call(
        self,
        call_id: int,
        child_id: int,
        timeout: float | None,
        method: str,
        args: tuple[Any, ...],
        section: Section,
    ) -> None:
        assert section is not None
        head = _wire.CHILD_CALL_HEAD.pack(call_id, child_id, -1.0 if timeout is None else timeout)
        self.conn.send(_wire.CHILD_CALL, [head, *_wire.section_parts(*section)])

    def cancel(self, call_id: int) -> None:
        self.conn.send_soon(_wire.CANCEL, [_wire.ID_HEAD.pack(call_id)])

    def stop_child(self, child_id: int) -> None:
        self.conn.send_soon(_wire.CHILD_STOP, [_wire.ID_HEAD.pack(child_id)])

    def keep(self, retry_after: float) -> None:
        self.conn.send_soon(_wire.KEEP, [_wire.FLOAT.pack(retry_after)])

    def shutdown(self) -> None:
        self.conn.send_soon(_wire.SHUTDOWN)

    def close(self, reason: str) -> None:
        self.conn.close(reason)

    def forsake(self) -> None:
        _lifecycle.close_fd(self.conn.sock.detach())
