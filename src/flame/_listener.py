"""The listener runners dial, and the parent's half of the handshake.

``Listener``: one per bind address (and TLS setting) and process, on the background loop.
It accepts connections, runs the parent's half of the handshake (``flame._wire``) for the
runner ids it was told to expect, and hands each authenticated connection to the runner
that booted it, as a ``flame._remote.WireLink``. Connections that do not authenticate within
the handshake timeout are closed; nothing they sent is ever unpickled. An in-process runner
(``LocalBackend``) arrives through :meth:`Listener.arrive_in_process` instead, proving the
same secret, and gets the same configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

from . import _tls, _wire
from ._errors import BootError
from ._loop import get_loop
from ._remote import WireLink
from ._wire import RunnerConfig

_PREAUTH_SCRATCH = 8192


class Expected:
    """A runner being booted: what it must prove, and what it is told once it has."""

    __slots__ = ("config", "extra", "future", "idle_check", "secret")

    def __init__(
        self,
        secret: bytes,
        config: RunnerConfig,
        idle_check: Callable[[], Any] | None,
        extra: bytes,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.secret = secret
        self.config = config
        self.idle_check = idle_check
        self.extra = extra  # the pickled CONFIG body: {"idle_check": ...}
        #: resolved with the runner's link once it has authenticated (loop thread)
        self.future: asyncio.Future[Any] = loop.create_future()


class Listener:
    """Accepts runner connections on one address; authenticates them for their runners."""

    _instances: dict[tuple[int, str, bool], Listener] = {}

    @classmethod
    def get(cls, host: str, tls: bool = False) -> Listener:
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
        self.expected: dict[str, Expected] = {}
        self.handshakes = 0  # connections currently in the handshake (for tests)
        loop.call_soon_threadsafe(loop.add_reader, sock.fileno(), self._accept)

    def expect(
        self,
        runner_id: str,
        secret: bytes,
        config: RunnerConfig,
        idle_check: Callable[[], Any] | None,
        extra: bytes,
    ) -> asyncio.Future[Any]:
        """Expect ``runner_id``: the future resolves with its link once it authenticated."""
        exp = Expected(secret, config, idle_check, extra, self.loop)
        self.expected[runner_id] = exp
        return exp.future

    @classmethod
    def at(cls, port: int) -> Listener | None:
        """This process's listener on ``port``, if any."""
        for (pid, _host, _tls_on), inst in cls._instances.items():
            if pid == os.getpid() and inst.port == port:
                return inst
        return None

    def arrive_in_process(self, runner_id: str, secret: bytes) -> Expected:
        """An in-process runner dials: it must be expected, and prove the same secret.
        Returns what the parent expects of it (loop thread); the caller resolves
        ``future`` with the runner's link."""
        exp = self.expected.get(runner_id)
        if exp is None or exp.future.done() or not hmac.compare_digest(exp.secret, secret):
            raise _wire.ProtocolError(f"runner {runner_id!r} is not expected here")
        del self.expected[runner_id]
        return exp

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
        exp.future.set_result(WireLink(conn, q))
