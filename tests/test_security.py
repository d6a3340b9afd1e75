"""Hostile peers against the parent's listener, runners that cannot prove the secret or run
other versions, and where the runner secret must never show.

The listener is the real one (``flame._runner.Listener.get("127.0.0.1")``, on flame's
background loop), the one ProcessBackend runners dial. A legitimate runner is registered with
``Listener.expect`` and played by :class:`helpers.parent.wire_tools.RawClient`, or is a real runner
process booted by a pool.

What is proven:

* a peer that sends nothing, garbage, a truncated frame, a 2 GiB length prefix, a wrong proof,
  or a replayed handshake is disconnected (at once, or within the handshake timeout), and is
  never authenticated;
* a pickle sent before authentication is never loaded (the payload would create a file; a
  control shows that it does when loaded);
* 200 such connections at once are all closed within a bound, memory stays flat, and a real
  runner boots and serves a call meanwhile;
* a runner given the wrong secret exits with ``AUTH_FAILED`` and the pool's ``BootError`` says
  so; a runner of other versions is refused at the handshake with a ``BootError`` naming both
  sides' versions;
* the secret appears nowhere a user or another process can read it: ``repr(LaunchInfo)``,
  ``flame.parent()``, error messages, the runner's command line, its environment after start,
  the environment of processes it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flame
from flame import _serialize, _wire
from flame._exits import ExitCode
from flame._listener import Listener
from flame._parent import LaunchInfo
from helpers import wait_until
from helpers.parent.callers import Caller
from helpers.parent.wire_tools import (
    CONFIG,
    RawClient,
    RecordingProcessBackend,
    connect,
    finish,
    frame,
    jframe,
    launch_info,
    recv_frame,
    rss_bytes,
    start_runner,
    wait_closed,
    with_secret,
)
from helpers.runner import wire_work as work
from helpers.runner.skewed_app import SKEWED

PROMPT = 1.0  # "at once": well below the 5 s handshake timeout


@pytest.fixture(scope="module")
def listener() -> Listener:
    return Listener.get("127.0.0.1")


@pytest.fixture
def short_handshake(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(_wire, "HANDSHAKE_TIMEOUT", 1.0)
    return 1.0


@pytest.fixture
def expected(listener: Listener) -> Iterator[tuple[str, bytes, Any]]:
    """A runner id the listener is expecting, its secret, and the future it resolves."""
    rid = f"sec-{os.urandom(4).hex()}"
    secret = os.urandom(32)
    fut = listener.expect(rid, secret, CONFIG, None, _serialize.dumps({"idle_check": None})[0])
    yield rid, secret, fut
    listener.forget(rid)
    if fut.done() and not fut.cancelled() and fut.exception() is None:
        conn = fut.result().conn
        listener.loop.call_soon_threadsafe(conn.close, "test done")


@pytest.fixture(autouse=True)
def _handshakes_settle(listener: Listener) -> Iterator[None]:
    yield
    wait_until(lambda: listener.handshakes == 0, 5, message="handshakes left open")


class _Touch:
    """Loading this pickle creates ``path``: the proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def touch_pickle(path: Path) -> bytes:
    return pickle.dumps(_Touch(str(path)))


def test_the_file_creating_pickle_works_when_loaded(tmp_path: Path) -> None:
    """The control for every "never unpickled" assertion below."""
    target = tmp_path / "control"
    with contextlib.closing(pickle.loads(touch_pickle(target))):
        pass
    assert target.exists()
    target.unlink()
    _serialize.loads(touch_pickle(target)).close()
    assert target.exists()


def _frames(data: bytes) -> list[int]:
    kinds, pos = [], 0
    while len(data) - pos >= _wire.HEADER.size:
        length, kind = _wire.HEADER.unpack_from(data, pos)
        kinds.append(kind)
        pos += _wire.HEADER.size + length
    return kinds


