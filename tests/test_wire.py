"""The wire protocol (``flame._wire``): frames, their limits, the handshake under fuzzing, and
heartbeats, over real sockets and real runner processes.

* frames round-trip through ``Connection`` over a socketpair, in both directions, whatever
  their kind, parts and sizes (hypothesis), pickled sections included;
* many threads sending at once (plus the loop's own ``send_soon``) never interleave frames
  and lose none; a 50 MB frame arrives intact; a frame over ``max_frame`` closes the
  connection as soon as its header is read;
* any byte stream fed to a ``Connection`` yields exactly the well-formed frames it contains
  and then a close: nothing raises out of the loop's callbacks, nothing hangs (hypothesis);
* any JSON or bytes as HELLO / PROOF is refused by the parent's listener with a close, never
  welcomed, never unpickled (hypothesis);
* heartbeats: a silent peer is declared lost within ``heartbeat_timeout``; a frozen runner
  (SIGSTOP) and a runner behind a network that drops every packet are noticed and killed,
  their calls fail with ``flame.RunnerLost``, and the next call runs on a replacement.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import flame
from flame import _serialize, _wire
from flame._exits import ExitCode
from flame._listener import Listener
from helpers import pid_alive, wait_until
from helpers.parent.callers import Caller
from helpers.parent.wire_tools import (
    CONFIG,
    LoopThread,
    Peer,
    RawClient,
    RecordingProcessBackend,
    TcpProxy,
    connect,
    frame,
    peer_pair,
    recv_frame,
    via,
    wait_closed,
)
from helpers.runner import wire_work as work

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def lt() -> Iterator[LoopThread]:
    with LoopThread() as loop_thread:
        yield loop_thread


@pytest.fixture(autouse=True)
def _nothing_raised_out(request: pytest.FixtureRequest) -> Iterator[None]:
    """No exception may escape a Connection's callbacks on the test loop."""
    if "lt" not in request.fixturenames:
        yield
        return
    loop_thread: LoopThread = request.getfixturevalue("lt")
    loop_thread.errors.clear()
    yield
    assert loop_thread.errors == [], f"exceptions escaped on the loop: {loop_thread.errors}"


def _joined(parts: list[bytes]) -> bytes:
    return b"".join(parts)


# -- frames ----------------------------------------------------------------------------------------
def test_frames_round_trip_both_ways(lt: LoopThread) -> None:
    cases: list[tuple[int, list[Any]]] = [
        (_wire.PING, []),
        (_wire.CANCEL, [_wire.ID_HEAD.pack(42)]),
        (_wire.RESULT, [b"head", memoryview(b"middle"), bytearray(b"tail")]),
        (_wire.CALL, [b"\0" * 70_000, b"x"]),  # larger than one read
        (255, [b""]),
        (0, [os.urandom(300_000)]),  # larger than the read buffer
    ]
    with peer_pair(lt) as (a, b):
        for sender, receiver in ((a, b), (b, a)):
            for kind, parts in cases:
                sender.send(kind, *parts)
            for kind, parts in cases:
                assert receiver.get() == (kind, b"".join(bytes(p) for p in parts))
        assert not a.closed.is_set() and not b.closed.is_set()


@FUZZ
@given(
    frames=st.lists(
        st.tuples(st.integers(0, 255), st.lists(st.binary(max_size=3000), max_size=4)),
        max_size=25,
    )
)
def test_any_frames_round_trip(lt: LoopThread, frames: list[tuple[int, list[bytes]]]) -> None:
    with peer_pair(lt, max_frame=1 << 20) as (a, b):
        for kind, parts in frames:
            a.send(kind, *parts)
        got = [b.get() for _ in frames]
        assert got == [(kind, _joined(parts)) for kind, parts in frames]


