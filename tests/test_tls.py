"""TLS for the runner connections (``Pool(tls=True)``), over real processes and sockets.

* calls, large payloads both ways, ``acall`` and ``map`` work over TLS;
* an eavesdropper on the wire (a TCP proxy that records every byte) sees the call's
  argument and result in clear text without TLS, and neither with it;
* a runner that was handed another certificate fingerprint refuses the parent: the boot
  fails with a ``BootError`` that says why, and no call runs;
* a client that speaks plain frames (or garbage) to a TLS listener is dropped, and the
  pool's runners keep being served;
* ``tls`` must be a bool, and without the ``cryptography`` package the error names the
  ``pip install`` to run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import sys

import pytest

import flame
from flame import _tls, _wire
from flame._listener import Listener
from helpers import wait_until
from helpers.parent.wire_tools import RecordingProcessBackend, TcpProxy, jframe, via
from helpers.runner import wire_work as work

pytest.importorskip("cryptography")


def echo(value: bytes) -> bytes:
    return value + b"|seen by the runner"


def test_calls_payloads_acall_and_map_over_tls() -> None:
    with flame.Pool(
        "tls-calls", max=1, max_concurrency=8, tls=True, backend=flame.ProcessBackend()
    ) as pool:
        assert flame.call(pool, echo, b"hello") == b"hello|seen by the runner"
        payload = secrets.token_bytes(3_000_000)  # larger than any TLS record or read chunk
        assert flame.call(pool, work.digest, payload) == work.digest(payload)
        assert len(flame.call(pool, bytes, 5_000_000)) == 5_000_000
        assert asyncio.run(flame.acall(pool, echo, b"a")) == b"a|seen by the runner"
        assert list(pool.map(len, [b"x" * i for i in range(50)])) == list(range(50))


@pytest.mark.parametrize("tls", [False, True])
def test_an_eavesdropper_sees_clear_text_only_without_tls(tls: bool) -> None:
    marker = b"flame-marker-" + secrets.token_hex(8).encode()
    with TcpProxy() as proxy:
        backend = RecordingProcessBackend(tamper=via(proxy))
        with flame.Pool("tls-eavesdrop", max=1, tls=tls, backend=backend) as pool:
            assert flame.call(pool, echo, marker) == marker + b"|seen by the runner"
            info = backend.infos[0]
        seen = bytes(proxy.seen)
    assert len(seen) > 200  # the proxy really carried the connection
    assert (marker in seen) is not tls
    assert (b"seen by the runner" in seen) is not tls
    assert (info.runner_id.encode() in seen) is not tls  # even the HELLO is hidden
    assert (info.tls_fingerprint is not None) is tls


def test_a_runner_pinned_to_another_certificate_refuses_the_parent() -> None:
    wrong = "0" * 64

    def pin_wrong(info: flame._parent.LaunchInfo) -> flame._parent.LaunchInfo:
        assert info.tls_fingerprint is not None
        return dataclasses.replace(info, tls_fingerprint=wrong)

    backend = RecordingProcessBackend(tamper=pin_wrong)
    pool = flame.Pool("tls-wrong-pin", max=1, tls=True, boot_timeout=20, backend=backend)
    with pool, pytest.raises(flame.BootError) as err:
        flame.call(pool, echo, b"never runs")
    text = str(err.value)
    assert "does not match the fingerprint" in text
    assert backend.procs[0].wait(10) is not None  # the runner exited; nothing leaked


def test_plain_or_garbage_clients_are_dropped_by_a_tls_listener() -> None:
    with flame.Pool("tls-hostile", max=1, tls=True, backend=flame.ProcessBackend()) as pool:
        assert flame.call(pool, echo, b"1") == b"1|seen by the runner"
        listener = Listener.get("127.0.0.1", True)
        clients = []
        for data in (
            jframe(_wire.HELLO, {"id": "x", "nonce": "00" * 32}),
            b"\x16\x03\x01junk",
            b"",
        ):
            c = socket.create_connection(("127.0.0.1", listener.port))
            if data:
                c.sendall(data)
            clients.append(c)
        for c in clients:
            c.settimeout(_wire.HANDSHAKE_TIMEOUT + 5)
            try:
                while c.recv(4096):
                    pass  # a TLS alert may come first; then the close
            except (ConnectionResetError, TimeoutError):
                pass
            c.close()
        wait_until(lambda: listener.handshakes == 0, timeout=_wire.HANDSHAKE_TIMEOUT + 5)
        assert flame.call(pool, echo, b"2") == b"2|seen by the runner"


def test_tls_option_is_checked() -> None:
    with pytest.raises(ValueError, match="tls must be True or False"):
        flame.Pool("tls-bad", max=1, tls="yes")  # type: ignore[arg-type]


def test_missing_cryptography_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'flame-py\[tls\]'"):
        flame.Pool("tls-missing", max=1, tls=True, backend=flame.ProcessBackend())
    with pytest.raises(ImportError, match=r"pip install 'flame-py\[tls\]'"):
        _tls.require()
