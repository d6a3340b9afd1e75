"""What pickles how (``flame._serialize``), checked in the stream itself and end to end.

* A script run as ``__main__``: its top-level functions and classes are pickled by reference
  (the stream names ``__main__``, carries no code) and resolve on the runner, which imported
  the script itself; a closure written there is shipped by value, but the module-level
  globals it uses (a lock, a socket, a value computed at import) are the *runner's own*, and
  names bound under ``if __name__ == "__main__":`` travel with it.
* Large ``bytes`` / ``bytearray`` / ``memoryview`` and NumPy arrays travel as out-of-band
  buffers: ``dumps`` returns them as buffers, without copying them, and the pickle stream
  stays small; 10 MB payloads of each kind round-trip through a real runner, both ways,
  with their type, shape and content intact.
* ``SerializationError`` names the culprit: the argument, closure variable, global, bound
  argument or bound object that cannot be pickled, raised in the caller before any runner
  is used; a result that cannot be pickled on the runner, or unpickled at home, and an
  argument that cannot be unpickled on the runner, are reported as such.
"""

from __future__ import annotations

import array
import asyncio
import functools
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import flame
from flame import _serialize
from helpers.runner import wire_work as work

MB = 1 << 20


ONLY_ON = ("process",)
POOL_OPTIONS = {"max": 1, "max_concurrency": 4}


# -- the main script -------------------------------------------------------------------------------
MAIN_SCRIPT = """
import json, os, socket, sys, threading
import flame
from flame import _serialize

LOCK = threading.Lock()                 # cannot be pickled: must never be shipped
SOCK = socket.socket()                  # neither can this
IMPORTED_BY = os.getpid()               # what the runner's own import of this file set

def square(x):
    return x * x

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm2(self):
        return self.x ** 2 + self.y ** 2

def where():
    return os.getpid(), IMPORTED_BY, __name__

if __name__ == "__main__":
    out = {"parent": os.getpid()}
    data, bufs = _serialize.dumps(square)
    out["square_stream"] = [len(data), b"__main__" in data, square.__code__.co_code in data]
    data, _ = _serialize.dumps(Point(1, 2))
    out["point_stream"] = [b"__main__" in data, b"Point" in data, b"norm2" in data]
    factor = 3                          # bound under the main guard: travels by value
    def closure(x):
        with LOCK:
            return (x * factor, os.getpid(), IMPORTED_BY, SOCK.fileno() >= 0,
                    threading.current_thread().name)
    data, _ = _serialize.dumps(closure)
    out["closure_stream"] = closure.__code__.co_code in data  # and LOCK, SOCK not in it
    with flame.Pool("main-script", max=1, backend="process") as pool:
        out["square"] = pool.call(square, 7)
        p = pool.call(Point, 3, 4)
        out["point"] = [type(p).__module__, type(p).__qualname__, isinstance(p, Point), p.norm2()]
        out["where"] = pool.call(where)
        out["closure"] = pool.call(closure, 5)
        out["lambda"] = pool.call(lambda: IMPORTED_BY + factor)
    print(json.dumps(out))
"""


@pytest.mark.timeout(30)
def test_a_main_script_pickles_by_reference_and_ships_closures(tmp_path: Path) -> None:
    script = tmp_path / "app_main.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=25,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    parent = out["parent"]
    # top-level function and class: by reference, no code in the stream
    size, names_main, has_code = out["square_stream"]
    assert names_main and not has_code and size < 100
    assert out["point_stream"] == [True, True, False]
    assert out["square"] == 49
    assert out["point"] == ["__main__", "Point", True, 25]
    # the runner imported the script itself, under another name, main block skipped
    runner_pid, imported_by, name = out["where"]
    assert runner_pid != parent and imported_by == runner_pid and name == "__mp_main__"
    # a closure: its code is shipped, the module globals it uses are the runner's own
    assert out["closure_stream"] is True
    value, pid, imported_by, sock_ok, _thread = out["closure"]
    assert value == 15 and pid == runner_pid and imported_by == runner_pid and sock_ok
    assert out["lambda"] == runner_pid + 3


def test_functions_of_importable_modules_travel_by_reference() -> None:
    data, bufs = _serialize.dumps(work.digest_and_flip)
    assert bufs == [] and b"helpers.runner.wire_work" in data
    assert work.digest_and_flip.__code__.co_code not in data
    assert _serialize.loads(data) is work.digest_and_flip