def test_pickled_section_round_trip_with_out_of_band_buffers(lt: LoopThread) -> None:
    big = os.urandom(1 << 20)
    value = {"big": _serialize.mark_value(big), "small": [1, "two", 3.0]}
    data, bufs = _serialize.dumps(value)
    assert len(bufs) == 1 and bufs[0].nbytes == len(big)
    head = _wire.CALL_HEAD.pack(7, _wire.FLAG_LINK, 2.5)
    with peer_pair(lt) as (a, b):
        a.send(_wire.CALL, head, *_wire.section_parts(data, bufs))
        kind, body = b.get()
    assert kind == _wire.CALL
    assert _wire.CALL_HEAD.unpack_from(body, 0) == (7, _wire.FLAG_LINK, 2.5)
    stream, buffers = _wire.split_section(memoryview(body)[_wire.CALL_HEAD.size :])
    assert [m.nbytes for m in buffers] == [len(big)]
    assert _serialize.loads(stream, buffers) == {"big": big, "small": [1, "two", 3.0]}


def _pattern(tid: int, seq: int, size: int) -> bytes:
    seed = hashlib.sha256(f"{tid}/{seq}".encode()).digest()
    return struct.pack("!II", tid, seq) + (seed * (size // 32 + 1))[:size]


@pytest.mark.timeout(60)
def test_senders_in_many_threads_never_interleave(lt: LoopThread) -> None:
    threads_n, per_thread = 8, 60
    with peer_pair(lt) as (a, b):
        pings_sent = 0
        stop_pinging = threading.Event()

        def ping_from_loop() -> None:
            # the loop's own writer (heartbeats, cancels) goes through send_soon meanwhile
            nonlocal pings_sent
            if stop_pinging.is_set():
                return
            a.conn.send_soon(_wire.PING)
            pings_sent += 1
            lt.loop.call_later(0.001, ping_from_loop)

        lt.loop.call_soon_threadsafe(ping_from_loop)
        barrier = threading.Barrier(threads_n)
        errors: list[BaseException] = []

        def sender(tid: int) -> None:
            rng = __import__("random").Random(tid)
            barrier.wait()
            try:
                for seq in range(per_thread):
                    size = (
                        rng.randrange(100_000, 400_000)
                        if rng.random() < 0.2
                        else rng.randrange(2000)
                    )
                    a.send(_wire.RESULT, _pattern(tid, seq, size)[:8], _pattern(tid, seq, size)[8:])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(t,)) for t in range(threads_n)]
        for t in threads:
            t.start()
        results: list[tuple[int, bytes]] = []
        pings = 0
        while len(results) < threads_n * per_thread:
            kind, body = b.get(timeout=20)
            if kind == _wire.PING:
                pings += 1
            else:
                results.append((kind, body))
        for t in threads:
            t.join()
        lt.call(stop_pinging.set)
        assert errors == []
        next_seq = [0] * threads_n
        for kind, body in results:
            assert kind == _wire.RESULT
            tid, seq = struct.unpack_from("!II", body)
            assert seq == next_seq[tid], "frames of one thread arrived out of order"
            next_seq[tid] += 1
            assert body == _pattern(tid, seq, len(body) - 8), "a frame was corrupted"
        # every ping queued by the loop thread arrived too, none lost in the outbox
        a.send(_wire.CANCEL, b"end")
        while True:
            kind, body = b.get()
            if kind == _wire.CANCEL:
                break
            assert kind == _wire.PING
            pings += 1
        received_before = sum(1 for k, _ in results if k == _wire.PING)
        assert pings + received_before == pings_sent


@pytest.mark.timeout(60)
def test_a_50_mb_frame_arrives_intact(lt: LoopThread) -> None:
    payload = os.urandom(50 << 20)
    with peer_pair(lt) as (a, b):
        a.send(_wire.CALL, b"head", memoryview(payload))
        kind, body = b.get(timeout=30)
        # and back the other way, from another thread
        sender = threading.Thread(target=b.send, args=(_wire.RESULT, payload))
        sender.start()
        kind2, body2 = a.get(timeout=30)
        sender.join()
    assert kind == _wire.CALL and len(body) == len(payload) + 4
    assert body[:4] == b"head"
    assert hashlib.sha256(body[4:]).digest() == hashlib.sha256(payload).digest()
    assert kind2 == _wire.RESULT and body2 == payload


