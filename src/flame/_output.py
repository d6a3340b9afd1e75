"""Runners' output, written to the parent's own stdout and stderr, one prefixed line at a time.

What runners send (OUTPUT frames, see ``flame._child._output``) arrives on connection reader
threads, which must never wait for a slow terminal or log pipe: they hand it to one writer
thread per process through a bounded queue (:data:`QUEUED` bytes), and output beyond that is
dropped with a counted notice rather than held. The writer cuts the stream into lines per
runner and stream, writes each as ``[<runner id>] line`` to ``sys.stdout`` or ``sys.stderr``
(as they are when it writes), and flushes; a runner's unfinished last line is written when
the runner ends.
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import Any

from . import _lifecycle

QUEUED = 4 << 20  # bytes of runner output waiting for the writer, at most
_LONGEST = 64 * 1024  # an unfinished line longer than this is written as it is

_lock = threading.Condition()
_writing = threading.Lock()  # one writer at a time: the thread, or drain() at exit
_queue: collections.deque[tuple[str, int, bytes | None]] = collections.deque()
_queued = 0
_dropped = 0
_writer: threading.Thread | None = None
_partial: dict[tuple[str, int], bytes] = {}


def emit(runner_id: str, stream: int, data: bytes) -> None:
    """Output a runner wrote on ``stream`` (1 or 2); never blocks (any thread)."""
    global _queued, _dropped
    with _lock:
        if _queued + len(data) > QUEUED:
            _dropped += len(data)
            return
        _queue.append((runner_id, stream, data))
        _queued += len(data)
        _start()
        _lock.notify()


def end(runner_id: str) -> None:
    """The runner is gone: its unfinished lines are written now."""
    with _lock:
        _queue.append((runner_id, 0, None))
        _start()
        _lock.notify()


def _start() -> None:
    global _writer
    if _writer is None:
        _writer = threading.Thread(target=_write_forever, name="flame-output", daemon=True)
        _writer.start()


def _write_forever() -> None:
    while True:
        with _lock:
            while not _queue:
                _lock.wait()
            items = list(_queue)
            _queue.clear()
        with _writing:
            _write(items)


def _write(items: list[tuple[str, int, bytes | None]]) -> None:
    global _queued, _dropped
    touched: set[Any] = set()
    for runner_id, stream, data in items:
        if data is None:  # the runner ended
            for key in [k for k in _partial if k[0] == runner_id]:
                touched.add(_line(runner_id, key[1], _partial.pop(key) + b"\n"))
            continue
        text = _partial.pop((runner_id, stream), b"") + data
        done, _, rest = text.rpartition(b"\n")
        if len(rest) > _LONGEST:
            done, rest = text, b""
        if rest:
            _partial[(runner_id, stream)] = rest
        if done or text.endswith(b"\n"):
            touched.add(_line(runner_id, stream, done + b"\n"))
        with _lock:
            _queued -= len(data)
    with _lock:
        dropped, _dropped = _dropped, 0
    if dropped:
        target = sys.stderr
        _put(
            target,
            f"[flame] {dropped} bytes of runners' output were dropped: this process's "
            "output did not keep up\n",
        )
        touched.add(target)
    for target in touched:
        try:
            if target is not None:
                target.flush()
        except (OSError, ValueError):
            pass


def _line(runner_id: str, stream: int, block: bytes) -> Any:
    """Write ``block`` (whole lines) prefixed line by line; return the stream written."""
    target = sys.stdout if stream == 1 else sys.stderr
    prefix = f"[{runner_id}] "
    text = block.decode(errors="replace")
    _put(target, "".join(prefix + line for line in text.splitlines(keepends=True)))
    return target


def _put(target: Any, text: str) -> None:
    try:
        if target is not None:
            target.write(text)
    except (OSError, ValueError):  # a closed or broken stdout: the output has nowhere to go
        pass


def drain(timeout: float = 0.5) -> None:
    """Write what is queued now (at exit), waiting at most ``timeout`` for the writer."""
    if not _writing.acquire(timeout=timeout):
        return
    try:
        with _lock:
            items = list(_queue)
            _queue.clear()
        if items:
            _write(items)
    finally:
        _writing.release()


def _after_fork() -> None:
    global _lock, _writing, _queue, _queued, _dropped, _writer, _partial
    _lifecycle.bury(_lock, _writing, _writer)
    _lock, _writing = threading.Condition(), threading.Lock()
    _queue, _queued, _dropped, _writer, _partial = collections.deque(), 0, 0, None, {}


_lifecycle.on_fork(_after_fork)
_lifecycle.on_exit(drain)
