"""Work that runs *on runners* in the wire, security, serialization and life-cycle tests.

Pickled by reference, so a ProcessBackend runner imports this (light) module through the
parent's ``sys.path``. Runners talk back through return values or files; every wait here is
a short-sleep poll, so a cancel (an exception raised in the worker thread) stops it promptly.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def whoami() -> tuple[int, str | None]:
    """(pid, runner id) of the process running this."""
    import flame

    p = flame.parent()
    return os.getpid(), (p.runner_id if p is not None else None)


def nap(seconds: float) -> int:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    return os.getpid()


# -- payloads --------------------------------------------------------------------------------------
def _raw(payload: Any) -> bytes:
    if hasattr(payload, "tobytes"):
        return bytes(payload.tobytes())
    return bytes(payload)


def digest(payload: Any) -> str:
    return hashlib.sha256(_raw(payload)).hexdigest()


def digest_and_flip(payload: Any) -> tuple[str, str, Any]:
    """(type name, sha256 of what arrived, the payload reversed, of the same type)."""
    kind = type(payload).__module__ + "." + type(payload).__qualname__
    if isinstance(payload, bytes):
        flipped: Any = payload[::-1]
    elif isinstance(payload, bytearray):
        flipped = bytearray(reversed(payload))
    elif isinstance(payload, memoryview):
        flipped = memoryview(bytes(payload)[::-1])
    else:  # a NumPy array
        flipped = payload[::-1].copy()
    return kind, digest(payload), flipped


def nested_sum(doc: dict[str, Any]) -> tuple[float, int]:
    arrays = doc["arrays"]
    return float(sum(a.sum() for a in arrays)), sum(a.nbytes for a in arrays)


# -- secrets ---------------------------------------------------------------------------------------
def secret_probe() -> dict[str, Any]:
    """Everything a runner shows about itself where its secret must not appear."""
    import flame

    p = flame.parent()
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    child_env = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('FLAME_PARENT', '<unset>'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return {
        "pid": os.getpid(),
        "parent_repr": repr(p),
        "parent_str": str(p),
        "parent_vars": repr(vars(p)) if p is not None else "",
        "parent_attrs": sorted(a for a in dir(p) if not a.startswith("__")),
        "env": os.environ.get("FLAME_PARENT"),
        "all_env": "\n".join(f"{k}={v}" for k, v in os.environ.items()),
        "cmdline": cmdline,
        "child_env": child_env,
    }


# -- gated work (life cycle) -----------------------------------------------------------------------
def gated(workdir: str, tag: str, limit: float = 60.0) -> str:
    """Write ``<tag>.started``; wait for ``<tag>.gate``; write ``<tag>.done`` and return.

    If it is interrupted (cancelled by the runner), write ``<tag>.cancelled`` with the
    exception's type name, and re-raise.
    """
    d = Path(workdir)
    (d / f"{tag}.started").write_text(str(os.getpid()))
    try:
        deadline = time.monotonic() + limit
        while not (d / f"{tag}.gate").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {tag} never opened")
            time.sleep(0.01)
    except BaseException as exc:
        (d / f"{tag}.cancelled").write_text(type(exc).__name__)
        raise
    (d / f"{tag}.done").write_text(str(time.monotonic()))
    return f"{tag} done"


def timed(workdir: str, tag: str, seconds: float) -> str:
    """Write ``<tag>.started``, work ``seconds``, write ``<tag>.done`` (or ``.cancelled``)."""
    d = Path(workdir)
    try:  # a cancel may land as soon as .started exists: within the try, then
        (d / f"{tag}.started").write_text(str(os.getpid()))
        nap(seconds)
    except BaseException as exc:
        (d / f"{tag}.cancelled").write_text(f"{type(exc).__name__} {time.monotonic()}")
        raise
    (d / f"{tag}.done").write_text(str(time.monotonic()))
    return f"{tag} done"


def idle_check(gate: str, log: str) -> bool:
    """An idle check: note who ran it, and allow shutdown once ``gate`` exists."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.path.exists(gate)


# -- serialization ---------------------------------------------------------------------------------
def make_lock() -> Any:
    return threading.Lock()


class HomesickError(Exception):
    pass


def _only_on_runner(value: int) -> Any:
    import flame

    if flame.parent() is None:
        raise HomesickError("this object can only be rebuilt on a runner")
    return Homesick(value)


class Homesick:
    """Pickles anywhere; unpickles only on a runner (a result that fails at home)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        return (_only_on_runner, (self.value,))


def make_homesick() -> Homesick:
    return Homesick(7)


def identity(x: Any) -> Any:
    return x


class Holder:
    def __init__(self, thing: Any) -> None:
        self.thing = thing

    def get(self) -> Any:
        return self.thing


def _only_at_home(value: int) -> Any:
    import flame

    if flame.parent() is not None:
        raise HomesickError("this object cannot be rebuilt on a runner")
    return Homebound(value)


class Homebound:
    """Pickles anywhere; unpickles only outside a runner (an argument that fails there)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        return (_only_at_home, (self.value,))