@pytest.mark.timeout(30)
def test_a_large_first_call_reaches_a_freshly_booted_runner(runner_pids_seen: set[int]) -> None:
    """The first CALL may follow WELCOME in the same read: it must not meet the
    pre-authentication frame limit (4 KiB) on the runner."""
    payload = os.urandom(10 << 20)
    # a link that bunches up what the parent sends makes that the rule, not a race
    with TcpProxy(coalesce=0.05) as proxy:
        backend = RecordingProcessBackend(tamper=via(proxy))
        with flame.Pool("wire-first-call", max=1, backend=backend) as pool:
            _, digest, _ = pool.call(work.digest_and_flip, payload)
            assert digest == work.digest(payload)
            runner_pids_seen.add(pool.call(work.whoami)[0])


def test_a_frame_over_max_frame_closes_on_its_header(lt: LoopThread) -> None:
    raw, s = socket.socketpair()
    with raw:
        peer = Peer(lt, s, max_frame=1024)
        raw.sendall(frame(_wire.PING) + frame(_wire.RESULT, b"x" * 1024))
        assert peer.get() == (_wire.PING, b"")
        assert peer.get() == (_wire.RESULT, b"x" * 1024)
        # only the header of a 1025-byte frame: closed without waiting for its body
        raw.sendall(_wire.HEADER.pack(1025, _wire.RESULT))
        assert peer.closed.wait(2)
        assert "exceeds the limit" in peer.reason
        took, _ = wait_closed(raw, 2)
        assert took < 2
        assert peer.frames.empty()


def test_max_frame_applies_to_what_a_sender_sends(lt: LoopThread) -> None:
    a_sock, b_sock = socket.socketpair()
    a = Peer(lt, a_sock)
    b = Peer(lt, b_sock, max_frame=10_000)
    try:
        a.send(_wire.CALL, b"y" * 10_000)
        assert b.get() == (_wire.CALL, b"y" * 10_000)
        try:
            a.send(_wire.CALL, b"z" * 10_001)
        except ConnectionError:
            pass  # the receiver may hang up before all of it is written
        assert b.closed.wait(2) and "exceeds the limit" in b.reason
        assert a.closed.wait(2)  # and the sender sees the connection go
        assert b.frames.empty()
    finally:
        a.close()
        b.close()


# -- fuzzing the frame decoder ---------------------------------------------------------------------
FUZZ_MAX_FRAME = 600


