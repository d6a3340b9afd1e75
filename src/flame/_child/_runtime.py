"""The runner's side of its connection: dial, handshake, then serve frames until the
terminator (``flame._child._terminator``) says the runner ends, and return the exit code.

Frames are read by the executor's worker threads taking turns (the "leader" reads, and runs
the call it read itself); everything that is not a plain call goes to the control loop, in
order. Results are encoded (``flame._record.encode``) and written by the worker that ran the
call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import select
import socket
import sys
import threading
import time
from typing import Any

from .. import _serialize, _wire
from .._exits import ExitCode
from .._parent import LaunchInfo
from .._record import Outcome, encode
from .._wire import RunnerConfig
from ._executor import Executor
from ._output import OutputCapture
from ._terminator import Terminator

_CONNECT_ATTEMPT_TIMEOUT = 3.0
_CHILD_FLAG = _wire.FLAG_CHILD  # in a CALL's flags byte, body[8]


class _Exit(Exception):
    def __init__(self, code: ExitCode, message: str = "") -> None:
        super().__init__(message)
        self.code = code


async def _dial(info: LaunchInfo, deadline: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    last: Exception | None = None
    delay = 0.05
    while True:
        for host, port in info.addresses:
            try:
                remaining = max(0.1, min(_CONNECT_ATTEMPT_TIMEOUT, deadline - time.monotonic()))
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, stype, proto, _, addr = infos[0]
                sock = socket.socket(family, stype, proto)
                sock.setblocking(False)
                try:
                    await asyncio.wait_for(loop.sock_connect(sock, addr), remaining)
                except BaseException:
                    sock.close()
                    raise
                return sock
            except (OSError, TimeoutError) as exc:
                last = exc
        if time.monotonic() + delay > deadline:
            raise _Exit(ExitCode.FAILSAFE, f"could not reach the parent: {last}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


class RunnerSession:
    """Serves one authenticated connection until the terminator ends it."""

    def __init__(self, info: LaunchInfo, config: RunnerConfig, conn: _wire.Connection) -> None:
        self.info = info
        self.loop = asyncio.get_running_loop()
        self.conn = conn
        self.done: asyncio.Future[ExitCode] = self.loop.create_future()
        self.executor = Executor(
            self.loop,
            on_change=self._changed,
            on_stuck=self._stuck,
            cancel_grace=config.cancel_grace,
            now=self.loop.time,
        )
        self.terminator = Terminator(
            config,
            self.executor,
            self,
            self.loop,
            self._exit,
            say=lambda text: _say(f"flame runner {info.runner_id}: {text}"),
        )
        self._watch: Any = None  # select.epoll, see _start_watch
        self._lead_lock = threading.Lock()
        self._vacant = False

    # -- reading (worker threads, one at a time) -------------------------------------------------
    # -- the terminator's ports ---------------------------------------------------------------
    def _changed(self) -> None:
        self.terminator.changed()

    def _stuck(self, call_id: int) -> None:
        self.terminator.stuck(call_id)

    def _exit(self, code: ExitCode) -> None:
        if not self.done.done():
            self.done.set_result(code)

    def idle(self) -> None:
        self.conn.send_soon(_wire.IDLE)

    def goodbye(self, code: ExitCode) -> None:
        self.conn.send_soon(_wire.GOODBYE, [_wire.BYTE.pack(int(code))])

    def lead(self) -> None:
        """Read frames as the connection's one reader (the "leader"), in a worker thread.

        A plain call that arrives is run by the leader itself, right here: a call costs no
        thread hop between the socket and the user's function. Every other frame goes to the
        control loop, in the order received. While the leader runs a call, someone else must
        read: with other work in flight, the leader wakes a follower at once; otherwise it
        only arms a watch on the socket (:meth:`_vacate`), and the control loop wakes a
        follower if anything arrives before the call ends. Then the leader, back from a
        quick call, simply reads on, and a sequential stream of calls never wakes a thread
        that would compete with the call for the GIL."""
        conn = self.conn
        assert conn is not None
        while True:
            try:
                taken = self._read_until_call(conn)
            except RuntimeError:  # the control loop is closed: the runner is exiting
                taken = None
            except BaseException as exc:  # a bug here must not leave the runner deaf
                conn._fail(f"runner failed to read: {type(exc).__name__}: {exc}")
                taken = None
            if taken is None:
                conn.reader_done()
                return
            # (bytes the TLS layer already holds would never wake the watch)
            if self.executor.busy > 1 or self._watch is None or conn._tls_pending():
                self.executor.spawn(self.lead)  # the next leader, now
                self.executor.run(*taken)
                return
            self._vacate()
            self.executor.run(*taken)
            del taken  # its body's buffer can take the next large frame (_wire._body_buffer)
            if not self._reclaim():
                return  # the control loop made another worker the leader meanwhile

    # -- the watch over a vacant socket ------------------------------------------------------------
    def _start_watch(self, conn: _wire.Connection) -> None:
        """A private epoll set, watched by the control loop, in which the leader arms the
        socket while it runs a call (control loop, once)."""
        try:
            watch = select.epoll()
        except (AttributeError, OSError):
            return  # no epoll: always hand the reading over at once
        watch.register(conn.sock.fileno(), 0)
        self._watch = watch
        self.loop.add_reader(watch.fileno(), self._on_watch)

    def _vacate(self) -> None:
        with self._lead_lock:
            self._vacant = True
            self._arm(select.EPOLLIN | select.EPOLLONESHOT)

    def _reclaim(self) -> bool:
        """Back from a call: lead on, unless a follower took over (then False)."""
        with self._lead_lock:
            if not self._vacant:
                return False
            self._vacant = False
            self._arm(0)
            return True

    def _arm(self, events: int) -> None:
        """Set what the watch waits for (under ``_lead_lock``)."""
        watch, conn = self._watch, self.conn
        if watch is not None and conn is not None:
            # closed meanwhile (the runner is ending): the next read finds that out
            with contextlib.suppress(OSError, ValueError):
                watch.modify(conn.sock.fileno(), events)

    def _on_watch(self) -> None:
        """Control loop: something arrived on the vacant socket: wake a follower to read."""
        if self._watch is None:
            return
        with contextlib.suppress(OSError):
            self._watch.poll(0)  # consume the (one-shot) event
        with self._lead_lock:
            if not self._vacant:
                return
            self._vacant = False
        self.executor.spawn(self.lead)

    def _stop_watch(self) -> None:
        with self._lead_lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                self.loop.remove_reader(watch.fileno())
            watch.close()

    def _read_until_call(self, conn: _wire.Connection) -> tuple[Any, Any] | None:
        """Read until plain calls come: register them all, start all but the last in other
        workers, pass every other frame on to the control loop (in order, after the calls
        are registered, so that a CANCEL finds its call), and return the last call (job,
        loader) for this thread to run. ``None``: the connection has ended."""
        call_head = _wire.CALL_HEAD.size
        while True:
            frames = conn.read_frames()
            if frames is None:
                return None
            calls: list[tuple[Any, Any]] = []
            rest: list[tuple[int, memoryview]] = []
            for kind, body in frames:
                if kind == _wire.CALL and len(body) >= call_head and not body[8] & _CHILD_FLAG:
                    calls.append(self._take_call(body))
                elif kind != _wire.PING:
                    rest.append((kind, body))
            for job, load in calls[:-1]:
                self.executor.spawn(functools.partial(self.executor.run, job, load))
            if rest:
                self.loop.call_soon_threadsafe(conn.deliver, rest, self.on_frame)
            if calls:
                return calls[-1]

    def _take_call(self, body: memoryview) -> tuple[Any, Any]:
        call_id, flags, timeout = _wire.CALL_HEAD.unpack_from(body, 0)
        self.terminator.served()
        job = self.executor.new_call(
            call_id,
            timeout=None if timeout < 0 else timeout,
            link=bool(flags & _wire.FLAG_LINK),
            on_done=functools.partial(self._reply, _wire.RESULT, call_id, "result"),
        )
        return job, _loader(body[_wire.CALL_HEAD.size :])

    # -- frames (control loop) ----------------------------------------------------------------
    def on_frame(self, kind: int, body: memoryview) -> None:
        if kind == _wire.PING:
            return
        if kind == _wire.CALL:
            call_id, flags, _ = _wire.CALL_HEAD.unpack_from(body, 0)
            if not flags & _wire.FLAG_CHILD:
                self.executor.spawn(functools.partial(self.executor.run, *self._take_call(body)))
                return
            self.terminator.served()
            self.executor.place_child(
                call_id,
                _loader(body[_wire.CALL_HEAD.size :]),
                link=bool(flags & _wire.FLAG_LINK),
                on_built=functools.partial(self._reply, _wire.RESULT, call_id, "child"),
                on_exit=functools.partial(
                    self._reply, _wire.CHILD_EXIT, call_id, "child's run() result"
                ),
            )
        elif kind == _wire.CHILD_CALL:
            call_id, child_id, timeout = _wire.CHILD_CALL_HEAD.unpack_from(body, 0)
            load = _loader(body[_wire.CHILD_CALL_HEAD.size :])
            self.executor.child_call(
                call_id,
                child_id,
                load,
                timeout=None if timeout < 0 else timeout,
                on_done=functools.partial(self._reply, _wire.RESULT, call_id, "result"),
            )
        elif kind == _wire.CANCEL:
            (call_id,) = _wire.ID_HEAD.unpack_from(body, 0)
            self.executor.cancel(call_id)
        elif kind == _wire.CHILD_STOP:
            (child_id,) = _wire.ID_HEAD.unpack_from(body, 0)
            self.executor.stop_child(child_id)
        elif kind == _wire.CONFIG:
            data, bufs = _wire.split_section(body)
            self.terminator.idle_check = _serialize.loads(data, bufs).get("idle_check")
        elif kind == _wire.KEEP:
            (retry,) = _wire.FLOAT.unpack_from(body, 0)
            self.terminator.keep(retry)
        elif kind == _wire.SHUTDOWN:
            self.terminator.shutdown()
        else:
            raise _wire.ProtocolError(f"unexpected message kind {kind} from the parent")

    def on_close(self, reason: str) -> None:
        if self.terminator.ended or self.terminator.draining:
            return
        _say(f"flame runner {self.info.runner_id}: parent lost ({reason})")
        self.terminator.parent_lost()

    # -- replies (worker threads) ---------------------------------------------------------------
    def _reply(self, kind: int, call_id: int, what: str, outcome: Outcome) -> None:
        status, parts = encode(outcome, what)
        conn = self.conn
        if conn.closed:
            return
        try:
            conn.send(kind, [_wire.RESULT_HEAD.pack(call_id, status), *parts])
        except ConnectionError:
            pass


def _say(text: str) -> None:
    """A line on stderr. Once the parent is gone (ProcessBackend: stderr is a pipe it read),
    writing there fails with EPIPE, which must never stop the runner from winding down."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _loader(payload: memoryview) -> Any:
    def load() -> tuple[Any, tuple[Any, ...]]:
        data, bufs = _wire.split_section(payload)
        fn, args = _serialize.loads(data, bufs)
        return fn, args

    return load


