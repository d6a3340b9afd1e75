"""``FlyMachinesEmulator``: a local stand-in for the Fly Machines API that boots real runners.

This module owns an in-process HTTP server (stdlib ``ThreadingHTTPServer`` on 127.0.0.1,
a free port, in a background thread) that answers enough of the Fly Machines API for
:class:`flame.FlyBackend` and for applications that want to test their pools offline:

==========  ==================================================  ==============================
create      ``POST   /v1/apps/{app}/machines``                  starts the machine's command
list        ``GET    /v1/apps/{app}/machines``                  live machines (or all, with
                                                                ``include_deleted=true``)
get         ``GET    /v1/apps/{app}/machines/{id}``             also destroyed machines
wait        ``GET    /v1/apps/{app}/machines/{id}/wait``        ``state``, ``timeout`` (<= 60)
stop        ``POST   /v1/apps/{app}/machines/{id}/stop``        ``signal`` (default SIGINT),
                                                                then SIGKILL after ``timeout``
delete      ``DELETE /v1/apps/{app}/machines/{id}``             ``force=true`` kills a running
                                                                machine; otherwise 412
==========  ==================================================  ==============================

Every request needs ``Authorization: Bearer <token>`` (or ``FlyV1 <token>``); anything else
gets 401. Errors are JSON ``{"error": "..."}`` as on Fly.

A created machine REALLY runs: its command (``config.init.exec``, or ``entrypoint + cmd``,
by default ``python -m flame runner``, with a leading ``python`` replaced by ``python=``,
``sys.executable`` by default) is started as a local process in its own session, with an
environment made of ``PATH``, ``extra_env`` (what "the image" holds, such as
``PYTHONPATH``), ``config.env`` and the ``FLY_*`` variables Fly sets (``FLY_APP_NAME``,
``FLY_MACHINE_ID``, ``FLY_REGION``, ``FLY_IMAGE_REF``, ``FLY_PRIVATE_IP=127.0.0.1``...). Its
output goes to a log file (:meth:`FlyMachinesEmulator.logs`). States follow Fly's:
``started`` while the process runs, ``stopped`` when it exits, then ``destroyed`` when
``auto_destroy`` is set; a forced delete kills the process group and destroys at once.

Failures can be injected: HTTP answers for the next requests of an action
(:meth:`~FlyMachinesEmulator.fail_next`), a dropped connection after the machine was made
(:meth:`~FlyMachinesEmulator.hang_up_next`), a slow answer
(:meth:`~FlyMachinesEmulator.slow_next`), and machines that never dial in
(:meth:`~FlyMachinesEmulator.never_dial_in`). Every request is recorded
(:attr:`~FlyMachinesEmulator.requests`), with the runner secret (``FLAME_PARENT``) blanked.

Differences from Fly worth knowing: one host, no real isolation (machines share this
computer, and every machine's private IP is 127.0.0.1), no regions or capacity, no
``start``/``update``/leases, and ``wait?state=stopped`` is also satisfied by a destroyed
machine. POSIX only (process groups). :meth:`~FlyMachinesEmulator.close` kills every
process it started.
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

from ._http import EmulatorServer, Handler

__all__ = ["EmulatedMachine", "FlyMachinesEmulator", "RecordedRequest"]

Action = Literal["create", "list", "get", "wait", "stop", "delete"]
_ACTIONS: tuple[str, ...] = ("create", "list", "get", "wait", "stop", "delete")
_WAITABLE = ("started", "stopped", "suspended", "destroyed")
_PYTHON_RE = re.compile(r"^python(3(\.\d+)?)?$")
REDACTED = "<redacted>"

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
    query: Mapping[str, str]
    #: The JSON body, with ``config.env.FLAME_PARENT`` replaced by ``"<redacted>"``.
    body: Any
    status: int
    #: Whether the request carried the right token.
    authorized: bool
    #: ``"create"``, ``"list"``, ``"get"``, ``"wait"``, ``"stop"``, ``"delete"`` or ``""``.
    action: str


@dataclass(frozen=True)
class EmulatedMachine:
    """A snapshot of one emulated machine (taken by :meth:`FlyMachinesEmulator.machine`)."""

    id: str
    name: str
    app: str
    region: str
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

    @property
    def alive(self) -> bool:
        """Whether the machine is not destroyed yet."""
        return self.state != "destroyed"

    @property
    def metadata(self) -> Mapping[str, Any]:
        """``config.metadata``."""
        meta = self.config.get("metadata")
        return meta if isinstance(meta, Mapping) else {}


class _Machine:
    """Mutable machine record; guarded by the emulator's lock."""

    def __init__(self, app: str, name: str, region: str, config: dict[str, Any]) -> None:
        self.id = secrets.token_hex(7)
        self.instance_id = secrets.token_hex(13).upper()
        self.app = app
        self.name = name
        self.region = region
        self.config = config
        self.state = "created"
        self.created_at = _now_iso()
        self.updated_at = self.created_at
        self.events: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: tuple[str, ...] | None = None
        self.env_keys: frozenset[str] = frozenset()
        self.exit_code: int | None = None
        self.watcher: threading.Thread | None = None
        self.kill_timer: threading.Timer | None = None

    @property
    def auto_destroy(self) -> bool:
        return bool(self.config.get("auto_destroy"))

    def event(self, kind: str, status: str, source: str, request: Any = None) -> None:
        entry: dict[str, Any] = {
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

    def to_json(self, private_ip: str) -> dict[str, Any]:
        image = str(self.config.get("image", ""))
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "private_ip": private_ip,
            "config": copy.deepcopy(self.config),
            "image_ref": {"registry": "emulator", "repository": image, "tag": "latest"},
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "events": copy.deepcopy(self.events),
        }


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
    ) -> None:
        self.status = status
        self.doc = doc
        self.headers = dict(headers or {})
        self.hang_up = hang_up
        self.echo = echo  # append the request body to the error message
        self.delay = delay

    @property
    def after_work(self) -> bool:
        """Whether this injected answer applies after the request was carried out."""
        return self.hang_up or self.delay > 0