@st.composite
def byte_streams(draw: st.DrawFn) -> bytes:
    """Random bytes, or frames (some with lying length fields), cut short or padded."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=1500))
    out = bytearray()
    for _ in range(draw(st.integers(1, 8))):
        body = draw(st.binary(max_size=700))
        kind = draw(
            st.one_of(
                st.sampled_from(sorted(_wire.PREAUTH_KINDS)),
                st.integers(0, 30),
                st.integers(0, 255),
            )
        )
        length = draw(
            st.one_of(
                st.just(len(body)),
                st.just(len(body)),
                st.just(len(body)),
                st.integers(0, 2**64 - 1),
                st.integers(0, FUZZ_MAX_FRAME + 10),
            )
        )
        out += _wire.HEADER.pack(length, kind) + body
    if draw(st.integers(0, 3)) == 0:
        out = out[: draw(st.integers(0, len(out)))]
    if draw(st.booleans()):
        out += draw(st.binary(max_size=40))
    return bytes(out)


def _reference_parse(
    stream: bytes, max_frame: int, reject: frozenset[int] | None
) -> tuple[list[tuple[int, bytes]], str]:
    """What a correct decoder delivers from ``stream``, and why it stops."""
    frames, pos, hsize = [], 0, _wire.HEADER.size
    while len(stream) - pos >= hsize:
        length, kind = _wire.HEADER.unpack_from(stream, pos)
        if length > max_frame:
            return frames, "limit"
        if len(stream) - pos - hsize < length:
            return frames, "eof"
        if reject is not None and kind not in reject:
            return frames, "protocol"
        frames.append((kind, stream[pos + hsize : pos + hsize + length]))
        pos += hsize + length
    return frames, "eof"


@settings(FUZZ, max_examples=150)
@given(
    stream=byte_streams(),
    chunk=st.integers(1, 2000),
    scratch=st.sampled_from([16, 64, 8192]),
    preauth=st.booleans(),
)
def test_decoder_delivers_well_formed_frames_then_closes(
    lt: LoopThread, stream: bytes, chunk: int, scratch: int, preauth: bool
) -> None:
    """Whatever arrives, the Connection delivers exactly the frames a correct parser finds,
    then closes (at the first bad frame, or at EOF); nothing raises out, nothing hangs."""
    reject = _wire.PREAUTH_KINDS if preauth else None

    def handler(kind: int, body: memoryview) -> None:
        if reject is not None and kind not in reject:
            raise _wire.ProtocolError(f"kind {kind} before authentication")

    raw, s = socket.socketpair()
    with raw:
        peer = Peer(lt, s, max_frame=FUZZ_MAX_FRAME, scratch=scratch, handler=handler)
        try:
            for i in range(0, len(stream), chunk):
                raw.sendall(stream[i : i + chunk])
            raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # it may have hung up already
        assert peer.closed.wait(5), "the connection neither closed nor finished"
    expected, why = _reference_parse(stream, FUZZ_MAX_FRAME, reject)
    event(f"stopped at: {why}, frames: {min(len(expected), 2)}")
    assert peer.drain() == expected
    if why == "limit":
        assert "exceeds the limit" in peer.reason
    elif why == "protocol":
        assert "protocol error" in peer.reason
    else:
        assert "closed by peer" in peer.reason


# -- fuzzing the handshake -------------------------------------------------------------------------
FUZZ_RUNNER_ID = "fuzz-runner-1"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
hex_nonces = st.binary(min_size=0, max_size=40).map(bytes.hex)
valid_hellos = st.builds(
    lambda nonce, extra: {**extra, "id": FUZZ_RUNNER_ID, "nonce": nonce},
    st.binary(min_size=_wire.NONCE_BYTES, max_size=_wire.NONCE_BYTES).map(bytes.hex),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
hello_docs = (
    valid_hellos
    | valid_hellos
    | st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(st.just(FUZZ_RUNNER_ID), json_values),
            "nonce": st.one_of(hex_nonces, json_values),
            "versions": json_values,
        },
    )
)
proof_docs = st.fixed_dictionaries(
    {},
    optional={
        "proof": st.one_of(st.binary(min_size=32, max_size=32).map(bytes.hex), json_values),
        "versions": st.one_of(st.just(_wire.local_versions()), json_values),
    },
)


class _Touch:
    """Unpickling this creates a file: the proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def _bodies(docs: st.SearchStrategy[Any], marker: str) -> st.SearchStrategy[bytes]:
    touch = pickle.dumps(_Touch(marker))
    as_json = docs.map(lambda d: json.dumps(d).encode())
    return st.one_of(
        as_json,
        as_json,
        as_json,
        json_values.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=200),
        st.just(touch),
        st.binary(max_size=20).map(lambda b: json.dumps({"id": FUZZ_RUNNER_ID}).encode()[:-1] + b),
    )


def _valid_hello(body: bytes) -> bool:
    """The parent's own acceptance rule for HELLO, for the oracle."""
    try:
        doc = json.loads(body)
        assert isinstance(doc, dict)
        assert str(doc.get("id", "")) == FUZZ_RUNNER_ID
        return len(bytes.fromhex(str(doc.get("nonce", "")))) == _wire.NONCE_BYTES
    except (ValueError, AssertionError, UnicodeError):
        return False


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Listener, Any, Path]]:
    lis = Listener.get("127.0.0.1")
    fut = lis.expect(FUZZ_RUNNER_ID, os.urandom(32), CONFIG, None, b"")
    marker = tmp_path_factory.mktemp("fuzz") / "unpickled"
    yield lis, fut, marker
    lis.forget(FUZZ_RUNNER_ID)


