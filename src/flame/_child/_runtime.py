"""The runner's side of the connection, and its terminator.

After the app has been imported, :func:`serve` dials the parent, runs the handshake (see
``flame._wire``), then serves frames on the control loop until one of the runner life-cycle
rules ends it, and returns the exit code:

* the parent sends SHUTDOWN (pool stop, retire, or an IDLE request granted): in-flight work
  gets ``shutdown_timeout``, then is cancelled;
* idle (no call, no child) for ``idle_after`` and the idle check passes: ask the parent (IDLE);
  it answers SHUTDOWN or KEEP, so a runner never leaves while a call is on its way;
* a single-use runner's call is done;
* the parent is lost (closed connection, or heartbeats stop): linked work is cancelled at
  once, unlinked work gets ``shutdown_timeout``;
* a cancelled call has not stopped within the grace period: the runner exits (STUCK).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import math
import select
import socket
import sys
import threading
import time
from typing import Any

from .. import _serialize, _wire
from .._errors import SerializationError
from .._exits import ExitCode
from .._parent import LaunchInfo
from .._settings import RunnerConfig
from ._executor import Executor, Outcome

_CONNECT_ATTEMPT_TIMEOUT = 3.0
_TICK = 0.1  # seconds between the terminator's periodic checks
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


def _encode_outcome(outcome: Outcome, what: str) -> tuple[int, list[bytes | memoryview]]:
    """Pickle an outcome for RESULT / CHILD_EXIT.

    A raised exception travels as ``(pickled exception or None, type name, message,
    traceback)`` so that the parent can still report it when the exception itself will not
    pickle here or unpickle there.
    """
    status, value = outcome
    if status == _wire.STATUS_OK:
        try:
            data, bufs = _serialize.dumps_value(value, what)
            return status, _wire.section_parts(data, bufs)
        except SerializationError as exc:
            status, value = _wire.STATUS_RAISED, (exc, "")
    if status == _wire.STATUS_RAISED:
        error, tb = value
        try:
            blob: bytes | None = _serialize.dumps(error)[0]
        except Exception:
            blob = None
        value = (blob, _qualname(type(error)), str(error), tb)
    data, bufs = _serialize.dumps(value)
    return status, _wire.section_parts(data, bufs)


def _qualname(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class RunnerSession:
    """Serves one authenticated connection until an exit rule fires."""

    def __init__(self, info: LaunchInfo, config: RunnerConfig) -> None:
        self.info = info
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.idle_after = config.idle_after
        self.shutdown_timeout = config.shutdown_timeout
        self.single_use = config.single_use
        self.idle_check: Any = None
        self.done: asyncio.Future[ExitCode] = self.loop.create_future()
        self.executor = Executor(
            self.loop,
            on_change=self._on_change,
            on_stuck=self._on_stuck,
            cancel_grace=config.cancel_grace,
        )
        self.conn: _wire.Connection | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._idle_asking = False
        self._checking = False
        self._next_ask = 0.0  # after a KEEP: not before this time
        self._draining = False
        self._served = 0
        self._watch: Any = None  # select.epoll, see _start_watch
        self._lead_lock = threading.Lock()
        self._vacant = False

    # -- reading (worker threads, one at a time) -------------------------------------------------
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
        self._served += 1
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
            self._served += 1
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
            self.idle_check = _serialize.loads(data, bufs).get("idle_check")
        elif kind == _wire.KEEP:
            (retry,) = _wire.FLOAT.unpack_from(body, 0)
            self._idle_asking = False
            self._next_ask = time.monotonic() + retry if retry >= 0 else math.inf
        elif kind == _wire.SHUTDOWN:
            code = ExitCode.IDLE if self._idle_asking else ExitCode.STOPPED
            if self.single_use and self._served:
                # the parent retires a single-use runner after its call, and that SHUTDOWN may
                # overtake the runner's own end of the call: same reason, same exit code
                code = ExitCode.SINGLE_USE
            self.loop.create_task(self._drain(code, cancel_linked=False))
        else:
            raise _wire.ProtocolError(f"unexpected message kind {kind} from the parent")

    def on_close(self, reason: str) -> None:
        if self.done.done() or self._draining:
            return
        self.loop.create_task(self._drain(ExitCode.PARENT_LOST, cancel_linked=True))
        _say(f"flame runner {self.info.runner_id}: parent lost ({reason})")

    # -- replies (worker threads) ---------------------------------------------------------------
    def _reply(self, kind: int, call_id: int, what: str, outcome: Outcome) -> None:
        status, parts = _encode_outcome(outcome, what)
        conn = self.conn
        if conn is None or conn.closed:
            return
        try:
            conn.send(kind, [_wire.RESULT_HEAD.pack(call_id, status), *parts])
        except ConnectionError:
            pass

    # -- terminator (control loop) ----------------------------------------------------------------
    def _on_change(self) -> None:
        """The executor went from idle to busy (any thread), or, when asked to tell, from busy
        to idle (control loop)."""
        if self.executor.busy:
            self._next_ask = 0.0  # busy again: a KEEP's "ask later" no longer holds
            return
        if self._draining:
            if not self.done.done():
                self.done.set_result(self._drain_code)
            return
        if self.single_use and self._served:
            self._goodbye(ExitCode.SINGLE_USE)
            if not self.done.done():
                self.done.set_result(ExitCode.SINGLE_USE)

    def start_ticking(self) -> None:
        self.executor.notify_idle = self.single_use
        self._tick_handle = self.loop.call_later(_TICK, self._tick)

    def _tick(self) -> None:
        """Periodic duties: call deadlines (the runner's backstop) and idle shutdown."""
        if self.done.done():
            return
        now = time.monotonic()
        self.executor.sweep(now)
        if (
            self.idle_after is not None
            and not self.executor.busy
            and not self._draining
            and not self._idle_asking
            and not self._checking
            and now >= max(self.executor.idle_since + self.idle_after, self._next_ask)
        ):
            self._idle_fired()
        self._tick_handle = self.loop.call_later(_TICK, self._tick)

    def _idle_fired(self) -> None:
        check = self.idle_check
        if check is None:
            self._ask_idle()
            return

        def run_check() -> None:
            try:
                ok = bool(check())
            except Exception as exc:
                _say(f"flame runner: idle check raised {exc!r}")
                ok = False
            self.loop.call_soon_threadsafe(self._check_done, ok)

        self._checking = True
        self.executor.spawn(run_check)

    def _check_done(self, ok: bool) -> None:
        self._checking = False
        if self.executor.busy or self._draining:
            return
        if ok:
            self._ask_idle()
        elif self.idle_after is not None:
            self._next_ask = time.monotonic() + self.idle_after

    def _ask_idle(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self._idle_asking = True
            self.conn.send_soon(_wire.IDLE)

    def _on_stuck(self, call_id: int) -> None:
        self._goodbye(ExitCode.STUCK)
        if not self.done.done():
            self.done.set_result(ExitCode.STUCK)
        _say(
            f"flame runner {self.info.runner_id}: call {call_id} did not stop after being "
            "cancelled; exiting"
        )

    def _goodbye(self, code: ExitCode) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.send_soon(_wire.GOODBYE, [_wire.BYTE.pack(int(code))])

    _drain_code = ExitCode.STOPPED

    async def _drain(self, code: ExitCode, *, cancel_linked: bool) -> None:
        if self._draining:
            return
        self._draining = True
        self._drain_code = code
        self.executor.notify_idle = True
        if cancel_linked:
            self.executor.cancel_linked()
        if not self.executor.busy:
            if not self.done.done():
                self.done.set_result(code)
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.done), self.shutdown_timeout)
        except TimeoutError:
            self.executor.cancel_all()
            try:
                await asyncio.wait_for(asyncio.shield(self.done), self.executor.cancel_grace)
            except TimeoutError:
                pass
            if not self.done.done():
                self.done.set_result(code)


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


async def serve(info: LaunchInfo, started: float, on_connected: Any) -> int:
    deadline = started + info.failsafe
    try:
        sock = await _secure(await _dial(info, deadline), info)
        conn, q, config = await handshake(sock, info)
    except _Exit as exc:
        _say(f"flame runner {info.runner_id}: {exc}")
        return int(exc.code)
    on_connected()
    session = RunnerSession(info, config)
    conn.max_frame = config.max_frame
    conn.on_frame = session.on_frame
    conn.on_close = session.on_close
    session.conn = conn
    for kind, body in q.later:
        session.on_frame(kind, body)
    conn.start_heartbeats(config.heartbeat_interval, config.heartbeat_timeout)
    session.start_ticking()
    conn.read_in_threads()
    session._start_watch(conn)
    session.executor.spawn(session.lead)
    code = await session.done
    session._stop_watch()
    if not conn.closed:
        # let queued frames (results, GOODBYE) leave before hanging up
        await asyncio.sleep(0)
        conn.close("runner exiting")
    return int(code)