def _error(status: int, message: str) -> _Answer:
    return _Answer(status, {"error": message})


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
        image_entrypoint: the image's ENTRYPOINT, put before ``init.cmd``.
        image_cmd: the image's CMD, used when ``init`` names no command.
        region: region reported for machines (and ``FLY_REGION``).
        private_ip: ``private_ip`` and ``FLY_PRIVATE_IP`` of every machine.
    """

    def __init__(
        self,
        *,
        token: str = "emulator-token",
        app: str | None = None,
        python: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        image_entrypoint: Sequence[str] = (),
        image_cmd: Sequence[str] = ("python", "-m", "flame", "runner"),
        region: str = "emu",
        private_ip: str = "127.0.0.1",
    ) -> None:
        self.token = token
        self.app = app
        self.python = python or sys.executable
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.extra_env = dict(extra_env or {})
        self.image_entrypoint = list(image_entrypoint)
        self.image_cmd = list(image_cmd)
        self.region = region
        self.private_ip = private_ip
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._machines: dict[str, _Machine] = {}
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
                    machine.event("destroy", "destroyed", "emulator")
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
        retry_after: float | None = None,
        echo: bool = False,
    ) -> None:
        """Answer the next ``count`` requests of ``action`` with ``status`` (nothing done).

        ``retry_after`` adds a ``Retry-After`` header (seconds). ``echo`` appends the
        request's body to the error message, as a validation error quoting the rejected
        config would (the client must not show it: it holds the runner's environment).
        """
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        text = message or f"injected failure ({status})"
        self._inject(
            action, count, lambda: _Answer(status, {"error": text}, headers=headers, echo=echo)
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
        retry_after: float | None = None,
        echo: bool = False,
    ) -> None:
        """Shortcut for ``fail_next("create", ...)``."""
        self.fail_next("create", status, count, message=message, retry_after=retry_after, echo=echo)

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
        """Snapshots of the machines, in creation order."""
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
            instance_id=machine.instance_id,
            private_ip=self.private_ip,
            state=machine.state,
            config=_redact_config(machine.config),
            argv=machine.argv,
            pid=machine.proc.pid if machine.proc is not None else None,
            exit_code=machine.exit_code,
            env_keys=machine.env_keys,
            events=tuple(copy.deepcopy(machine.events)),
        )

    # -- HTTP ------------------------------------------------------------------------------

    def _serve(self, handler: Handler, method: str) -> None:
        url = urlsplit(handler.path)
        query = dict(parse_qsl(url.query))
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
                action, answer = self._route(method, url.path, query, body)
        except Exception as exc:  # an emulator bug must not hang the client
            answer = _error(500, f"emulator error: {type(exc).__name__}: {exc}")
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
                )
            )
            self._cond.notify_all()
        if answer.hang_up:
            handler.hang_up()
            return
        try:
            handler.send_json(
                answer.status, answer.doc if answer.doc is not None else {}, answer.headers
            )
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

    def _route(
        self, method: str, path: str, query: Mapping[str, str], body: Any
    ) -> tuple[str, _Answer]:
        action = self._action_of(method, path)
        if not action:
            return "", _error(404, f"no route for {method} {path}")
        parts = [p for p in path.split("/") if p]
        app = parts[2]
        if self.app is not None and app != self.app:
            return action, _error(404, f"app not found: {app}")
        with self._lock:
            if self._closed:
                return action, _error(503, "emulator is closing")
            injected = self._injected[action].popleft() if self._injected[action] else None
        if injected is not None and not injected.after_work:
            if injected.echo and isinstance(injected.doc, dict):
                quoted = json.dumps(body, separators=(",", ":"))
                return action, _Answer(
                    injected.status,
                    {"error": f"{injected.doc['error']}: {quoted}"},
                    headers=injected.headers,
                )
            return action, injected
        if action == "create":
            answer = self._create(app, body)
        elif action == "list":
            answer = self._list(app, query)
        else:
            machine_id = parts[4]
            with self._lock:
                machine = self._machines.get(machine_id)
            if machine is None or machine.app != app:
                answer = _error(404, "machine not found")
            elif action == "get":
                with self._lock:
                    answer = _Answer(200, machine.to_json(self.private_ip))
            elif action == "wait":
                answer = self._wait(machine, query)
            elif action == "stop":
                answer = self._stop(machine, body)
            else:
                answer = self._delete(machine, query)
        if injected is not None and injected.hang_up:  # the work is done; nobody is told
            return action, injected
        if injected is not None and injected.delay > 0:
            deadline = time.monotonic() + injected.delay
            with self._cond:
                while not self._closed and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
        return action, answer

    # -- actions ---------------------------------------------------------------------------

    def _create(self, app: str, body: Any) -> _Answer:
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        config = body.get("config")
        if not isinstance(config, dict):
            return _error(400, "config is required")
        image = config.get("image")
        if not isinstance(image, str) or not image:
            return _error(400, "config.image is required")
        guest = config.get("guest", {})
        if not isinstance(guest, dict):
            return _error(400, "config.guest must be an object")
        cpus = guest.get("cpus", 1)
        memory = guest.get("memory_mb", 256)
        if not isinstance(cpus, int) or cpus < 1:
            return _error(400, f"invalid guest.cpus: {cpus!r}")
        if not isinstance(memory, int) or memory < 256 or memory % 256:
            return _error(400, f"invalid guest.memory_mb: {memory!r} (multiples of 256)")
        env = config.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            return _error(400, "config.env must map strings to strings")
        name = body.get("name")
        region = body.get("region") or self.region
        machine = _Machine(
            app=app,
            name=name if isinstance(name, str) and name else "",
            region=str(region),
            config=copy.deepcopy(config),
        )
        if not machine.name:
            machine.name = f"emulated-{machine.id}"
        with self._cond:
            self._machines[machine.id] = machine
            machine.event("launch", "created", "user")
            if not body.get("skip_launch"):
                silent = self._silent.popleft() if self._silent else None
                self._launch(machine, silent)
            self._cond.notify_all()
            return _Answer(200, machine.to_json(self.private_ip))

    def _list(self, app: str, query: Mapping[str, str]) -> _Answer:
        include_deleted = query.get("include_deleted", "").lower() in ("true", "1")
        with self._lock:
            docs = [
                m.to_json(self.private_ip)
                for m in self._machines.values()
                if m.app == app and (include_deleted or m.state != "destroyed")
            ]
        return _Answer(200, docs)

    def _wait(self, machine: _Machine, query: Mapping[str, str]) -> _Answer:
        target = query.get("state", "started")
        if target not in _WAITABLE:
            return _error(400, f"invalid state {target!r}; expected one of {_WAITABLE}")
        try:
            timeout = float(query.get("timeout", "60").rstrip("s"))
        except ValueError:
            return _error(400, f"invalid timeout {query.get('timeout')!r}")
        if not 0 < timeout <= 60:
            return _error(400, "timeout must be between 1 and 60 seconds")

        def reached() -> bool:
            if target == "stopped":
                return machine.state in ("stopped", "destroying", "destroyed")
            return machine.state == target

        deadline = time.monotonic() + timeout
        with self._cond:
            while not reached():
                if self._closed:
                    return _error(503, "emulator is closing")
                if machine.state == "destroyed":
                    return _error(400, f"machine is destroyed; it will never be {target}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _error(408, f"deadline_exceeded: machine did not reach {target}")
                self._cond.wait(remaining)
            return _Answer(200, {"ok": True})

    def _stop(self, machine: _Machine, body: Any) -> _Answer:
        opts = body if isinstance(body, dict) else {}
        signame = str(opts.get("signal") or "SIGINT").upper()
        if not signame.startswith("SIG"):
            signame = f"SIG{signame}"
        sig = getattr(signal, signame, None)
        if not isinstance(sig, signal.Signals):
            return _error(400, f"invalid signal {signame!r}")
        grace = _seconds(opts.get("timeout"), default=5.0)
        with self._cond:
            if machine.state == "destroyed":
                return _error(400, "machine is destroyed")
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
        return _Answer(200, {"ok": True})

    def _delete(self, machine: _Machine, query: Mapping[str, str]) -> _Answer:
        force = query.get("force", "").lower() in ("true", "1")
        with self._cond:
            if machine.state == "destroyed":
                return _error(404, "machine not found")
            if not force and machine.state not in ("created", "stopped"):
                return _error(
                    412,
                    f"failed_precondition: machine is {machine.state}, refusing to destroy "
                    "without force=true",
                )
            self._kill(machine)
            machine.event("destroy", "destroyed", "user")
            self._cond.notify_all()
        return _Answer(200, {"ok": True})

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

    def _machine_env(self, machine: _Machine) -> dict[str, str]:
        env: dict[str, str] = {"PATH": os.environ.get("PATH", os.defpath)}
        env.update(self.extra_env)
        env.update(machine.config.get("env") or {})
        guest = machine.config.get("guest") or {}
        env.update(
            {
                "FLY_APP_NAME": machine.app,
                "FLY_MACHINE_ID": machine.id,
                "FLY_ALLOC_ID": machine.id,
                "FLY_MACHINE_VERSION": machine.instance_id,
                "FLY_REGION": machine.region,
                "FLY_IMAGE_REF": str(machine.config.get("image", "")),
                "FLY_PRIVATE_IP": self.private_ip,
                "FLY_VM_MEMORY_MB": str(guest.get("memory_mb", 256)),
            }
        )
        return env

    def _launch(self, machine: _Machine, silent: str | None) -> None:
        """Start the machine's process (called with the lock held)."""
        assert self._logdir is not None
        if silent == "nothing":
            machine.event("start", "started", "flyd")
            return
        if silent == "sleep":
            argv = [self.python, "-c", _SLEEPER.format(parent=os.getpid())]
        else:
            argv = self._command(machine.config)
        env = self._machine_env(machine)
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
        exit_event = {
            "exit_code": code if code is not None else 0,
            "oom_killed": False,
            "requested_stop": machine.state == "stopping",
        }
        machine.event("exit", "stopped", "flyd", {"exit_event": exit_event})
        if machine.auto_destroy:
            machine.event("destroy", "destroyed", "flyd")

    def _kill(self, machine: _Machine) -> None:
        """SIGKILL the machine's process group (lock held)."""
        if machine.kill_timer is not None:
            machine.kill_timer.cancel()
        proc = machine.proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _seconds(value: Any, *, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.rstrip("s"))
        except ValueError:
            return default
    return default


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


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
