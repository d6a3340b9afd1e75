"""The parent side of one runner, and the listener runners dial.

``Listener``: one per bind address and process, on the background loop. It accepts
connections, runs the parent's half of the handshake (``flame._wire``) for runner ids it is
expecting, and hands an authenticated connection to the ``RemoteRunner`` that booted it.
Connections that do not authenticate within the handshake timeout are closed; nothing they
sent is ever unpickled.

``RemoteRunner``: boots one runner through a backend (bounded by ``boot_timeout``, racing
the backend's report of an early death), then holds its connection: calls in flight, results
coming back, idle requests, and the runner's end. ``LocalRunner``: the same contract, with the
work run in this process (``LocalBackend``).

``Pending``: one call in flight. Caller threads block on it, asyncio callers await it; the
loop thread (or a local worker) resolves it exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import os
import secrets
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _redact, _serialize, _tls, _wire
from ._child._executor import Executor, Outcome
from ._errors import (
    BootError,
    CallTimeout,
    PoolClosed,
    RemoteError,
    RemoteTraceback,
    RunnerLost,
    SerializationError,
)
from ._exits import ExitCode, describe_exit
from ._parent import LaunchInfo
from ._settings import RunnerConfig, settings
from .backends._base import Backend, RunnerHandle, RunnerLaunch

if TYPE_CHECKING:
    from ._pool import Pool

_resolve_lock = threading.Lock()
_PREAUTH_SCRATCH = 8192


# -- one call in flight -------------------------------------------------------------------------
class Pending:
    """A call in flight, resolved once with ``(status, payload)`` from any thread."""

    __slots__ = (
        "_event",
        "_fut",
        "_loop",
        "abandoned",
        "call_id",
        "done",
        "kind",
        "payload",
        "runner",
        "status",
    )

    def __init__(
        self,
        runner: BaseRunner,
        loop: asyncio.AbstractEventLoop | None = None,
        kind: str = "call",
    ) -> None:
        self.runner = runner
        self.kind = kind  # "call" (holds a slot), "place" (a child's slot), "child_call"
        self.call_id = 0
        self.done = False
        self.abandoned = False
        self.status = -1
        self.payload: Any = None
        self._loop = loop
        self._fut: asyncio.Future[None] | None = loop.create_future() if loop else None
        self._event: threading.Lock | None = None
        if loop is None:
            self._event = threading.Lock()
            self._event.acquire()

    def resolve(self, status: int, payload: Any, wakes: Wakes | None = None) -> None:
        """Deliver the outcome. The slot bookkeeping (``settle``) is left to the caller, off
        the loop thread, unless the caller has already stopped waiting. With ``wakes``, an
        asyncio caller's wake-up is collected there, for :func:`wake_all` to send in one go
        with the others of the same batch of frames."""
        with _resolve_lock:
            if self.done:
                return
            self.done = True
            self.status, self.payload = status, payload
            abandoned = self.abandoned
        if abandoned:
            self.settle()
            return
        if self._event is not None:
            self._event.release()
        elif self._fut is not None and self._loop is not None:
            if wakes is not None:
                wakes.setdefault(self._loop, []).append(self._fut)
                return
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                self._loop.call_soon_threadsafe(_set_none, self._fut)

    def abandon(self) -> bool:
        """The caller stops waiting. Returns True if the outcome is already there (then the
        caller still owns it, and must ``settle`` it)."""
        with _resolve_lock:
            if self.done:
                return True
            self.abandoned = True
            return False

    def settle(self) -> None:
        """Give back the slot the finished call held (a placed child keeps its own)."""
        if self.status == LOST or self.kind == "child_call":
            return
        ok = self.status == _wire.STATUS_OK or (
            self.status == DIRECT and self.payload[0] == _wire.STATUS_OK
        )
        runner = self.runner
        if self.kind == "call" or not ok:
            runner.children.pop(self.call_id, None)
            runner.pool._release(runner)

    def wait(self, timeout: float | None) -> bool:
        assert self._event is not None
        return self._event.acquire(timeout=-1 if timeout is None else max(timeout, 0))

    async def wait_async(self, timeout: float | None) -> bool:
        assert self._fut is not None
        if not self._fut.done():
            try:
                async with asyncio.timeout(timeout):
                    await self._fut
            except TimeoutError:
                return self.done
        return True


def _set_none(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


Wakes = dict[asyncio.AbstractEventLoop, list["asyncio.Future[None]"]]


def wake_all(wakes: Wakes) -> None:
    """Wake the asyncio callers collected by :meth:`Pending.resolve`: one wake-up per loop."""
    for loop, futs in wakes.items():
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone
            loop.call_soon_threadsafe(_set_all, futs)


def _set_all(futs: list[asyncio.Future[None]]) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(None)


LOST = -1  # Pending status: the runner went away; payload is the RunnerLost message
DIRECT = -2  # Pending status: an in-process outcome, not serialized; payload is the Outcome


def decode(pending: Pending) -> Any:
    """Turn a resolved call into its value, or raise what the caller must see."""
    status, payload = pending.status, pending.payload
    if status == DIRECT:
        status, value = payload
        if status == _wire.STATUS_OK:
            return value
        if status == _wire.STATUS_RAISED:
            exc, tb = value
            if tb:
                exc.__cause__ = RemoteTraceback(tb)
            raise exc
        payload = value
    elif status == LOST:
        raise RunnerLost(payload)
    else:
        data, bufs = _wire.split_section(payload) if isinstance(payload, memoryview) else payload
        if status == _wire.STATUS_OK:
            try:
                return _serialize.loads(data, bufs)
            except Exception as exc:
                raise SerializationError(
                    f"cannot unpickle the result in the caller: {type(exc).__name__}: {exc}"
                ) from exc
        payload = _serialize.loads(data, bufs)
        if status == _wire.STATUS_RAISED:
            raise _remote_exception(*payload)
    if status == _wire.STATUS_TIMEOUT:
        raise CallTimeout(str(payload))
    # the runner was shut down (pool stopped) and the call outlived its shutdown_timeout
    raise PoolClosed(
        f"the call was cancelled on its runner ({payload}): the runner was shut down and the "
        "call did not finish within the pool's shutdown_timeout"
    )


def _remote_exception(blob: bytes | None, type_name: str, message: str, tb: str) -> BaseException:
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = _serialize.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, tb)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


# -- the listener -------------------------------------------------------------------------------
class _Expected:
    __slots__ = ("config", "extra", "future", "secret")

    def __init__(self, secret: bytes, config: RunnerConfig, extra: bytes, loop: Any) -> None:
        self.secret = secret
        self.config = config
        self.extra = extra
        self.future: asyncio.Future[tuple[_wire.Connection, _wire.FrameQueue]] = (
            loop.create_future()
        )


class Listener:
    """Accepts runner connections on one address; authenticates them for their runners."""

    _instances: dict[tuple[int, str, bool], Listener] = {}

    @classmethod
    def get(cls, host: str, tls: bool = False) -> Listener:
        from ._loop import get_loop

        key = (os.getpid(), host, tls)
        inst = cls._instances.get(key)
        if inst is None:
            inst = cls._instances[key] = Listener(get_loop(), host, tls)
        return inst

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, tls: bool = False) -> None:
        self.loop = loop
        self.host = host
        #: TLS: the server context, and the certificate fingerprint runners pin
        self.tls: tuple[ssl.SSLContext, str] | None = _tls.server_context() if tls else None
        if ":" in host:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(512)
        sock.setblocking(False)
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.expected: dict[str, _Expected] = {}
        self.handshakes = 0  # connections currently in the handshake (for tests)
        loop.call_soon_threadsafe(loop.add_reader, sock.fileno(), self._accept)

    def expect(
        self, runner_id: str, secret: bytes, config: RunnerConfig, extra: bytes
    ) -> asyncio.Future[tuple[_wire.Connection, _wire.FrameQueue]]:
        exp = _Expected(secret, config, extra, self.loop)
        self.expected[runner_id] = exp
        return exp.future

    def forget(self, runner_id: str) -> None:
        self.expected.pop(runner_id, None)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn_sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.loop.create_task(self._handshake(conn_sock))

    async def _handshake(self, sock: socket.socket) -> None:
        self.handshakes += 1
        conn: _wire.Connection | None = None
        try:
            async with asyncio.timeout(_wire.HANDSHAKE_TIMEOUT):
                if self.tls is not None:  # closes the socket itself if it fails
                    sock.setblocking(False)
                    sock = await _tls.handshake(
                        sock, self.tls[0], server_side=True, timeout=_wire.HANDSHAKE_TIMEOUT
                    )
                q = _wire.FrameQueue()
                conn = _wire.Connection(
                    sock,
                    self.loop,
                    on_frame=q.on_frame,
                    on_close=q.on_close,
                    scratch=_PREAUTH_SCRATCH,
                )
                hello = await q.get(_wire.HELLO)
                runner_id = str(hello.get("id", ""))
                exp = self.expected.get(runner_id)
                if exp is None:
                    raise _wire.ProtocolError("unknown runner id")
                nonce_r = bytes.fromhex(str(hello.get("nonce", "")))
                if len(nonce_r) != _wire.NONCE_BYTES:
                    raise _wire.ProtocolError("bad nonce")
                nonce_p = _wire.new_nonce()
                conn.send_soon(
                    _wire.CHALLENGE,
                    [
                        _wire.json_body(
                            {
                                "nonce": nonce_p.hex(),
                                "proof": _wire.proof(exp.secret, b"P", nonce_r, nonce_p),
                            }
                        )
                    ],
                )
                answer = await q.get(_wire.PROOF)
                expected_proof = _wire.proof(exp.secret, b"R", nonce_p, nonce_r)
                given = str(answer.get("proof", "")).encode()  # str: ASCII only; bytes: any
                if not hmac.compare_digest(expected_proof.encode(), given):
                    raise _wire.ProtocolError("bad proof")
        except Exception:  # whatever the peer sent, a failed handshake closes the connection
            if conn is not None:
                conn.close("handshake failed")
            return
        finally:
            self.handshakes -= 1
        # authenticated from here on
        if self.expected.get(runner_id) is not exp or exp.future.done():
            conn.close("runner already connected")
            return
        del self.expected[runner_id]
        theirs = answer.get("versions") if isinstance(answer.get("versions"), dict) else {}
        mismatch = _wire.versions_mismatch(_wire.local_versions(), theirs or {})
        if mismatch:
            conn.send_soon(_wire.REFUSE, [_wire.json_body({"reason": mismatch})])
            conn.close("version mismatch")
            exp.future.set_exception(BootError(mismatch))
            return
        q.welcomed = True
        conn.send_soon(
            _wire.WELCOME,
            [_wire.json_body({"config": exp.config.to_json(), "versions": _wire.local_versions()})],
        )
        conn.send_soon(_wire.CONFIG, [*_wire.section_parts(exp.extra, [])])
        conn.enlarge()
        exp.future.set_result((conn, q))


# -- runners ------------------------------------------------------------------------------------
class BaseRunner:
    """What the pool needs of one runner, remote or in-process."""

    def __init__(self, pool: Pool, rid: int) -> None:
        self.pool = pool
        self.rid = rid
        self.runner_id = f"{pool.name}-{rid}-{secrets.token_hex(3)}"
        self.pending: dict[int, Pending] = {}
        self.children: dict[int, Any] = {}
        self.gone = False
        self._ids = 0
        self._ids_lock = threading.Lock()

    def next_id(self) -> int:
        with self._ids_lock:
            self._ids += 1
            return self._ids

    def describe(self) -> str:
        return f"runner {self.runner_id!r}"

    async def boot(self) -> None:
        raise NotImplementedError

    def send_call(
        self,
        call_id: int,
        flags: int,
        timeout: float | None,
        fn: Any,
        args: tuple[Any, ...],
        section: tuple[bytes, list[memoryview]] | None,
    ) -> None:
        raise NotImplementedError

    def send_child_call(
        self,
        call_id: int,
        child_id: int,
        timeout: float | None,
        method: str,
        args: tuple[Any, ...],
        section: tuple[bytes, list[memoryview]] | None,
    ) -> None:
        raise NotImplementedError

    def cancel(self, call_id: int) -> None:
        raise NotImplementedError

    def stop_child(self, child_id: int) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Ask the runner to finish in-flight work and exit."""
        raise NotImplementedError

    def keep(self, retry_after: float) -> None:
        raise NotImplementedError

    async def kill(self) -> None:
        """Force the runner down and release what the backend holds for it."""
        raise NotImplementedError

    def fail_all(self, message: str) -> None:
        for call_id, p in list(self.pending.items()):
            self.pending.pop(call_id, None)
            p.resolve(LOST, message)
        for child in list(self.children.values()):
            child._ended(LOST, message)
        self.children.clear()