@FUZZ
@given(data=st.data())
def test_handshake_refuses_any_hello_or_proof(
    listener: tuple[Listener, Any, Path], data: st.DataObject
) -> None:
    lis, fut, marker = listener
    first_kind = data.draw(
        st.sampled_from([_wire.HELLO] * 6 + [_wire.PROOF, _wire.WELCOME, _wire.CALL, 99])
    )
    hello = data.draw(_bodies(hello_docs, str(marker)))
    with connect(lis.port) as sock:
        sock.sendall(frame(first_kind, hello))
        event(f"valid hello: {first_kind == _wire.HELLO and _valid_hello(hello)}")
        if first_kind == _wire.HELLO and _valid_hello(hello):
            kind, _ = _read_frame(sock)
            assert kind == _wire.CHALLENGE
            proof = data.draw(_bodies(proof_docs, str(marker)))
            proof_kind = data.draw(st.sampled_from([_wire.PROOF] * 3 + [_wire.CALL, _wire.HELLO]))
            sock.sendall(frame(proof_kind, proof))
        _, sent_back = wait_closed(sock, 3)
    assert _wire.WELCOME not in [kind for kind, _ in _split_frames(sent_back)]
    assert not fut.done(), "a fuzzed peer was authenticated"
    assert not marker.exists(), "something the peer sent was unpickled"


def _split_frames(data: bytes) -> list[tuple[int, bytes]]:
    frames, _ = _reference_parse(data, 1 << 20, None)
    return frames


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    got = recv_frame(sock, 3)
    assert got is not None, "closed instead of answering a valid HELLO"
    return got


def test_fuzzed_handshakes_leave_the_listener_serving(
    listener: tuple[Listener, Any, Path],
) -> None:
    lis, _, _ = listener
    wait_until(lambda: lis.handshakes == 0, 5, message="handshakes still open")
    # the listener still serves: a peer with the secret gets in
    secret = os.urandom(32)
    rid = "fuzz-runner-2"
    ok = lis.expect(rid, secret, CONFIG, None, _serialize.dumps(None)[0])
    client = RawClient(lis.port, rid, secret)
    try:
        client.proof(client.hello())
        got = recv_frame(client.sock)
        assert got is not None and got[0] == _wire.WELCOME
        wait_until(ok.done, 5)
        conn = ok.result().conn
    finally:
        client.close()
    wait_until(lambda: conn.closed, 5)


# -- heartbeats ------------------------------------------------------------------------------------
def test_a_silent_peer_is_declared_lost_within_heartbeat_timeout(lt: LoopThread) -> None:
    raw, s = socket.socketpair()
    with raw:
        peer = Peer(lt, s)
        started = time.monotonic()
        lt.call(peer.conn.start_heartbeats, 0.05, 0.4)
        assert peer.closed.wait(3)
        took = time.monotonic() - started
        assert 0.35 <= took <= 1.2, took
        assert "no heartbeat" in peer.reason
        # it kept pinging meanwhile, and hung up at the end
        _, sent = wait_closed(raw, 2)
        assert sent.count(_wire.HEADER.pack(0, _wire.PING)) >= 3


def test_peers_that_answer_stay_connected(lt: LoopThread) -> None:
    with peer_pair(lt) as (a, b):
        lt.call(a.conn.start_heartbeats, 0.05, 0.3)
        lt.call(b.conn.start_heartbeats, 0.05, 0.3)
        # four heartbeat timeouts later, both are still up and pings kept flowing
        assert not a.closed.wait(1.2) and not b.closed.is_set()
        assert len(a.drain()) >= 5 and len(b.drain()) >= 5


@pytest.fixture
def fast_heartbeats(flame_defaults: None) -> None:
    flame.configure(heartbeat_interval=0.2, heartbeat_timeout=1.0, cancel_grace=0.5)


def _exit_code(proc: Any, timeout: float = 10.0) -> int:
    wait_until(lambda: proc.poll() is not None, timeout, message="runner process still running")
    return int(proc.returncode)