def _round_trip(listener: Listener) -> None:
    """A legitimate handshake end to end: everything queued on the loop before it has run."""
    rid, secret = f"sec-flush-{os.urandom(3).hex()}", os.urandom(32)
    fut = listener.expect(rid, secret, CONFIG, None, _serialize.dumps(None)[0])
    client = RawClient(listener.port, rid, secret)
    try:
        client.proof(client.hello())
        got = recv_frame(client.sock)
        assert got is not None and got[0] == _wire.WELCOME
        wait_until(fut.done, 5)
        conn = fut.result().conn
        listener.loop.call_soon_threadsafe(conn.close, "test done")
    finally:
        client.close()


# -- one hostile connection at a time --------------------------------------------------------------
def test_a_silent_connection_is_closed_within_the_handshake_timeout(
    listener: Listener, short_handshake: float
) -> None:
    with connect(listener.port) as sock:
        took, sent = wait_closed(sock, short_handshake + 3)
    assert short_handshake * 0.8 <= took <= short_handshake + 1.5, took
    assert sent == b""


def test_a_silent_connection_is_closed_with_the_default_timeout(listener: Listener) -> None:
    assert _wire.HANDSHAKE_TIMEOUT <= 5.0
    with connect(listener.port) as sock:
        took, _ = wait_closed(sock, _wire.HANDSHAKE_TIMEOUT + 3)
    assert took <= _wire.HANDSHAKE_TIMEOUT + 1.5


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: flame\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)),  # a TLS hello
        b"\xff" + os.urandom(200),
        frame(_wire.HELLO, b"not json at all"),
        jframe(_wire.HELLO, ["a", "list"]),
        frame(_wire.HELLO, b"[" * 4000),  # deeper than the JSON parser's recursion limit
        jframe(_wire.HELLO, {"id": "nobody-expects-me", "nonce": "00" * 32}),
        frame(_wire.PING),  # a post-authentication message
    ],
    ids=[
        "http",
        "tls",
        "random",
        "hello-not-json",
        "hello-not-object",
        "hello-deep-json",
        "unknown-id",
        "ping",
    ],
)
def test_garbage_is_closed_at_once(listener: Listener, garbage: bytes) -> None:
    with connect(listener.port) as sock:
        sock.sendall(garbage)
        took, sent = wait_closed(sock, 3)
    assert took < PROMPT
    assert sent == b""  # not even a challenge


def test_a_wrong_secret_fails_and_the_right_one_still_gets_in(
    listener: Listener, expected: tuple[str, bytes, Any]
) -> None:
    rid, secret, fut = expected
    for _ in range(3):
        mallory = RawClient(listener.port, rid, os.urandom(32))
        with contextlib.closing(mallory):
            challenge = mallory.hello()
            mallory.proof(challenge)  # HMAC with the wrong key
            took, sent = wait_closed(mallory.sock, 3)
        assert took < PROMPT
        assert _wire.WELCOME not in _frames(sent)
        assert not fut.done()
    # failed attempts did not burn the id: the runner that holds the secret is welcomed
    alice = RawClient(listener.port, rid, secret)
    with contextlib.closing(alice):
        challenge = alice.hello()
        # and the parent proved the secret to it
        assert challenge["proof"] == _wire.proof(
            secret, b"P", alice.nonce, bytes.fromhex(challenge["nonce"])
        )
        alice.proof(challenge)
        kind, body = recv_frame(alice.sock) or (None, b"")
        assert kind == _wire.WELCOME
        assert json.loads(body)["config"] == CONFIG.to_json()
        wait_until(fut.done, 5)
        assert fut.exception() is None


