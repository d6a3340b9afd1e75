"""``flame.Parent`` and the ``FLAME_PARENT`` encoding.

A runner learns everything it needs before it can dial home from one environment variable,
``FLAME_PARENT``: base64 of a small JSON object (never a pickle: nothing in the environment
is ever unpickled). It carries the runner's id and secret, the addresses to dial, the app to
import, and the failsafe time. The secret stays out of every repr and message: ``Parent``
(what user code sees through :func:`flame.parent`) does not hold it at all.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__

ENV_VAR = "FLAME_PARENT"
ENCODING_VERSION = 1


@dataclass(frozen=True)
class Parent:
    """What a runner knows about the parent that booted it.

    ``flame.parent()`` returns ``None`` in a normal process and an instance of this class
    inside a runner.
    """

    runner_id: str
    pool: str
    backend: str
    flame_version: str = __version__
    addresses: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def get() -> Parent | None:
        """The same as :func:`flame.parent`."""
        return _current


_current: Parent | None = None
#: inside a runner: the app it was booted with (its own pools boot runners of the same app)
_runner_app: dict[str, str] | None = None
#: inside a runner, while it imports the app: a pool must not be called then
_importing = False


def _set_current(parent: Parent | None, app: dict[str, str] | None = None) -> None:
    global _current, _runner_app
    _current, _runner_app = parent, app


def runner_app() -> dict[str, str] | None:
    """Inside a runner: the app it imported (``None`` elsewhere)."""
    return _runner_app


class _Importing:
    """Marks the runner's import of the app (see :func:`check_not_importing`)."""

    def __enter__(self) -> None:
        global _importing
        _importing = True

    def __exit__(self, *exc: object) -> None:
        global _importing
        _importing = False


importing_app = _Importing()


class CalledWhileImporting(Exception):
    """A pool was called while a runner imported the app: a script without a main guard."""


def check_not_importing(pool: str) -> None:
    """Refuse a call on ``pool`` made while this runner imports the app: the script calls
    the pool at import time, so each runner that imports it would call the pool again."""
    if _importing:
        raise CalledWhileImporting(
            f"the app calls pool {pool!r} while a runner imports it; put the calls under "
            '`if __name__ == "__main__":`'
        )


def parent() -> Parent | None:
    """Return the :class:`Parent` inside a runner, ``None`` in an ordinary process."""
    return _current


@dataclass(frozen=True)
class LaunchInfo:
    """The decoded content of ``FLAME_PARENT`` (runner side). Holds the secret: no repr."""

    runner_id: str
    secret: bytes = field(repr=False)
    addresses: tuple[tuple[str, int], ...]
    pool: str
    backend: str
    app: dict[str, str] | None = None
    sys_path: tuple[str, ...] | None = None
    cwd: str | None = None
    failsafe: float = 20.0
    tls_fingerprint: str | None = None
    #: send fd 1/2 to the parent through the connection (``Pool(forward_output=...)``)
    forward_output: bool = True

    def __repr__(self) -> str:
        return f"LaunchInfo(runner_id={self.runner_id!r}, pool={self.pool!r}, secret=<hidden>)"

    def encode(self) -> str:
        doc: dict[str, Any] = {
            "v": ENCODING_VERSION,
            "id": self.runner_id,
            "secret": self.secret.hex(),
            "addrs": [list(a) for a in self.addresses],
            "pool": self.pool,
            "backend": self.backend,
            "app": self.app,
            "sys_path": list(self.sys_path) if self.sys_path is not None else None,
            "cwd": self.cwd,
            "failsafe": self.failsafe,
            "tls": self.tls_fingerprint,
            "out": self.forward_output,
        }
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode("ascii")

    @classmethod
    def decode(cls, value: str) -> LaunchInfo:
        """Decode ``FLAME_PARENT``; a ``ValueError`` says what is wrong (never the secret)."""
        try:
            doc = json.loads(base64.urlsafe_b64decode(value.encode("ascii")))
        except (binascii.Error, ValueError, UnicodeError) as exc:
            raise ValueError(
                f"{ENV_VAR} is not base64-encoded JSON ({type(exc).__name__})"
            ) from None
        if not isinstance(doc, dict):
            raise ValueError(f"{ENV_VAR} must hold a JSON object")
        if doc.get("v") != ENCODING_VERSION:
            raise ValueError(
                f"{ENV_VAR} has encoding version {doc.get('v')!r}; this flame "
                f"({__version__}) reads version {ENCODING_VERSION}"
            )
        try:
            addrs = tuple((str(h), int(p)) for h, p in doc["addrs"])
            sys_path = doc.get("sys_path")
            return cls(
                runner_id=str(doc["id"]),
                secret=bytes.fromhex(doc["secret"]),
                addresses=addrs,
                pool=str(doc["pool"]),
                backend=str(doc["backend"]),
                app=doc.get("app"),
                sys_path=tuple(sys_path) if sys_path is not None else None,
                cwd=doc.get("cwd"),
                failsafe=float(doc.get("failsafe", 20.0)),
                tls_fingerprint=doc.get("tls"),
                forward_output=bool(doc.get("out", True)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{ENV_VAR} is missing or has a malformed field ({exc!s:.60})"
            ) from None

    @classmethod
    def from_environ(cls) -> LaunchInfo:
        value = os.environ.get(ENV_VAR)
        if not value:
            raise ValueError(
                f"{ENV_VAR} is not set: 'flame runner' is started by a flame backend, not by hand"
            )
        return cls.decode(value)