@pytest.mark.timeout(30)
def test_a_frozen_runner_is_killed_and_replaced(
    fast_heartbeats: None, runner_pids_seen: set[int]
) -> None:
    backend = RecordingProcessBackend()
    with flame.Pool("wire-frozen", max=1, max_concurrency=2, backend=backend) as pool:
        frozen, _ = pool.call(work.whoami)
        runner_pids_seen.add(frozen)
        caller = Caller(pool.call, work.nap, 30)
        wait_until(lambda: pool.stats().in_flight == 1, 5)
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        err = caller.failure(10)
        took = time.monotonic() - stopped_at
        assert isinstance(err, flame.RunnerLost), err
        assert took < 1.0 + 0.2 + 1.0 + 1.5, f"noticed after {took:.1f}s"
        assert "heartbeat" in str(err) or "killed" in str(err), str(err)
        # the parent killed it: a frozen process would never exit by itself
        assert _exit_code(backend.procs[0]) == -signal.SIGKILL
        assert not pid_alive(frozen)
        fresh, _ = pool.call(work.whoami, timeout=10)
        runner_pids_seen.add(fresh)
        assert fresh != frozen


@pytest.mark.timeout(30)
def test_a_runner_behind_a_network_that_drops_packets_is_lost_and_replaced(
    fast_heartbeats: None, runner_pids_seen: set[int]
) -> None:
    with TcpProxy() as proxy:
        # patience: the pool's stop waits for the runner to leave by itself, as it must
        backend = RecordingProcessBackend(tamper=via(proxy), patience=5.0)
        with flame.Pool("wire-lossy", max=1, max_concurrency=2, backend=backend) as pool:
            first, _ = pool.call(work.whoami)
            runner_pids_seen.add(first)
            caller = Caller(pool.call, work.nap, 30)
            wait_until(lambda: pool.stats().in_flight == 1, 5)
            proxy.blackhole()  # no FIN, no RST: every byte is silently lost from now on
            cut_at = time.monotonic()
            err = caller.failure(10)
            took = time.monotonic() - cut_at
            assert isinstance(err, flame.RunnerLost), err
            assert took < 1.0 + 0.2 + 1.0 + 1.5, f"noticed after {took:.1f}s"
            # the runner noticed too, on its own side, and left (it could not be told to)
            assert _exit_code(backend.procs[0]) == ExitCode.PARENT_LOST
            # the replacement dials through the (still lossy) proxy: send it direct instead
            backend.tamper = None
            fresh, _ = pool.call(work.whoami, timeout=10)
            runner_pids_seen.add(fresh)
            assert fresh != first


# -- who reads while a call runs (the runner's leader/follower reading) ---------------------------
@pytest.mark.timeout(30)
def test_a_call_arriving_during_a_lone_long_call_is_served_at_once(tmp_path: Path) -> None:
    # the first call runs alone, in the thread that read it; the second must be read and run
    # while the first is still blocked, not after it
    with flame.Pool(
        "wire-overtake", max=1, max_concurrency=2, backend=flame.ProcessBackend()
    ) as pool:
        flame.call(pool, work.whoami)  # booted
        slow = Caller(lambda: flame.call(pool, work.gated, str(tmp_path), "slow"))
        wait_until((tmp_path / "slow.started").exists, message="slow call not started")
        pid, _ = flame.call(pool, work.whoami, timeout=10)
        assert not (tmp_path / "slow.done").exists()  # it overtook the slow call
        (tmp_path / "slow.gate").touch()
        assert slow.outcome(10) == "slow done"
        assert flame.call(pool, work.whoami)[0] == pid  # the same runner, still well


@pytest.mark.timeout(30)
def test_heartbeats_are_read_while_a_lone_call_runs(fast_heartbeats: None) -> None:
    # 3 s of work, alone, with a 1 s heartbeat timeout: the parent's pings must still be read
    with flame.Pool("wire-long-alone", max=1, backend=flame.ProcessBackend()) as pool:
        pid, _ = flame.call(pool, work.whoami)
        assert flame.call(pool, work.nap, 3.0) == pid
        assert flame.call(pool, work.whoami)[0] == pid
