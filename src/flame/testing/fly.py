"""``FlyMachinesEmulator``: a local stand-in for the Fly Machines API that boots real runners.

This module owns an in-process HTTP server (``flame.testing._http`` on 127.0.0.1, a free
port, in a background thread) that answers the part of Fly's published Machines API that
:class:`flame.FlyBackend` uses, as strictly as the real service, so that a request the real
API would refuse fails here too:

==========  ==================================================  ==============================
create      ``POST   /v1/apps/{app}/machines``                  starts the machine's command
list        ``GET    /v1/apps/{app}/machines``                  ``include_deleted``, ``state``,
                                                                ``region``, ``summary``,
                                                                ``metadata.<key>``, ``limit``
get         ``GET    /v1/apps/{app}/machines/{id}``             destroyed machines for a while
wait        ``GET    /v1/apps/{app}/machines/{id}/wait``        ``state`` (several), ``version``
stop        ``POST   /v1/apps/{app}/machines/{id}/stop``        ``signal`` (default SIGINT),
                                                                SIGKILL after ``timeout``
delete      ``DELETE /v1/apps/{app}/machines/{id}``             ``force=true`` kills a running
                                                                machine; otherwise 412
==========  ==================================================  ==============================

**What is checked.** Every request body and every answer is checked against the schemas of
Fly's OpenAPI document (``CreateMachineRequest``, ``StopRequest``, ``Machine``,
``WaitMachineResponse``, ``ErrorResponse``: see ``flame.testing._fly_api``), and so is each
query parameter; a body field or parameter the document does not name is refused (400), as
is a wrong type. Beyond the schema, the emulator enforces what Fly's server does: guest
sizes (shared: 1, 2, 4, 6 or 8 CPUs with 256-2048 MiB each; performance: 1, 2, 4, 8 or 16
CPUs with 2048-8192 MiB each; memory in steps of 256: 422 otherwise), unique names among
live machines (409, ``status: name_taken``), the wait rules (``version`` or ``instance_id``
required to wait for ``stopped``, ``timeout`` an integer of at most 60 seconds, 408 when it
passes), and the published rate limits (create and list: 1 a second with bursts of 3, per
app; get: 5 a second with bursts of 10, per machine; every other action: 1 a second with
bursts of 3, per machine), answering 429 past them. Errors are ``{"error": ..., "status":
...}``, and every answer carries a ``fly-request-id`` header.

**Machines.** A created machine REALLY runs: its command (``config.init.exec``, or
``entrypoint + cmd``, by default ``python -m flame runner``, with a leading ``python``
replaced by ``python=``, ``sys.executable`` by default) is started as a local process in its
own session, with an environment made of ``PATH``, ``extra_env`` (what "the image" holds,
such as ``PYTHONPATH``), the app's ``secrets`` (unless the create said ``skip_secrets``),
``config.env`` and the ``FLY_*`` variables Fly sets (``FLY_APP_NAME``, ``FLY_MACHINE_ID``,
``FLY_REGION``, ``FLY_IMAGE_REF``, ``FLY_PRIVATE_IP=127.0.0.1``...). Its output goes to a
log file (:meth:`FlyMachinesEmulator.logs`). States follow Fly's: the create answer says
``created``, the machine is ``started`` while its process runs, ``stopping`` after a stop,
``stopped`` when the process exits, then ``destroyed`` when ``auto_destroy`` is set. A
destroyed machine still reads ``destroyed`` for ``destroyed_ttl`` seconds, then 404s.

**Faults** can be injected: HTTP answers for the next requests of an action
(:meth:`~FlyMachinesEmulator.fail_next`), a create that is carried out (the machine made and
booted) but whose answer is lost (:meth:`~FlyMachinesEmulator.lose_next_create_answer`), a
dropped connection after any action (:meth:`~FlyMachinesEmulator.hang_up_next`), a slow
answer (:meth:`~FlyMachinesEmulator.slow_next`), machines that never dial in
(:meth:`~FlyMachinesEmulator.never_dial_in`) or fail to launch
(:meth:`~FlyMachinesEmulator.fail_launch_next`). Every request is recorded
(:attr:`~FlyMachinesEmulator.requests`), with the runner secret (``FLAME_PARENT``) blanked.

Differences from Fly worth knowing: one host, no real isolation (machines share this
computer, and every machine's private IP is 127.0.0.1), no capacity, no
``start``/``update``/leases/``signal``, and the status codes Fly does not publish are
guesses (422 for a refused size, 409 for a taken name, 412 for a delete without ``force``;
``docs/backends/fly.md`` lists them). POSIX only (process groups).
:meth:`~FlyMachinesEmulator.close` kills every process it started.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from ..backends.fly import FlyRateLimits, RateLimit
from . import _fly_api as api
from ._http import EmulatorServer, Handler

__all__ = ["EmulatedMachine", "FlyMachinesEmulator", "RecordedRequest"]

Action = Literal["create", "list", "get", "wait", "stop", "delete"]
_ACTIONS: tuple[str, ...] = ("create", "list", "get", "wait", "stop", "delete")
_PYTHON_RE = re.compile(r"^python(3(\.\d+)?)?$")
REDACTED = "<redacted>"
#: States a machine passes through on its way elsewhere (``settled`` means none of these).
_TRANSITIONAL = frozenset(
    {"creating", "starting", "stopping", "restarting", "suspending", "destroying", "updating"}
)
_ID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base 32, as Fly's ULIDs
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

# What a machine that never dials in runs: it sleeps for up to an hour, and ends as soon as
# it is orphaned, so that even an emulator killed without close() leaves nothing behind.
_SLEEPER = """\
import os, time
for _ in range(7200):
    if os.getppid() != {parent}:
        break
    time.sleep(0.5)
