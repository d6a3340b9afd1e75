"""The small HTTP server the API emulators of ``flame.testing`` stand on.

It owns what every emulator needs of a server and nothing of any API: a threaded stdlib
server on 127.0.0.1 (a free port), serving in a daemon thread; every request of every
method handed to one ``serve(handler, method)`` callable; the live client connections, so
that an emulator can drop them all (to inject a lost answer) and close promptly; and quiet
logs (requests carry bearer tokens, and clients that hang up are not errors).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Serve = Callable[["Handler", str], None]


class Handler(BaseHTTPRequestHandler):
    """One client connection (HTTP/1.1 keep-alive): each request goes to the server's
    ``serve``; a few helpers write answers."""

    protocol_version = "HTTP/1.1"
    timeout = 120
    server: EmulatorServer
    #: whether the current request has been answered (one handler serves a whole
    #: keep-alive connection: reset by :meth:`_dispatch` before each request)
    responded = False

    def setup(self) -> None:
        super().setup()
        # An answer is written as headers, then body: without TCP_NODELAY the body waits
        # for the client's delayed ACK of the headers (about 40 ms a request on Linux).
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: emulators record requests, they never print them (bearer tokens)."""

    def _dispatch(self, method: str) -> None:
        self.responded = False
        self.server.serve(self, method)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- answers -------------------------------------------------------------------------
    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_body(
        self,
        code: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.responded = True
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, code: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self.send_body(code, json.dumps(doc).encode(), "application/json", headers)

    def send_text(self, code: int, text: str) -> None:
        self.send_body(code, text.encode(), "text/plain")

    def hang_up(self) -> None:
        """Drop the connection without an answer (a lost response)."""
        self.responded = True
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def start_stream(self, content_type: str = "application/json") -> None:
        self.responded = True
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class EmulatorServer(ThreadingHTTPServer):
    """Serves ``serve`` on 127.0.0.1 in a daemon thread, from :meth:`start` to :meth:`close`."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, serve: Serve, name: str, port: int = 0) -> None:
        self.serve = serve
        self._name = name
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__(("127.0.0.1", port), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=self._name, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, drop every client connection, release the port."""
        self.shutdown()
        self.drop_connections()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet about clients that went away mid-request; loud about anything else."""
        if not isinstance(sys.exc_info()[1], OSError | ValueError):
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self._connections_lock:
            live = list(self._connections)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