async def handshake(
    sock: socket.socket, info: LaunchInfo
) -> tuple[_wire.Connection, _wire.FrameQueue, RunnerConfig]:
    loop = asyncio.get_running_loop()
    q = _wire.FrameQueue()
    conn = _wire.Connection(sock, loop, on_frame=q.on_frame, on_close=q.on_close)
    nonce_r = _wire.new_nonce()
    conn.send_soon(_wire.HELLO, [_wire.json_body({"id": info.runner_id, "nonce": nonce_r.hex()})])
    try:
        challenge = await asyncio.wait_for(q.get(_wire.CHALLENGE), _wire.HANDSHAKE_TIMEOUT)
        nonce_p = bytes.fromhex(str(challenge["nonce"]))
        expected = _wire.proof(info.secret, b"P", nonce_r, nonce_p)
        if not hmac.compare_digest(expected.encode(), str(challenge.get("proof", "")).encode()):
            raise _Exit(ExitCode.AUTH_FAILED, "the parent could not prove the runner secret")
        # the parent has proven the secret: what it sends next (WELCOME, CONFIG and, read in
        # the same chunk, maybe a large first CALL) must not hit the pre-authentication limit
        conn.max_frame = max(conn.max_frame, _wire.DEFAULT_MAX_FRAME)
        mine = _wire.proof(info.secret, b"R", nonce_p, nonce_r)
        conn.send_soon(
            _wire.PROOF, [_wire.json_body({"proof": mine, "versions": _wire.local_versions()})]
        )
        welcome = await asyncio.wait_for(q.get(_wire.WELCOME), _wire.HANDSHAKE_TIMEOUT)
    except _wire.RefusedError as exc:
        conn.close("refused")
        raise _Exit(ExitCode.REFUSED, f"the parent refused this runner: {exc}") from None
    except (_wire.ProtocolError, TimeoutError, ValueError, KeyError) as exc:
        conn.close("handshake failed")
        raise _Exit(ExitCode.AUTH_FAILED, f"handshake with the parent failed: {exc}") from None
    try:
        config = RunnerConfig.from_json(welcome.get("config"))
    except (TypeError, ValueError) as exc:
        conn.close("bad configuration")
        raise _Exit(ExitCode.AUTH_FAILED, f"the parent's WELCOME is malformed: {exc}") from None
    return conn, q, config