def test_closures_travel_by_value() -> None:
    def make(k: int) -> Any:
        return lambda x: x * k

    fn = make(6)
    data, _ = _serialize.dumps(fn)
    assert fn.__code__.co_code in data
    assert _serialize.loads(data)(7) == 42


# -- out-of-band buffers ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_large_buffers_go_out_of_band_without_copies(kind: str) -> None:
    raw = bytearray(os.urandom(2 * MB))
    value: Any = {"bytes": bytes(raw), "bytearray": raw, "memoryview": memoryview(raw)}[kind]
    data, bufs = _serialize.dumps(_serialize.mark_value(value))
    assert len(bufs) == 1 and bufs[0].nbytes == len(raw)
    assert len(data) < 200  # the pickle stream is only the recipe
    if kind != "bytes":  # zero copy: the buffer is the caller's memory
        raw[0] ^= 0xFF
        assert bufs[0][0] == raw[0]
    back = _serialize.loads(data, bufs)
    assert type(back) is type(value) and bytes(back) == bytes(value)


def test_small_buffers_stay_in_band() -> None:
    small = os.urandom(_serialize.OOB_THRESHOLD - 1)
    data, bufs = _serialize.dumps(_serialize.mark_value(small))
    assert bufs == [] and _serialize.loads(data) == small


def test_numpy_arrays_go_out_of_band_at_any_depth() -> None:
    a = np.arange(1000, dtype=np.float64)
    b = np.ones((3, 4), dtype=np.int16)
    doc = {"list": [a, {"deep": (b,)}], "tiny": np.zeros(2, dtype=np.uint8)}
    data, bufs = _serialize.dumps(doc)
    assert sorted(x.nbytes for x in bufs) == sorted([a.nbytes, b.nbytes, 2])
    assert len(data) < 1000
    a[0] = 99.0  # zero copy
    assert np.frombuffer(bufs[[x.nbytes for x in bufs].index(a.nbytes)], np.float64)[0] == 99.0
    back = _serialize.loads(data, bufs)
    np.testing.assert_array_equal(back["list"][0], a)
    assert back["list"][1]["deep"][0].dtype == np.int16 and back["list"][1]["deep"][0].shape == (
        3,
        4,
    )


def test_call_arguments_go_out_of_band() -> None:
    big = os.urandom(MB)
    data, bufs = _serialize.dumps_call(work.digest, (big,))
    assert [b.nbytes for b in bufs] == [MB] and len(data) < 300


def test_odd_numpy_layouts_round_trip() -> None:
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    strided = np.arange(20.0)[::3]
    for arr in (fortran, strided, np.array(5.0), np.zeros((0, 3))):
        data, bufs = _serialize.dumps(arr)
        back = _serialize.loads(data, bufs)
        np.testing.assert_array_equal(back, arr)
        assert back.shape == arr.shape and back.dtype == arr.dtype