@pytest.mark.parametrize(
    "proof",
    ["", "é" * 64, "0" * 64, ["list"], {"a": 1}, None, 12345, "\x00" * 64],
    ids=["empty", "non-ascii", "zeros", "list", "object", "null", "number", "nul"],
)
def test_a_malformed_proof_is_closed_at_once(
    listener: Listener, expected: tuple[str, bytes, Any], proof: Any
) -> None:
    rid, _, fut = expected
    client = RawClient(listener.port, rid, os.urandom(32))
    with contextlib.closing(client):
        client.hello()
        client.send(jframe(_wire.PROOF, {"proof": proof, "versions": _wire.local_versions()}))
        took, sent = wait_closed(client.sock, 3)
    assert took < PROMPT
    assert _wire.WELCOME not in _frames(sent)
    assert not fut.done()


def test_a_replayed_handshake_fails(listener: Listener, expected: tuple[str, bytes, Any]) -> None:
    rid, secret, fut = expected
    alice = RawClient(listener.port, rid, secret)
    with contextlib.closing(alice):
        first = alice.hello()
        alice.proof(first)
        got = recv_frame(alice.sock)
        assert got is not None and got[0] == _wire.WELCOME
    hello_bytes, proof_bytes = alice.sent
    wait_until(fut.done, 5)
    # the id is expected again (say the runner reconnects): replaying what was recorded on
    # the wire must not get in, since the parent picks a fresh nonce every time
    again = listener.expect(rid, secret, CONFIG, None, b"")
    eve = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    with eve:
        eve.sendall(hello_bytes)
        got = recv_frame(eve)
        assert got is not None and got[0] == _wire.CHALLENGE
        assert json.loads(got[1])["nonce"] != first["nonce"]
        eve.sendall(proof_bytes)
        took, sent = wait_closed(eve, 3)
    assert took < PROMPT and _wire.WELCOME not in _frames(sent)
    assert not again.done()
    listener.forget(rid)


def test_a_truncated_frame_is_closed(listener: Listener, short_handshake: float) -> None:
    body = json.dumps({"id": "x", "nonce": "00" * 32}).encode()
    # the header promises more than comes, then silence: dropped at the handshake timeout
    with connect(listener.port) as sock:
        sock.sendall(_wire.HEADER.pack(len(body), _wire.HELLO) + body[:10])
        took, _ = wait_closed(sock, short_handshake + 3)
    assert took <= short_handshake + 1.5
    # ... or the peer hangs up half-way: closed at once
    with connect(listener.port) as sock:
        sock.sendall(_wire.HEADER.pack(len(body), _wire.HELLO) + body[:10])
        sock.shutdown(socket.SHUT_WR)
        took, _ = wait_closed(sock, 3)
    assert took < PROMPT
    # ... or only part of a header
    with connect(listener.port) as sock:
        sock.sendall(_wire.HEADER.pack(len(body), _wire.HELLO)[:5])
        took, _ = wait_closed(sock, short_handshake + 3)
    assert took <= short_handshake + 1.5


def test_a_2_gib_length_prefix_is_closed_at_once_without_allocating(listener: Listener) -> None:
    before = rss_bytes()
    for kind in (_wire.HELLO, _wire.PROOF, _wire.CALL):
        with connect(listener.port) as sock:
            sock.sendall(_wire.HEADER.pack(2 << 30, kind) + b"x" * 1000)
            took, _ = wait_closed(sock, 3)
        assert took < PROMPT
    # and after a valid HELLO, where the peer is half-way through the handshake
    with connect(listener.port) as sock:
        sock.sendall(jframe(_wire.HELLO, {"id": "nobody", "nonce": "00" * 32}))
        sock.sendall(_wire.HEADER.pack((2 << 30) - 1, _wire.PROOF))
        took, _ = wait_closed(sock, 3)
    assert took < PROMPT
    assert rss_bytes() - before < 16 << 20