async def _secure(sock: socket.socket, info: LaunchInfo) -> socket.socket:
    """TLS (when the parent asked for it): only the certificate it pinned is accepted."""
    if info.tls_fingerprint is None:
        return sock
    from .. import _tls

    try:
        return await _tls.handshake(
            sock,
            _tls.client_context(),
            server_side=False,
            timeout=_wire.HANDSHAKE_TIMEOUT,
            pin=info.tls_fingerprint,
        )
    except _tls.TLSError as exc:
        raise _Exit(ExitCode.AUTH_FAILED, str(exc)) from None


async def serve(
    info: LaunchInfo, started: float, on_connected: Any, capture: OutputCapture | None
) -> int:
    deadline = started + info.failsafe
    try:
        sock = await _secure(await _dial(info, deadline), info)
        conn, q, config = await handshake(sock, info)
    except _Exit as exc:
        _say(f"flame runner {info.runner_id}: {exc}")
        return int(exc.code)
    on_connected()
    if capture is not None:
        capture.attach(conn)
    session = RunnerSession(info, config, conn)
    conn.max_frame = config.max_frame
    conn.on_frame = session.on_frame
    conn.on_close = session.on_close
    for kind, body in q.later:
        session.on_frame(kind, body)
    conn.start_heartbeats(config.heartbeat_interval, config.heartbeat_timeout)
    session.terminator.start()
    conn.read_in_threads()
    session._start_watch(conn)
    session.executor.spawn(session.lead)
    code = await session.done
    session._stop_watch()
    if capture is not None:  # the last lines go to the parent while the connection lasts
        await asyncio.to_thread(capture.restore)
    if not conn.closed:
        # let queued frames (results, GOODBYE) leave before hanging up
        await asyncio.sleep(0)
        conn.close("runner exiting")
    return int(code)