@pytest.mark.parametrize("size", [64, 2 * MB])
def test_memoryviews_keep_their_format_and_shape(size: int) -> None:
    typed = memoryview(array.array("d", range(size // 8)))
    two_d = memoryview(bytearray(size)).cast("B", (size // 64, 64))
    for view in (typed, two_d):
        data, bufs = _serialize.dumps(_serialize.mark_value(view))
        back = _serialize.loads(data, bufs)
        assert isinstance(back, memoryview)
        assert (back.format, back.shape) == (view.format, view.shape)
        assert back == view


def test_non_contiguous_memoryviews_can_be_sent() -> None:
    strided = memoryview(bytes(range(200)))[::2]
    data, bufs = _serialize.dumps(_serialize.mark_value(strided))
    back = _serialize.loads(data, bufs)
    assert bytes(back) == bytes(strided)


def _payloads() -> dict[str, Any]:
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, 10 * MB, dtype=np.uint8).tobytes()
    return {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(bytearray(raw)),
        "numpy": rng.standard_normal(10 * MB // 8),
    }


@pytest.mark.timeout(60)
def test_10_mb_payloads_round_trip_through_a_runner(pool: flame.Pool) -> None:
    for kind, payload in _payloads().items():
        arrived_as, digest, flipped = pool.call(work.digest_and_flip, payload)
        assert arrived_as == f"builtins.{kind}" or (kind == "numpy" and "ndarray" in arrived_as)
        assert digest == work.digest(payload), f"{kind} was corrupted on the way there"
        assert type(flipped) is type(payload), kind
        if kind == "numpy":
            np.testing.assert_array_equal(flipped, payload[::-1])
        else:
            assert bytes(flipped) == bytes(payload)[::-1], f"{kind} was corrupted on the way back"


@pytest.mark.timeout(60)
def test_10_mb_of_nested_arrays_round_trip_asynchronously(pool: flame.Pool) -> None:
    arrays = [np.full(MB // 8 * (i + 1), float(i)) for i in range(4)]  # 10 MB in all

    async def go() -> Any:
        return await pool.acall(work.nested_sum, {"arrays": arrays})

    total, nbytes = asyncio.run(go())
    assert nbytes == sum(a.nbytes for a in arrays) == 10 * MB
    assert total == sum(float(a.sum()) for a in arrays)


# -- errors that name the culprit ------------------------------------------------------------------
@pytest.fixture
def idle_pool(make_pool: Callable[..., flame.Pool]) -> Iterator[flame.Pool]:
    """A started process pool that has booted nothing yet."""
    p = make_pool(flame.ProcessBackend()).start()
    yield p
    s = p.stats()
    assert (s.runners, s.booting) == (0, 0), "a runner was used for a call that cannot pickle"


def _caller_side_failures() -> list[tuple[str, Any, tuple[Any, ...], list[str]]]:
    lock = threading.Lock()
    # code the runner cannot import (a notebook cell): its globals travel by value
    cell: dict[str, Any] = {"__name__": "notebook_cell", "_UNPICKLABLE_GLOBAL": lock}
    exec("check = lambda: _UNPICKLABLE_GLOBAL.acquire(blocking=False)", cell)
    return [
        ("argument", work.identity, (1, lock), ["argument 1", "_thread.lock"]),
        (
            "closure",
            lambda: lock.acquire(blocking=False),
            (),
            ["closure variable 'lock'", "_thread.lock"],
        ),
        (
            "global",
            cell["check"],
            (),
            ["global '_UNPICKLABLE_GLOBAL'", "_thread.lock"],
        ),
        (
            "partial",
            functools.partial(work.identity, lock),
            (),
            ["functools.partial", "bound argument 0", "_thread.lock"],
        ),
        (
            "method",
            work.Holder(lock).get,
            (),
            ["Holder.get", "object it is bound to", "helpers.runner.wire_work.Holder"],
        ),
        ("generator", work.identity, (x for x in ()), ["argument 0", "generator"]),
    ]


@pytest.mark.parametrize("case", range(len(_caller_side_failures())))
def test_serialization_errors_name_the_culprit_before_any_runner(
    idle_pool: flame.Pool, case: int
) -> None:
    name, fn, args, needles = _caller_side_failures()[case]
    if name == "generator":
        args = (args,)
    with pytest.raises(flame.SerializationError) as info:
        idle_pool.call(fn, *args)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{name}: {needle!r} not in {message!r}"


def test_a_result_that_cannot_be_pickled_is_named(pool: flame.Pool) -> None:
    with pytest.raises(flame.SerializationError, match=r"result.*_thread\.lock"):
        pool.call(work.make_lock)


def test_a_result_that_cannot_be_unpickled_at_home(pool: flame.Pool) -> None:
    with pytest.raises(flame.SerializationError, match="unpickle the result in the caller") as info:
        pool.call(work.make_homesick)
    assert "HomesickError" in str(info.value)


def test_an_argument_that_cannot_be_unpickled_on_the_runner(pool: flame.Pool) -> None:
    with pytest.raises(flame.SerializationError, match="unpickle the call on the runner") as info:
        pool.call(work.identity, work.Homebound(3))
    assert "cannot be rebuilt on a runner" in str(info.value)
    # and the runner is unharmed
    assert pool.call(work.digest, b"ok") == hashlib.sha256(b"ok").hexdigest()


def test_importable_names_follow_module_scope_only(tmp_path: Path) -> None:
    """What a runner's import of the main script binds: not comprehension variables, function
    locals or names bound under the main guard (those travel with a closure by value)."""
    from flame._serialize import _importable_names

    script = tmp_path / "app_scope.py"
    script.write_text(
        "import os, sys as system\n"
        "A = 1\n"
        "B, (C, D) = 2, (3, 4)\n"
        "data = [x for x in range(3)]\n"
        "def g():\n    inner = 1\n"
        "class K:\n    attr = 2\n"
        "for i in range(2):\n    pass\n"
        "if __name__ == '__main__':\n    MAIN_ONLY = 1\nelse:\n    NOT_MAIN = 2\n"
    )
    names = _importable_names(str(script))
    assert names is not None
    assert {"os", "system", "A", "B", "C", "D", "data", "g", "K", "i", "NOT_MAIN"} <= names
    assert not {"x", "inner", "attr", "MAIN_ONLY"} & names