@pytest.mark.parametrize("where", ["as-hello", "first-frame-call", "instead-of-proof", "as-proof"])
def test_a_pickle_before_authentication_is_never_loaded(
    listener: Listener, expected: tuple[str, bytes, Any], tmp_path: Path, where: str
) -> None:
    rid, _, fut = expected
    marker = tmp_path / "pwned"
    payload = touch_pickle(marker)
    section = b"".join(bytes(p) for p in _wire.section_parts(payload, []))
    call = _wire.CALL_HEAD.pack(1, _wire.FLAG_LINK, -1.0) + section
    with connect(listener.port) as sock:
        if where == "as-hello":
            sock.sendall(frame(_wire.HELLO, payload))
        elif where == "first-frame-call":
            sock.sendall(frame(_wire.CALL, call))
        else:
            # a peer that knows the id (not the secret) gets a challenge, then cheats
            sock.sendall(jframe(_wire.HELLO, {"id": rid, "nonce": os.urandom(32).hex()}))
            got = recv_frame(sock)
            assert got is not None and got[0] == _wire.CHALLENGE
            if where == "instead-of-proof":
                sock.sendall(frame(_wire.CALL, call) + frame(_wire.CONFIG, section))
            else:
                sock.sendall(frame(_wire.PROOF, payload))
        took, sent = wait_closed(sock, 3)
    assert took < PROMPT
    assert _wire.WELCOME not in _frames(sent)
    _round_trip(listener)  # whatever the loop had queued has run by now
    assert not marker.exists(), "a pickle from an unauthenticated peer was loaded"
    assert not fut.done()


# -- many at once ----------------------------------------------------------------------------------
def _hostile(i: int, marker: Path) -> bytes:
    kinds = [
        b"",  # silent
        b"\xff" + os.urandom(63),  # garbage
        _wire.HEADER.pack(2 << 30, _wire.HELLO),  # 2 GiB
        _wire.HEADER.pack(4000, _wire.HELLO) + b"{" * 100,  # truncated, waits for the rest
        frame(_wire.CALL, touch_pickle(marker)),  # a pickle
        jframe(_wire.HELLO, {"id": "nobody", "nonce": "00" * 32}),  # unknown id
        _wire.HEADER.pack(4096, _wire.HELLO) + b"[" * 4096,  # the largest allowed, not JSON
    ]
    return kinds[i % len(kinds)]


def _wait_all_closed(socks: list[socket.socket], timeout: float) -> float:
    start = time.monotonic()
    open_ = {s.fileno(): s for s in socks}
    while open_:
        left = start + timeout - time.monotonic()
        assert left > 0, f"{len(open_)} of {len(socks)} connections still open after {timeout}s"
        ready, _, _ = select.select(list(open_), [], [], min(left, 0.5))
        for fd in ready:
            try:
                data = open_[fd].recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                del open_[fd]
    return time.monotonic() - start


@pytest.mark.timeout(40)
def test_200_hostile_connections_at_once_while_a_runner_boots(
    listener: Listener,
    short_handshake: float,
    tmp_path: Path,
    runner_pids_seen: set[int],
) -> None:
    marker = tmp_path / "pwned"
    before = rss_bytes()
    socks = [connect(listener.port) for _ in range(200)]
    try:
        for i, s in enumerate(socks):
            with contextlib.suppress(OSError):
                s.sendall(_hostile(i, marker))
        # meanwhile a real runner boots, dials the same listener and serves a call
        pool = flame.Pool("sec-busy", max=1, backend="process", boot_timeout=15)
        with pool:
            caller = Caller(pool.call, work.whoami)
            took = _wait_all_closed(socks, short_handshake + 5)
            pid, runner_id = caller.outcome(20)
            runner_pids_seen.add(pid)
            assert runner_id is not None and runner_id.startswith("sec-busy")
            assert pool.call(work.whoami)[0] == pid
        assert took <= short_handshake + 3
        grown = rss_bytes() - before
        # a 2 GiB prefix honoured even once would show; the runner's boot itself costs ~3 MB
        assert grown < 10 << 20, f"RSS grew by {grown / 2**20:.1f} MB"
        assert not marker.exists()
    finally:
        for s in socks:
            s.close()