"""


@dataclass(frozen=True)
class RecordedRequest:
    """One request the emulator answered (or dropped: ``status`` 0)."""

    method: str
    path: str
    #: The query parameters; a repeated parameter's values are joined with commas.
    query: Mapping[str, str]
    #: The JSON body, with ``config.env.FLAME_PARENT`` replaced by ``"<redacted>"``.
    body: Any
    status: int
    #: Whether the request carried the right token.
    authorized: bool
    #: ``"create"``, ``"list"``, ``"get"``, ``"wait"``, ``"stop"``, ``"delete"`` or ``""``.
    action: str
    #: The query parameters as sent, in order, repeated ones included.
    query_pairs: tuple[tuple[str, str], ...] = ()
    #: The JSON answer (``None`` for a dropped connection), ``FLAME_PARENT`` redacted.
    answer: Any = field(default=None, repr=False)
    #: The ``fly-request-id`` header of the answer.
    request_id: str = ""


@dataclass(frozen=True)
class EmulatedMachine:
    """A snapshot of one emulated machine (taken by :meth:`FlyMachinesEmulator.machine`)."""

    id: str
    name: str
    app: str
    region: str
    #: ``instance_id`` and ``version`` (the same value, as on Fly).
    instance_id: str
    private_ip: str
    state: str
    #: The machine config as created, with ``env.FLAME_PARENT`` redacted.
    config: Mapping[str, Any]
    #: The command started for it, or ``None`` when nothing was started.
    argv: tuple[str, ...] | None
    pid: int | None
    exit_code: int | None
    #: Names of the environment variables the process got.
    env_keys: frozenset[str]
    #: The last (most recent first) Fly-style events: launch, start, exit, stop, destroy.
    events: tuple[Mapping[str, Any], ...] = field(repr=False)
    #: The signal and timeout of the last ``POST .../stop``, if any.
    stop_request: Mapping[str, Any] | None = None

    @property
    def alive(self) -> bool:
        """Whether the machine is not destroyed yet."""
        return self.state != "destroyed"

    @property
    def version(self) -> str:
        """The machine's version (``instance_id``)."""
        return self.instance_id

    @property
    def metadata(self) -> Mapping[str, Any]:
        """``config.metadata``."""
        meta = self.config.get("metadata")
        return meta if isinstance(meta, Mapping) else {}


def _fly_id(length: int = 26) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