class RemoteRunner(BaseRunner):
    def __init__(self, pool: Pool, rid: int, backend: Backend) -> None:
        super().__init__(pool, rid)
        self.backend = backend
        self.handle: RunnerHandle | None = None
        self.conn: _wire.Connection | None = None
        self.goodbye: int | None = None
        self.exit_text: str | None = None
        self._handle_wait: asyncio.Task[str] | None = None

    def describe(self) -> str:
        extra = f" ({self.handle.id})" if self.handle is not None else ""
        return f"runner {self.runner_id!r}{extra}"

    async def boot(self) -> None:
        pool = self.pool
        listener = Listener.get(self.backend.listen_host(), pool.tls)
        secret = os.urandom(32)
        info = LaunchInfo(
            runner_id=self.runner_id,
            secret=secret,
            addresses=tuple((h, listener.port) for h in self.backend.advertise_hosts()),
            pool=pool.name,
            backend=self.backend.name,
            app=_app_spec(self.backend),
            sys_path=_opt_tuple(self.backend.runner_sys_path()),
            cwd=self.backend.runner_cwd(),
            failsafe=settings.failsafe_timeout,
            tls_fingerprint=listener.tls[1] if listener.tls is not None else None,
        )
        extra, _ = _serialize.dumps({"idle_check": pool._idle_check})
        config = pool.runner_config()
        connected = listener.expect(self.runner_id, secret, config, extra)
        encoded = info.encode()
        # never shown, even if a platform echoes the request in an error (Kubernetes keeps
        # Secret data base64-encoded once more)
        _redact.hide(self, encoded, base64.b64encode(encoded.encode()).decode(), secret.hex())
        launch = RunnerLaunch(
            runner_id=self.runner_id,
            pool=pool.name,
            env={"FLAME_PARENT": encoded},
            argv=("python", "-m", "flame", "runner"),
        )
        deadline = time.monotonic() + (pool.boot_timeout or 1e9)
        try:
            try:
                async with asyncio.timeout(pool.boot_timeout):
                    self.handle = await self.backend.boot(launch)
            except TimeoutError:
                raise BootError(
                    f"backend {self.backend.name!r} did not start a runner within "
                    f"boot_timeout={pool.boot_timeout:g}s"
                ) from None
            except BootError:
                raise
            except Exception as exc:
                raise BootError(
                    f"backend {self.backend.name!r} failed to start a runner: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self._handle_wait = asyncio.ensure_future(self.handle.wait())
            remaining = max(0.0, deadline - time.monotonic())
            racers: set[asyncio.Future[Any]] = {connected, self._handle_wait}
            done, _ = await asyncio.wait(
                racers,
                timeout=remaining,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if connected in done:
                conn, q = connected.result()  # raises BootError on a version mismatch
            elif self._handle_wait in done:
                text = self._handle_wait.result()
                raise BootError(
                    f"{self.describe()} {text} before connecting to its parent" + _diag(self.handle)
                )
            else:
                raise BootError(
                    f"{self.describe()} did not connect within "
                    f"boot_timeout={pool.boot_timeout:g}s" + _diag(self.handle)
                )
        except BaseException:
            listener.forget(self.runner_id)
            if not connected.done():
                connected.cancel()
            await self.kill()
            raise
        self.conn = conn
        conn.on_frame = self._on_frame
        conn.on_close = self._on_close
        conn.max_frame = config.max_frame
        for kind, body in q.later:
            self._on_frame(kind, body)
        conn.start_heartbeats(config.heartbeat_interval, config.heartbeat_timeout)
        conn.read_in_threads()
        threading.Thread(
            target=self._read_loop, args=(conn,), name=f"flame-reader-{self.rid}", daemon=True
        ).start()

    # -- frames from the runner ------------------------------------------------------------------
    def _read_loop(self, conn: _wire.Connection) -> None:
        """The connection's reader thread: results go straight to their callers; the rest
        is handled on the pool's loop."""
        loop = self.pool._loop
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
                        self._result(call_id, status, body[_wire.RESULT_HEAD.size :], wakes)
                    elif kind != _wire.PING:
                        rest.append((kind, body))
                if wakes:
                    wake_all(wakes)
                if rest:
                    loop.call_soon_threadsafe(conn.deliver, rest, self._on_frame)
        except RuntimeError:  # the loop is closed: the process is ending
            return
        finally:
            conn.reader_done()

    def _on_frame(self, kind: int, body: memoryview) -> None:
        if kind == _wire.RESULT:
            call_id, status = _wire.RESULT_HEAD.unpack_from(body, 0)
            self._result(call_id, status, body[_wire.RESULT_HEAD.size :])
        elif kind == _wire.CHILD_EXIT:
            child_id, status = _wire.RESULT_HEAD.unpack_from(body, 0)
            child = self.children.pop(child_id, None)
            if child is not None:
                child._ended(status, body[_wire.RESULT_HEAD.size :])
                self.pool._release(self)
        elif kind == _wire.IDLE:
            self.pool._idle_request(self)
        elif kind == _wire.GOODBYE:
            (self.goodbye,) = _wire.BYTE.unpack_from(body, 0)
        elif kind == _wire.PING:
            pass
        else:
            raise _wire.ProtocolError(f"unexpected message kind {kind} from a runner")

    def _result(self, call_id: int, status: int, payload: Any, wakes: Wakes | None = None) -> None:
        p = self.pending.pop(call_id, None)
        if p is not None:
            p.resolve(status, payload, wakes)

    def _on_close(self, reason: str) -> None:
        self.pool._loop.create_task(self._lost(reason))

    async def _lost(self, reason: str) -> None:
        if self.gone:
            return
        # the connection closed: the process is likely exiting; give the backend a moment to
        # report its exit status, for a useful message. Heartbeats stopped: the runner is
        # frozen or cut off, and no status is coming soon; fail its calls now.
        if (
            self._handle_wait is not None
            and not self._handle_wait.done()
            and not reason.startswith("no heartbeat")
        ):
            await asyncio.wait({self._handle_wait}, timeout=1.0)
        if self._handle_wait is not None and self._handle_wait.done():
            with contextlib.suppress(BaseException):
                self.exit_text = self._handle_wait.result()
        if self.exit_text is None and self.goodbye is not None:
            self.exit_text = describe_exit(self.goodbye)
        why = self.exit_text or reason
        message = f"{self.describe()} was lost: {why}"
        if self.exit_text and reason and "closed by peer" not in reason:
            message += f" ({reason})"
        if self.goodbye == ExitCode.STUCK:
            message += "; a call on it did not stop after its deadline, so the runner exited"
        self.gone = True
        self.fail_all(message)
        await self.pool._runner_gone(self, message)

    # -- sending (caller threads) ----------------------------------------------------------------
    def _send(self, kind: int, parts: list[bytes | memoryview]) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            raise RunnerLost(f"{self.describe()} is gone ({conn.close_reason if conn else ''})")
        try:
            conn.send(kind, parts)
        except ConnectionError as exc:
            raise RunnerLost(f"{self.describe()} was lost while sending a call: {exc}") from None

    def send_call(
        self,
        call_id: int,
        flags: int,
        timeout: float | None,
        fn: Any,
        args: tuple[Any, ...],
        section: tuple[bytes, list[memoryview]] | None,
    ) -> None:
        assert section is not None
        head = _wire.CALL_HEAD.pack(call_id, flags, -1.0 if timeout is None else timeout)
        self._send(_wire.CALL, [head, *_wire.section_parts(*section)])

    def send_child_call(
        self,
        call_id: int,
        child_id: int,
        timeout: float | None,
        method: str,
        args: tuple[Any, ...],
        section: tuple[bytes, list[memoryview]] | None,
    ) -> None:
        assert section is not None
        head = _wire.CHILD_CALL_HEAD.pack(call_id, child_id, -1.0 if timeout is None else timeout)
        self._send(_wire.CHILD_CALL, [head, *_wire.section_parts(*section)])

    def cancel(self, call_id: int) -> None:
        if self.conn is not None:
            self.conn.send_soon(_wire.CANCEL, [_wire.ID_HEAD.pack(call_id)])

    def stop_child(self, child_id: int) -> None:
        if self.conn is not None:
            self.conn.send_soon(_wire.CHILD_STOP, [_wire.ID_HEAD.pack(child_id)])

    def shutdown(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.send_soon(_wire.SHUTDOWN)
        else:
            self.pool._loop.call_soon_threadsafe(
                lambda: self.pool._loop.create_task(self._lost("shut down before connecting"))
            )

    def keep(self, retry_after: float) -> None:
        if self.conn is not None:
            self.conn.send_soon(_wire.KEEP, [_wire.FLOAT.pack(retry_after)])

    async def kill(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close("stopped by the pool")
        if self.handle is not None:
            try:
                await self.handle.stop()
            except Exception as exc:
                self.pool._log_error(f"backend failed to stop {self.describe()}: {exc!r}")
        if self._handle_wait is not None and not self._handle_wait.done():
            self._handle_wait.cancel()
        _redact.forget(self)


def _diag(handle: RunnerHandle | None) -> str:
    if handle is None:
        return ""
    text = handle.diagnostics()
    return f"\n--- runner output (last lines) ---\n{text}" if text else ""


def _opt_tuple(v: Any) -> tuple[str, ...] | None:
    return tuple(v) if v is not None else None


def _app_spec(backend: Backend) -> dict[str, str] | None:
    explicit = backend.runner_app()
    if explicit is not None:
        return dict(explicit)
    main = sys.modules.get("__main__")
    if main is None:
        return None
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if name and name not in ("__main__", "flame.__main__"):
        return {"main_module": name}
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and not name:
        return {"main_path": os.path.abspath(path)}
    return None


class LocalRunner(BaseRunner):
    """Runs calls in this process, through the same pool rules (``LocalBackend``)."""

    def __init__(self, pool: Pool, rid: int, serialize: bool) -> None:
        super().__init__(pool, rid)
        self.serialize = serialize
        self.loop = pool._loop
        self.executor: Executor | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._served = 0
        self._asking = False
        self._stopping = False
        self._child_objs: dict[int, Any] = {}

    def describe(self) -> str:
        return f"local runner {self.runner_id!r}"

    async def boot(self) -> None:
        self.executor = Executor(
            self.loop,
            on_change=self._on_change,
            on_stuck=self._on_stuck,
            cancel_grace=settings.cancel_grace,
        )
        self.executor.notify_idle = True  # local runners keep their idle timer event-driven
        self._on_change()

    def _loader(
        self, fn: Any, args: tuple[Any, ...], section: tuple[bytes, list[memoryview]] | None
    ) -> Callable[[], tuple[Any, tuple[Any, ...]]]:
        if section is None:
            return lambda: (fn, args)
        data, bufs = section
        # copy the buffers as a real transport would, so that mutations do not leak back
        copies = [memoryview(bytearray(b)) for b in bufs]
        return lambda: _serialize.loads(data, copies)

    def _done(self, call_id: int, kind: int) -> Callable[[Outcome], None]:
        def done(outcome: Outcome) -> None:
            if self.serialize:
                from ._child._runtime import _encode_outcome

                status, parts = _encode_outcome(outcome, "result")
                body = memoryview(b"".join(bytes(p) for p in parts))
                self.loop.call_soon_threadsafe(self._deliver, kind, call_id, status, body)
            else:
                self.loop.call_soon_threadsafe(self._deliver, kind, call_id, DIRECT, outcome)

        return done

    def _deliver(self, kind: int, call_id: int, status: int, payload: Any) -> None:
        if kind == _wire.CHILD_EXIT:
            child = self.children.pop(call_id, None)
            if child is not None:
                child._ended(status, payload)
                self.pool._release(self)
            return
        p = self.pending.pop(call_id, None)
        if p is not None:
            p.resolve(status, payload)

    def send_call(
        self,
        call_id: int,
        flags: int,
        timeout: float | None,
        fn: Any,
        args: tuple[Any, ...],
        section: tuple[bytes, list[memoryview]] | None,
    ) -> None:
        if self.gone or self.executor is None:
            raise RunnerLost(f"{self.describe()} is gone")
        ex = self.executor
        load = self._loader(fn, args, section)
        link = bool(flags & _wire.FLAG_LINK)
        self._served += 1
        if flags & _wire.FLAG_CHILD:
            self.loop.call_soon_threadsafe(
                lambda: ex.place_child(
                    call_id,
                    load,
                    link=link,
                    on_built=self._done(call_id, _wire.RESULT),
                    on_exit=self._done(call_id, _wire.CHILD_EXIT),
                )
            )
        else:
            self.loop.call_soon_threadsafe(
                lambda: ex.start_call(
                    call_id,
                    load,
                    timeout=timeout,
                    link=link,
                    on_done=self._done(call_id, _wire.RESULT),
                )
            )

    def send_child_call(
        self,
        call_id: int,
        child_id: int,
        timeout: float | None,
        method: str,
        args: tuple[Any, ...],
        section: tuple[bytes, list[memoryview]] | None,
    ) -> None:
        if self.gone or self.executor is None:
            raise RunnerLost(f"{self.describe()} is gone")
        ex = self.executor
        load = self._loader(method, args, section)
        self.loop.call_soon_threadsafe(
            lambda: ex.child_call(
                call_id, child_id, load, timeout=timeout, on_done=self._done(call_id, _wire.RESULT)
            )
        )

    def cancel(self, call_id: int) -> None:
        if self.executor is not None:
            self.loop.call_soon_threadsafe(self.executor.cancel, call_id)

    def stop_child(self, child_id: int) -> None:
        if self.executor is not None:
            self.loop.call_soon_threadsafe(self.executor.stop_child, child_id)

    # -- a local terminator: idle, single use, shutdown ------------------------------------------
    def _on_change(self) -> None:
        ex = self.executor
        if ex is None or self.gone:
            return
        if ex.busy:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            return
        if self._stopping:
            self.loop.create_task(self._end("stopped"))
            return
        if self.pool.single_use and self._served:
            return  # the pool retires it
        after = self.pool._runner_idle_after()
        if after is not None and self._idle is None and not self._asking:
            self._idle = self.loop.call_later(after, self._idle_fired)

    def _idle_fired(self) -> None:
        self._idle = None
        ex = self.executor
        if ex is None or ex.busy or self._stopping or self.gone:
            return
        check = self.pool._idle_check

        def run_check() -> None:
            try:
                ok = True if check is None else bool(check())
            except Exception:
                ok = False
            self.loop.call_soon_threadsafe(self._check_done, ok)

        ex.spawn(run_check)

    def _check_done(self, ok: bool) -> None:
        if self.executor is None or self.executor.busy or self._stopping:
            return
        if ok:
            self._asking = True
            self.pool._idle_request(self)
        else:
            self._on_change()

    def keep(self, retry_after: float) -> None:
        def apply() -> None:
            self._asking = False
            if retry_after >= 0:
                self._idle = self.loop.call_later(retry_after, self._idle_fired)

        self.loop.call_soon_threadsafe(apply)

    def shutdown(self) -> None:
        def apply() -> None:
            self._stopping = True
            ex = self.executor
            if ex is None or not ex.busy:
                self.loop.create_task(self._end("stopped"))
                return
            timeout = self.pool.shutdown_timeout
            if timeout is not None:
                self.loop.call_later(timeout, self._drain_expired)

        self.loop.call_soon_threadsafe(apply)

    def _drain_expired(self) -> None:
        if self.executor is not None and self.executor.busy and not self.gone:
            self.executor.cancel_all()

    def _on_stuck(self, call_id: int) -> None:
        self.loop.create_task(
            self._end("a cancelled call did not stop within the grace period", lost=True)
        )

    async def _end(self, why: str, lost: bool = False) -> None:
        if self.gone:
            return
        self.gone = True
        if self._idle is not None:
            self._idle.cancel()
        message = f"{self.describe()} was lost: {why}"
        self.fail_all(message)
        await self.pool._runner_gone(self, message)

    async def kill(self) -> None:
        if self.executor is not None:
            self.executor.cancel_all()
        await self._end("stopped by the pool")


def make_runner(pool: Pool, rid: int, backend: Backend) -> BaseRunner:
    if backend.in_process:
        return LocalRunner(pool, rid, bool(getattr(backend, "serialize", False)))
    return RemoteRunner(pool, rid, backend)