# -- runners that must not get in ------------------------------------------------------------------
def _secret_texts(*secrets: bytes) -> list[str]:
    out = []
    for s in secrets:
        out += [s.hex(), repr(s)[2:-1], s.hex().upper()]
    return out


def assert_no_secret(text: str, *secrets: bytes) -> None:
    for needle in _secret_texts(*secrets):
        assert needle not in text, "the runner secret leaked"


@pytest.mark.timeout(30)
def test_a_runner_with_the_wrong_secret_cannot_connect() -> None:
    wrong = os.urandom(32)
    backend = RecordingProcessBackend(tamper=with_secret(wrong))
    pool = flame.Pool("sec-wrong-secret", min=1, max=1, backend=backend, boot_timeout=15)
    started = time.monotonic()
    with pytest.raises(flame.BootError) as info:
        pool.start()
    assert time.monotonic() - started < 10
    proc = backend.procs[0]
    wait_until(lambda: proc.poll() is not None, 5)
    assert proc.returncode == ExitCode.AUTH_FAILED
    message = str(info.value)
    assert f"exited with code {int(ExitCode.AUTH_FAILED)}" in message
    assert "handshake" in message
    assert_no_secret(message, wrong, backend.infos[0].secret)
    assert pool.stats().runners == 0


@pytest.mark.timeout(30)
def test_a_runner_of_other_versions_is_refused_naming_both() -> None:
    backend = RecordingProcessBackend(app="helpers.runner.skewed_app")
    pool = flame.Pool("sec-skew", min=1, max=1, backend=backend, boot_timeout=15)
    with pytest.raises(flame.BootError) as info:
        pool.start()
    message = str(info.value)
    mine = _wire.local_versions()
    assert "version mismatch" in message
    for name in ("flame", "python", "cloudpickle"):
        assert f"{name} {mine[name]}" in message  # the parent's side
        assert f"{name} {SKEWED[name]}" in message  # the runner's side
    # the pool stops the refused runner at once (or it has left on its own already)
    proc = backend.procs[0]
    wait_until(lambda: proc.poll() is not None, 5)
    assert proc.returncode in (ExitCode.REFUSED, -signal.SIGKILL)
    assert_no_secret(message, backend.infos[0].secret)


@pytest.mark.timeout(30)
def test_a_refused_runner_exits_with_refused(
    listener: Listener, expected: tuple[str, bytes, Any]
) -> None:
    """Left alone (nobody kills it), a runner the parent refuses exits with REFUSED."""
    rid, secret, fut = expected
    info = launch_info(
        runner_id=rid,
        secret=secret,
        addresses=(("127.0.0.1", listener.port),),
        app={"module": "helpers.runner.skewed_app"},
        sys_path=tuple(sys.path),
        failsafe=15.0,
    )
    code, err, _ = finish(start_runner(info.encode()), 15)
    assert code == ExitCode.REFUSED, err
    assert "refused" in err and "0.0.0-skew" in err and flame.__version__ in err
    assert_no_secret(err, secret)
    with pytest.raises(flame.BootError, match="version mismatch"):
        fut.result()


@pytest.mark.parametrize("field", ["flame", "python", "cloudpickle"])
def test_the_handshake_refuses_each_kind_of_skew(
    listener: Listener, expected: tuple[str, bytes, Any], field: str
) -> None:
    rid, secret, fut = expected
    theirs = dict(_wire.local_versions(), **{field: "9.9.9"})
    client = RawClient(listener.port, rid, secret)
    with contextlib.closing(client):
        client.proof(client.hello(), versions=theirs)
        got = recv_frame(client.sock)
        assert got is not None and got[0] == _wire.REFUSE
        reason = json.loads(got[1])["reason"]
        wait_closed(client.sock, 3)
    assert f"{field} 9.9.9" in reason
    assert f"{field} {_wire.local_versions()[field]}" in reason
    wait_until(fut.done, 5)
    with pytest.raises(flame.BootError, match="version mismatch"):
        fut.result()