class _Machine:
    """Mutable machine record; guarded by the emulator's lock."""

    def __init__(self, app: str, name: str, region: str, config: dict[str, Any]) -> None:
        self.id = secrets.token_hex(7)
        self.version = _fly_id()
        self.app = app
        self.name = name
        self.region = region
        self.config = config
        self.state = "created"
        self.created_at = _now_iso()
        self.updated_at = self.created_at
        self.destroyed_at: float | None = None
        self.events: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: tuple[str, ...] | None = None
        self.env_keys: frozenset[str] = frozenset()
        self.exit_code: int | None = None
        self.watcher: threading.Thread | None = None
        self.kill_timer: threading.Timer | None = None
        self.stop_request: dict[str, Any] | None = None

    @property
    def auto_destroy(self) -> bool:
        return bool(self.config.get("auto_destroy"))

    def event(self, kind: str, status: str, source: str, request: Any = None) -> None:
        entry: dict[str, Any] = {
            "id": _fly_id(),
            "type": kind,
            "status": status,
            "source": source,
            "timestamp": int(time.time() * 1000),
        }
        if request is not None:
            entry["request"] = request
        self.events.insert(0, entry)
        self.state = status
        self.updated_at = _now_iso()

    def to_json(self, private_ip: str, *, summary: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.version,
            "version": self.version,
            "private_ip": private_ip,
            "image_ref": {
                "registry": "emulator",
                "repository": str(self.config.get("image", "")),
                "tag": "latest",
            },
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if not summary:
            doc["config"] = copy.deepcopy(self.config)
            doc["events"] = copy.deepcopy(self.events)
            doc["host_status"] = "ok"
        return doc


class _Answer:
    """What a request gets: an HTTP status with a JSON document, or a dropped connection."""

    def __init__(
        self,
        status: int,
        doc: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        hang_up: bool = False,
        delay: float = 0.0,
        echo: bool = False,
        after: _Answer | None = None,
    ) -> None:
        self.status = status
        self.doc = doc
        self.headers = dict(headers or {})
        self.hang_up = hang_up
        self.echo = echo  # append the request body to the error message
        self.delay = delay
        self.after = after  # an answer that replaces the real one after the work is done

    @property
    def after_work(self) -> bool:
        """Whether this injected answer applies after the request was carried out."""
        return self.hang_up or self.delay > 0 or self.after is not None


def _error(status: int, message: str, fly_status: str = "unknown") -> _Answer:
    return _Answer(status, {"error": message, "status": fly_status})


class _Bucket:
    """A token bucket: ``limit.burst`` tokens, refilled at ``limit.per_second``."""

    __slots__ = ("limit", "stamp", "tokens")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.tokens = float(limit.burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """Take a token: 0.0, or the seconds until one is there (nothing taken)."""
        rate = self.limit.per_second
        elapsed = max(0.0, now - self.stamp)  # arrivals may be stamped out of order
        self.tokens = min(float(self.limit.burst), self.tokens + elapsed * rate)
        self.stamp = max(self.stamp, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class FlyMachinesEmulator:
    """A local Fly Machines API that starts each machine's command as a real process.

    Use it as a context manager (or call :meth:`start` and :meth:`close`)::

        from flame.testing.fly import FlyMachinesEmulator

        with FlyMachinesEmulator(token="t", app="myapp",
                                 extra_env={"PYTHONPATH": os.pathsep.join(sys.path)}) as fly:
            backend = flame.FlyBackend(host=fly.url, token="t", app="myapp",
                                       image="myapp:test", advertise_host="127.0.0.1")
            with flame.Pool("work", max=2, backend=backend) as pool:
                assert flame.call(pool, os.getpid) != os.getpid()
            fly.wait_until(lambda: not fly.live_machines())

    Args:
        token: the API token requests must carry.
        app: the only app that exists (others get 404); ``None`` accepts any app name.
        python: interpreter that replaces a leading ``python``/``python3`` in commands.
        cwd: working directory of machine processes (the image's WORKDIR).
        extra_env: environment every machine process gets, standing for the image's own
            (``PYTHONPATH`` so that flame and the app import, for example).
        secrets: the app's Fly secrets: in every machine's environment unless its create
            request says ``skip_secrets``.
        image_entrypoint: the image's ENTRYPOINT, put before ``init.cmd``.
        image_cmd: the image's CMD, used when ``init`` names no command.
        region: region reported for machines created without one (and ``FLY_REGION``).
        private_ip: ``private_ip`` and ``FLY_PRIVATE_IP`` of every machine.
        rate_limits: the limits enforced with 429 answers: Fly's published ones by
            default; a faster :class:`flame.backends.fly.FlyRateLimits` for tests that
            boot many runners (give the backend the same one), or ``None`` for none.
        retry_after: whether 429 answers carry a ``Retry-After`` header (Fly does not
            document one; off by default, so clients are tested without it).
        destroyed_ttl: seconds a destroyed machine still answers GET (state
            ``destroyed``) before it 404s.
        clock: the rate limiter's and ``destroyed_ttl``'s clock (``time.monotonic``).
    """

    def __init__(
        self,
        *,
        token: str = "emulator-token",
        app: str | None = None,
        python: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        image_entrypoint: Sequence[str] = (),
        image_cmd: Sequence[str] = ("python", "-m", "flame", "runner"),
        region: str = "emu",
        private_ip: str = "127.0.0.1",
        rate_limits: FlyRateLimits | None = FlyRateLimits(),  # noqa: B008 - frozen
        retry_after: bool = False,
        destroyed_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token = token
        self.app = app
        self.python = python or sys.executable
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.extra_env = dict(extra_env or {})
        self.secrets = dict(secrets or {})
        self.image_entrypoint = list(image_entrypoint)
        self.image_cmd = list(image_cmd)
        self.region = region
        self.private_ip = private_ip
        self.rate_limits = rate_limits
        self.retry_after = retry_after
        self.destroyed_ttl = float(destroyed_ttl)
        self._clock = clock
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._machines: dict[str, _Machine] = {}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._buckets_lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._injected: dict[str, deque[_Answer]] = {a: deque() for a in _ACTIONS}
        self._silent: deque[str] = deque()
        self._server: EmulatorServer | None = None
        self._logdir: str | None = None
        self._closed = False

    def __repr__(self) -> str:
        with self._lock:
            live = sum(1 for m in self._machines.values() if m.state != "destroyed")
            total = len(self._machines)
        where = self.url if self._server is not None else "not started"
        return f"<FlyMachinesEmulator {where} machines={total} live={live}>"

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> FlyMachinesEmulator:
        """Start serving in a background thread; returns ``self``."""
        if self._closed:
            raise RuntimeError("FlyMachinesEmulator was closed; make a new one")
        if self._server is None:
            self._logdir = tempfile.mkdtemp(prefix="flame-fly-emulator-")
            self._server = EmulatorServer(self._serve, "flame-fly-emulator").start()
        return self

    def close(self) -> None:
        """Kill every machine process, stop the server, remove the logs. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            machines = list(self._machines.values())
            for machine in machines:
                self._kill(machine)
                if machine.state != "destroyed":
                    self._destroyed(machine, "emulator")
            self._cond.notify_all()
        for machine in machines:
            if machine.watcher is not None:
                machine.watcher.join(timeout=10)
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._logdir is not None:
            shutil.rmtree(self._logdir, ignore_errors=True)

    def __enter__(self) -> FlyMachinesEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        """Base URL to give ``FlyBackend(host=...)``."""
        if self._server is None:
            raise RuntimeError("FlyMachinesEmulator is not started")
        port = self._server.port
        return f"http://127.0.0.1:{port}"

    # -- failure injection -----------------------------------------------------------------

    def fail_next(
        self,
        action: Action,
        status: int,
        count: int = 1,
        *,
        message: str | None = None,
        error_status: str = "unknown",
        retry_after: float | None = None,
        echo: bool = False,
    ) -> None:
        """Answer the next ``count`` requests of ``action`` with ``status`` (nothing done).

        The body is ``{"error": message, "status": error_status}``; ``error_status`` is one
        of Fly's ``main.statusCode`` values (``"insufficient_capacity"`` for a capacity
        error). ``retry_after`` adds a ``Retry-After`` header (seconds). ``echo`` appends
        the request's body to the error message, as a validation error quoting the rejected
        config would (the client must not show it: it holds the runner's environment).
        """
        if error_status not in api.ERROR_STATUSES:
            raise ValueError(f"error_status must be one of {api.ERROR_STATUSES}")
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        text = message or f"injected failure ({status})"
        self._inject(
            action,
            count,
            lambda: _Answer(
                status, {"error": text, "status": error_status}, headers=headers, echo=echo
            ),
        )

    def _inject(self, action: Action, count: int, answer: Callable[[], _Answer]) -> None:
        """Queue ``count`` answers for the next requests of ``action``."""
        if action not in _ACTIONS:
            raise ValueError(f"action must be one of {_ACTIONS}, got {action!r}")
        with self._lock:
            self._injected[action].extend(answer() for _ in range(count))

    def fail_next_creates(
        self,
        status: int,
        count: int = 1,
        *,
        message: str | None = None,
        error_status: str = "unknown",
        retry_after: float | None = None,
        echo: bool = False,
    ) -> None:
        """Shortcut for ``fail_next("create", ...)``."""
        self.fail_next(
            "create",
            status,
            count,
            message=message,
            error_status=error_status,
            retry_after=retry_after,
            echo=echo,
        )

    def lose_next_create_answer(self, count: int = 1, *, status: int | None = None) -> None:
        """Carry out the next ``count`` creates (the machine is made and boots), then lose
        the answer, as after a network fault: the connection is dropped, or, with
        ``status`` (502, 504...), an error answer stands in for the real one, as from a proxy
        that gave up. Either way the client cannot know that the machine exists."""
        if status is None:
            self.hang_up_next("create", count)
            return
        stand_in = status
        self._inject(
            "create",
            count,
            lambda: _Answer(0, after=_error(stand_in, f"upstream error ({stand_in})")),
        )

    def hang_up_next(self, action: Action = "create", count: int = 1) -> None:
        """Carry out the next ``count`` requests of ``action``, then drop the connection
        without answering: the client cannot know whether it worked."""
        self._inject(action, count, lambda: _Answer(0, hang_up=True))

    def slow_next(self, action: Action, seconds: float, count: int = 1) -> None:
        """Carry out the next ``count`` requests of ``action`` at once, but hold each answer
        back for ``seconds`` (a slow API, or a client that gives up while waiting)."""
        self._inject(action, count, lambda: _Answer(0, delay=seconds))

    def never_dial_in(self, count: int = 1, *, mode: Literal["sleep", "nothing"] = "sleep") -> None:
        """Make the next ``count`` created machines never dial in.

        ``"sleep"`` starts a process that only sleeps instead of the machine's command;
        ``"nothing"`` starts no process (the machine still says ``started``).
        """
        if mode not in ("sleep", "nothing"):
            raise ValueError(f"mode must be 'sleep' or 'nothing', got {mode!r}")
        with self._lock:
            self._silent.extend([mode] * count)

    def fail_launch_next(self, count: int = 1, *, linger: float = 5.0) -> None:
        """Make the next ``count`` created machines fail to launch: no process starts, the
        machine reads ``launch_failed`` for ``linger`` seconds, then ``destroyed``."""
        with self._lock:
            self._silent.extend([f"fail:{linger}"] * count)

    def crash(self, machine_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the machine's process group, as if its runner crashed."""
        with self._lock:
            machine = self._machines[machine_id]
            proc = machine.proc
            if proc is not None and proc.poll() is None:
                _signal_group(proc, sig)

    # -- inspection ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, action: Action) -> list[RecordedRequest]:
        """The recorded requests of one action."""
        with self._lock:
            return [r for r in self._requests if r.action == action]

    def machines(self, *, include_destroyed: bool = True) -> list[EmulatedMachine]:
        """Snapshots of the machines, in creation order (destroyed ones too, however long
        ago, unless ``include_destroyed`` is false)."""
        with self._lock:
            return [
                self._snapshot(m)
                for m in self._machines.values()
                if include_destroyed or m.state != "destroyed"
            ]

    def live_machines(self) -> list[EmulatedMachine]:
        """Snapshots of the machines not destroyed yet."""
        return self.machines(include_destroyed=False)

    def machine(self, machine_id: str) -> EmulatedMachine:
        """Snapshot of one machine; ``KeyError`` if the emulator never made it."""
        with self._lock:
            return self._snapshot(self._machines[machine_id])

    def logs(self, machine_id: str) -> str:
        """What the machine's process wrote to stdout and stderr so far."""
        if self._logdir is None:
            return ""
        path = os.path.join(self._logdir, f"{machine_id}.log")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` is true; it is re-checked on every state change and
        request. Raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met within {timeout}s: {self!r}")
                self._cond.wait(min(remaining, 0.5))

    def _snapshot(self, machine: _Machine) -> EmulatedMachine:
        return EmulatedMachine(
            id=machine.id,
            name=machine.name,
            app=machine.app,
            region=machine.region,
            instance_id=machine.version,
            private_ip=self.private_ip,
            state=machine.state,
            config=_redact_config(machine.config),
            argv=machine.argv,
            pid=machine.proc.pid if machine.proc is not None else None,
            exit_code=machine.exit_code,
            env_keys=machine.env_keys,
            events=tuple(copy.deepcopy(machine.events)),
            stop_request=dict(machine.stop_request) if machine.stop_request else None,
        )

    # -- HTTP ------------------------------------------------------------------------------

    def _serve(self, handler: Handler, method: str) -> None:
        arrived = self._clock()  # rate limits count arrivals, as at Fly's edge
        url = urlsplit(handler.path)
        pairs = tuple(parse_qsl(url.query, keep_blank_values=True))
        query: dict[str, str] = {}
        for key, value in pairs:
            query[key] = f"{query[key]},{value}" if key in query else value
        raw = handler.read_body()
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                bad_json = True
        authorized = self._authorized(handler.headers.get("Authorization"))
        action, answer = "", _error(404, "not found")
        try:
            if not authorized:
                answer = _error(401, "unauthorized")
                action = self._action_of(method, url.path)
            elif bad_json:
                answer = _error(400, "request body is not valid JSON")
            else:
                action, answer = self._route(method, url.path, pairs, query, body, arrived)
        except Exception as exc:  # an emulator bug must not hang the client
            answer = _error(500, f"emulator error: {type(exc).__name__}: {exc}")
        if not answer.hang_up and answer.status:
            wrong = api.problems(answer.doc, _answer_schema(action, answer))
            if wrong:  # an emulator bug: say so rather than serve an unpublished answer
                answer = _error(500, f"emulator answer breaks the published schema: {wrong}")
        request_id = _fly_id()
        with self._cond:
            self._requests.append(
                RecordedRequest(
                    method=method,
                    path=url.path,
                    query=query,
                    body=_redact_body(body),
                    status=answer.status,
                    authorized=authorized,
                    action=action,
                    query_pairs=pairs,
                    answer=None if answer.hang_up else _redact_answer(answer.doc),
                    request_id=request_id,
                )
            )
            self._cond.notify_all()
        if answer.hang_up:
            handler.hang_up()
            return
        headers = {"fly-request-id": request_id, **answer.headers}
        try:
            handler.send_json(answer.status, answer.doc if answer.doc is not None else {}, headers)
        except OSError:
            handler.close_connection = True

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        accepted = {f"Bearer {self.token}", f"FlyV1 {self.token}"}
        if self.token.startswith("FlyV1 "):
            accepted.add(self.token)
        return header.strip() in accepted

    @staticmethod
    def _action_of(method: str, path: str) -> str:
        parts = [p for p in path.split("/") if p]
        if len(parts) < 4 or parts[:2] != ["v1", "apps"] or parts[3] != "machines":
            return ""
        rest = parts[4:]
        if not rest:
            return {"POST": "create", "GET": "list"}.get(method, "")
        if len(rest) == 1:
            return {"GET": "get", "DELETE": "delete"}.get(method, "")
        if len(rest) == 2 and rest[1] in ("wait", "stop"):
            return rest[1] if (method, rest[1]) in (("GET", "wait"), ("POST", "stop")) else ""
        return ""

    def _rate_limited(
        self, action: str, app: str, machine_id: str | None, now: float
    ) -> _Answer | None:
        """A 429 if this request is past the published rate limit of its action."""
        limits = self.rate_limits
        if limits is None:
            return None
        if action in ("create", "list"):
            limit = limits.create if action == "create" else limits.list_machines
            key = (action, app)
        else:
            limit = limits.get_machine if action == "get" else limits.per_machine
            key = (action, f"{app}/{machine_id}")
        with self._buckets_lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(limit, now)
            wait = bucket.take(now)
        if not wait:
            return None
        scope = "app" if action in ("create", "list") else "machine"
        answer = _error(
            429,
            f"rate limit exceeded: at most {limit.per_second:g} {action} requests a second "
            f"per {scope} (bursts of {limit.burst})",
        )
        if self.retry_after:
            answer.headers["Retry-After"] = str(max(1, round(wait)))
        return answer

    def _route(
        self,
        method: str,
        path: str,
        pairs: Sequence[tuple[str, str]],
        query: Mapping[str, str],
        body: Any,
        arrived: float,
    ) -> tuple[str, _Answer]:
        action = self._action_of(method, path)
        if not action:
            return "", _error(404, f"no route for {method} {path}")
        parts = [p for p in path.split("/") if p]
        app = parts[2]
        if self.app is not None and app != self.app:
            return action, _error(404, f"app not found: {app}")
        machine_id = parts[4] if len(parts) > 4 else None
        limited = self._rate_limited(action, app, machine_id, arrived)
        if limited is not None:
            return action, limited
        wrong = api.query_problems(action, pairs)
        schema = {"create": "CreateMachineRequest", "stop": "StopRequest"}.get(action)
        if body is not None and schema is None:
            wrong.append(f"{method} {action} takes no request body")
        elif schema is not None and (body is not None or action == "create"):
            wrong += api.problems(body, schema)
        if wrong:
            return action, _error(400, "; ".join(wrong))
        with self._lock:
            if self._closed:
                return action, _error(503, "emulator is closing")
            injected = self._injected[action].popleft() if self._injected[action] else None
        if injected is not None and not injected.after_work:
            if injected.echo and isinstance(injected.doc, dict):
                quoted = json.dumps(body, separators=(",", ":"))
                doc = {**injected.doc, "error": f"{injected.doc['error']}: {quoted}"}
                return action, _Answer(injected.status, doc, headers=injected.headers)
            return action, injected
        if action == "create":
            answer = self._create(app, body)
        elif action == "list":
            answer = self._list(app, pairs, query)
        else:
            assert machine_id is not None
            with self._lock:
                machine = self._machines.get(machine_id)
                if machine is not None and (machine.app != app or self._expired(machine)):
                    machine = None
            if machine is None:
                answer = _error(404, "machine not found")
            elif action == "get":
                with self._lock:
                    answer = _Answer(200, machine.to_json(self.private_ip))
            elif action == "wait":
                answer = self._wait(machine, pairs, query)
            elif action == "stop":
                answer = self._stop(machine, body)
            else:
                answer = self._delete(machine, query)
        if injected is not None and injected.hang_up:  # the work is done; nobody is told
            return action, injected
        if injected is not None and injected.after is not None:
            return action, injected.after
        if injected is not None and injected.delay > 0:
            deadline = time.monotonic() + injected.delay
            with self._cond:
                while not self._closed and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
        return action, answer

    def _expired(self, machine: _Machine) -> bool:
        """Whether a destroyed machine is past ``destroyed_ttl`` (lock held)."""
        return (
            machine.destroyed_at is not None
            and self._clock() - machine.destroyed_at > self.destroyed_ttl
        )

    # -- actions ---------------------------------------------------------------------------

    def _create(self, app: str, body: dict[str, Any]) -> _Answer:
        config = body.get("config")
        if not isinstance(config, dict):
            return _error(400, "config is required")
        image = config.get("image")
        if not isinstance(image, str) or not image:
            return _error(400, "config.image is required")
        sizing = api.guest_problem(config.get("guest") or {})
        if sizing is not None:
            return _error(422, sizing)
        name = body.get("name") or ""
        machine = _Machine(
            app=app,
            name=name,
            region=body.get("region") or self.region,
            config=copy.deepcopy(config),
        )
        if not machine.name:
            machine.name = f"emulated-{machine.id}"
        with self._cond:
            for other in self._machines.values():
                if other.app == app and other.name == machine.name and other.state != "destroyed":
                    return _error(
                        409,
                        f"unique machine name violation: machine {other.id} already exists "
                        f"with name {machine.name!r}",
                        "name_taken",
                    )
            self._machines[machine.id] = machine
            machine.event("launch", "created", "user")
            answer = _Answer(200, machine.to_json(self.private_ip))  # as created, not started
            if not body.get("skip_launch"):
                silent = self._silent.popleft() if self._silent else None
                self._launch(machine, silent, skip_secrets=bool(body.get("skip_secrets")))
            self._cond.notify_all()
            return answer

    def _list(
        self, app: str, pairs: Sequence[tuple[str, str]], query: Mapping[str, str]
    ) -> _Answer:
        include_deleted = api.truthy(query.get("include_deleted"))
        summary = api.truthy(query.get("summary"))
        states = set(api.values(pairs, "state"))
        region = query.get("region")
        wanted = {k[len("metadata.") :]: v for k, v in pairs if k.startswith("metadata.")}
        limit = int(query["limit"]) if "limit" in query else None
        cursor = query.get("cursor")
        if cursor is not None and limit is None:
            return _error(400, "cursor requires limit")
        with self._lock:
            docs: list[dict[str, Any]] = []
            past_cursor = cursor is None
            more = False
            for machine in self._machines.values():
                if not past_cursor:
                    past_cursor = machine.id == cursor
                    continue
                if machine.app != app or self._expired(machine):
                    continue
                if machine.state == "destroyed" and not include_deleted:
                    continue
                if (states and machine.state not in states) or (
                    region and machine.region != region
                ):
                    continue
                metadata = machine.config.get("metadata") or {}
                if any(metadata.get(k) != v for k, v in wanted.items()):
                    continue
                if limit is not None and len(docs) >= limit:
                    more = True
                    break
                docs.append(machine.to_json(self.private_ip, summary=summary))
        headers = {"fly-next-cursor": docs[-1]["id"]} if more and docs else None
        return _Answer(200, docs, headers=headers)

    def _wait(
        self, machine: _Machine, pairs: Sequence[tuple[str, str]], query: Mapping[str, str]
    ) -> _Answer:
        targets = api.values(pairs, "state") or ["started"]
        version = query.get("version") or query.get("instance_id")
        if "stopped" in targets and not version:
            return _error(
                400, "version (or instance_id) is required when waiting for the stopped state"
            )
        if version and version != machine.version:
            return _error(400, f"machine {machine.id} has no version {version!r}")
        timeout = int(query.get("timeout", "60"))
        if not 1 <= timeout <= 60:
            return _error(400, f"invalid timeout {timeout}: wait at most 60 seconds")

        def reached() -> bool:
            if "settled" in targets and machine.state not in _TRANSITIONAL:
                return True
            return machine.state in targets

        deadline = time.monotonic() + timeout
        with self._cond:
            while not reached():
                if self._closed:
                    return _error(503, "emulator is closing")
                if machine.state == "destroyed":
                    return _error(
                        400, f"machine is destroyed; it will never be {','.join(targets)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _error(
                        408, f"deadline_exceeded: machine did not reach {','.join(targets)}"
                    )
                self._cond.wait(remaining)
            doc = {
                "ok": True,
                "state": machine.state,
                "event_id": machine.events[0]["id"] if machine.events else "",
                "version": machine.version,
            }
            return _Answer(200, doc)

    def _stop(self, machine: _Machine, body: Any) -> _Answer:
        opts = body if isinstance(body, dict) else {}
        signame = str(opts.get("signal") or "SIGINT")
        sig = signal.Signals[signame]
        grace = _duration(opts.get("timeout"))
        if grace is None:
            return _error(400, f"invalid stop timeout {opts.get('timeout')!r}: a duration like 10s")
        with self._cond:
            if machine.state == "destroyed":
                return _error(400, "machine is destroyed")
            machine.stop_request = {"signal": signame, "timeout": grace}
            proc = machine.proc
            if proc is not None and proc.poll() is None:
                machine.event("stop", "stopping", "user")
                _signal_group(proc, sig)
                timer = threading.Timer(grace, _signal_group, args=(proc, signal.SIGKILL))
                timer.daemon = True
                machine.kill_timer = timer
                timer.start()
            elif proc is None and machine.state not in ("stopped", "destroyed"):
                self._finish(machine, None)
            self._cond.notify_all()
        return _Answer(200, {})

    def _delete(self, machine: _Machine, query: Mapping[str, str]) -> _Answer:
        force = api.truthy(query.get("force")) or api.truthy(query.get("kill"))
        with self._cond:
            if machine.state == "destroyed":
                return _error(404, "machine not found")
            if not force and machine.state not in ("created", "stopped", "failed", "launch_failed"):
                return _error(
                    412,
                    f"failed_precondition: machine is {machine.state}, refusing to destroy "
                    "without force=true",
                )
            self._kill(machine)
            self._destroyed(machine, "user")
            self._cond.notify_all()
        return _Answer(200, {})

    # -- processes -------------------------------------------------------------------------

    def _command(self, config: Mapping[str, Any]) -> list[str]:
        init = config.get("init")
        init = init if isinstance(init, dict) else {}
        exec_ = init.get("exec")
        if exec_:
            argv = [str(a) for a in exec_]
        else:
            entry = init.get("entrypoint")
            cmd = init.get("cmd")
            argv = [str(a) for a in (entry if entry is not None else self.image_entrypoint)]
            argv += [str(a) for a in (cmd if cmd is not None else self.image_cmd)]
        if argv and _PYTHON_RE.match(argv[0]):
            argv[0] = self.python
        return argv

    def _machine_env(self, machine: _Machine, *, skip_secrets: bool) -> dict[str, str]:
        env: dict[str, str] = {"PATH": os.environ.get("PATH", os.defpath)}
        env.update(self.extra_env)
        if not skip_secrets:
            env.update(self.secrets)
        env.update(machine.config.get("env") or {})
        guest = machine.config.get("guest") or {}
        env.update(
            {
                "FLY_APP_NAME": machine.app,
                "FLY_MACHINE_ID": machine.id,
                "FLY_ALLOC_ID": machine.id,
                "FLY_MACHINE_VERSION": machine.version,
                "FLY_REGION": machine.region,
                "FLY_IMAGE_REF": str(machine.config.get("image", "")),
                "FLY_PRIVATE_IP": self.private_ip,
                "FLY_VM_MEMORY_MB": str(guest.get("memory_mb", 256)),
            }
        )
        return env

    def _launch(self, machine: _Machine, silent: str | None, *, skip_secrets: bool) -> None:
        """Start the machine's process (called with the lock held)."""
        assert self._logdir is not None
        if silent == "nothing":
            machine.event("start", "started", "flyd")
            return
        if silent is not None and silent.startswith("fail:"):
            machine.event("launch", "launch_failed", "flyd")
            timer = threading.Timer(float(silent[5:]), self._end_failed_launch, args=(machine,))
            timer.daemon = True
            machine.kill_timer = timer
            timer.start()
            return
        if silent == "sleep":
            argv = [self.python, "-c", _SLEEPER.format(parent=os.getpid())]
        else:
            argv = self._command(machine.config)
        env = self._machine_env(machine, skip_secrets=skip_secrets)
        machine.argv = tuple(argv)
        machine.env_keys = frozenset(env)
        log_path = os.path.join(self._logdir, f"{machine.id}.log")
        with open(log_path, "wb") as log:
            try:
                if not argv:
                    raise FileNotFoundError("the machine has no command")
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=self.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                log.write(f"emulator: could not start {argv!r}: {exc}\n".encode())
                machine.event("start", "started", "flyd")
                self._finish(machine, 127)
                return
        machine.proc = proc
        machine.event("start", "started", "flyd")
        watcher = threading.Thread(
            target=self._watch,
            args=(machine, proc),
            name=f"flame-fly-emulator-{machine.id}",
            daemon=True,
        )
        machine.watcher = watcher
        watcher.start()

    def _watch(self, machine: _Machine, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        with self._cond:
            if machine.kill_timer is not None:
                machine.kill_timer.cancel()
            self._finish(machine, code)
            self._cond.notify_all()

    def _finish(self, machine: _Machine, code: int | None) -> None:
        """Record the end of the machine's process (lock held)."""
        if code is not None:
            machine.exit_code = code
        if machine.state in ("stopped", "destroyed"):
            return
        # Go's omitempty: a zero exit code, or a false flag, is left out of the event.
        exit_event: dict[str, Any] = {"exited_at": _now_iso()}
        if code is not None and code > 0:
            exit_event["exit_code"] = code
            exit_event["guest_exit_code"] = code
        elif code is not None and code < 0:  # killed by a signal
            exit_event["signal"] = -code
            exit_event["guest_signal"] = -code
        if machine.state == "stopping":
            exit_event["requested_stop"] = True
        machine.event("exit", "stopped", "flyd", {"exit_event": exit_event})
        if machine.auto_destroy:
            self._destroyed(machine, "flyd")

    def _end_failed_launch(self, machine: _Machine) -> None:
        with self._cond:
            if machine.state == "launch_failed":
                self._destroyed(machine, "flyd")
                self._cond.notify_all()

    def _destroyed(self, machine: _Machine, source: str) -> None:
        """Mark the machine destroyed (lock held)."""
        machine.event("destroy", "destroyed", source)
        machine.destroyed_at = self._clock()

    def _kill(self, machine: _Machine) -> None:
        """SIGKILL the machine's process group (lock held)."""
        if machine.kill_timer is not None:
            machine.kill_timer.cancel()
        proc = machine.proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)


def _answer_schema(action: str, answer: _Answer) -> api.Schema:
    if answer.status >= 400:
        return api.SCHEMAS["ErrorResponse"]
    if action == "list":
        return {"type": "array", "items": {"$ref": "Machine"}}
    if action in ("create", "get"):
        return api.SCHEMAS["Machine"]
    if action == "wait":
        return api.SCHEMAS["WaitMachineResponse"]
    return {"type": "object", "additionalProperties": False}  # "OK, empty content"


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _duration(value: Any) -> float | None:
    """A Go duration string ("10s", "1m30s", "500ms") in seconds; absent means 5 s."""
    if value is None or value == "":
        return 5.0
    if not isinstance(value, str):
        return None
    if value.isdigit():  # a bare number of seconds
        return float(value)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def _redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(config))
    env = out.get("env")
    if isinstance(env, dict) and "FLAME_PARENT" in env:
        env["FLAME_PARENT"] = REDACTED
    return out


def _redact_body(body: Any) -> Any:
    if isinstance(body, dict) and isinstance(body.get("config"), dict):
        out = dict(body)
        out["config"] = _redact_config(body["config"])
        return out
    return copy.deepcopy(body)


def _redact_answer(doc: Any) -> Any:
    if isinstance(doc, list):
        return [_redact_body(item) for item in doc]
    return _redact_body(doc)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