# -- where the secret must never show --------------------------------------------------------------
def test_launch_info_and_runner_launch_hide_the_secret() -> None:
    info = launch_info()
    for text in (repr(info), str(info), f"{info}", f"{info!r}"):
        assert_no_secret(text, info.secret)
        assert "<hidden>" in text or "secret" not in text
    launch = flame.RunnerLaunch("r", "p", env={"FLAME_PARENT": info.encode()})
    assert info.encode() not in repr(launch)
    assert LaunchInfo.decode(info.encode()).secret == info.secret


def test_decode_errors_never_show_the_secret() -> None:
    secret = os.urandom(32)
    good: dict[str, Any] = json.loads(
        __import__("base64").urlsafe_b64decode(launch_info(secret=secret).encode())
    )
    broken = [
        {**good, "addrs": [["127.0.0.1", "http"]]},
        {**good, "addrs": "127.0.0.1:80"},
        {**good, "secret": secret.hex() + "zz"},
        {**good, "secret": secret.hex()[:-1]},
        {**good, "secret": list(secret)},
        {**good, "secret": {"value": secret.hex()}},
        {k: v for k, v in good.items() if k != "pool"},
        {**good, "failsafe": "soon"},
        {**good, "v": 99},
    ]
    b64 = __import__("base64").urlsafe_b64encode
    for doc in broken:
        with pytest.raises(ValueError) as info:
            LaunchInfo.decode(b64(json.dumps(doc).encode()).decode())
        assert_no_secret(str(info.value), secret)
        assert "FLAME_PARENT" in str(info.value)


@pytest.mark.timeout(30)
def test_the_secret_is_nowhere_on_a_running_runner(runner_pids_seen: set[int]) -> None:
    backend = RecordingProcessBackend()
    with flame.Pool("sec-probe", max=1, backend=backend) as pool:
        probe = pool.call(work.secret_probe)
        runner_pids_seen.add(probe["pid"])
        secret = backend.infos[0].secret
        encoded = backend.infos[0].encode()
        # flame.parent() works, and does not hold the secret
        assert "sec-probe" in probe["parent_repr"]
        assert "secret" not in probe["parent_attrs"]
        for key in ("parent_repr", "parent_str", "parent_vars", "cmdline", "all_env"):
            assert_no_secret(probe[key], secret)
            assert encoded not in probe[key]
        # FLAME_PARENT was popped at start, so the runner's own children never see it
        assert probe["env"] is None
        assert probe["child_env"] == "<unset>"
        # its command line, as every local user can read it
        with open(f"/proc/{probe['pid']}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        assert_no_secret(cmdline, secret)
        assert "FLAME_PARENT" not in cmdline
        # errors a user sees about the runner do not carry it either
        pid = probe["pid"]
        caller = Caller(pool.call, work.nap, 30)
        wait_until(lambda: pool.stats().in_flight == 1, 5)
        os.kill(pid, 9)
        err = caller.failure(10)
        assert isinstance(err, flame.RunnerLost)
        assert_no_secret(str(err), secret)
        assert_no_secret(repr(pool), secret)


def test_scrub_hides_registered_values_whole_or_cut() -> None:
    from flame import _redact

    value = secrets.token_urlsafe(60)
    key = object()
    _redact.hide(key, value)
    try:
        text = f"HTTP 422: FLAME_PARENT={value[:50]}... (and {value}) ok=yes short={value[:8]}"
        shown = _redact.scrub(text)
        assert value not in shown and value[:50] not in shown
        assert shown.count("<hidden>") == 2
        assert "ok=yes" in shown and f"short={value[:8]}" in shown  # short pieces are kept
    finally:
        _redact.forget(key)
    assert _redact.scrub(value) == value  # forgotten: nothing more is hidden
