"""``DockerBackend``: each runner is a container of the app's image on a Docker Engine.

What this module owns: the conversation with the Docker Engine API (a unix socket or plain
``tcp://``, through httpx; optional extra ``flame-py[docker]``): finding where the parent
runs, creating, starting, watching and removing one container per runner, and removing
containers whose parent is gone. Nothing else.

**Where the parent runs** is found once per backend, on first use, with a few *synchronous*
requests (``Backend.listen_host`` is synchronous, and the addresses must be known before a
runner's ``FLAME_PARENT`` is written): the parent's own container id is looked for in
``/proc/self/cgroup``, ``/proc/self/mountinfo`` and the host name, and each candidate is
asked of the engine. A parent that is a running container of that engine gives the default
image (its exact image id) and network (its own), and runners dial its address on that
network. A parent outside the engine's containers must name the image; with
``network="host"`` runners dial it on loopback, on a bridge network they dial the
network's gateway (the host's side of the bridge), where the listener binds.

Life of a runner container::

    boot()   create (AutoRemove, labels naming pool, runner and parent)
             -> wait(condition=next-exit) and attach(logs, stream) registered: their
                answers' headers are in before start, so neither the exit code nor the
                output can be lost to AutoRemove
             -> start
             a lost create answer: the container is looked up by its runner label and
             adopted; any failure or cancellation: the container is removed
    wait()   the wait answer's StatusCode, as text (an OOM kill is looked up in the
             engine's events); after a broken stream, inspect until it is gone
    stop()   DELETE ?force=1; "no such container" is success; idempotent, and it finishes
             even if the caller is cancelled (aclose waits for it)

Containers of parents that no longer exist (a SIGKILLed parent leaves a created container,
or one whose runner hangs) are removed by :meth:`DockerBackend.sweep`, which the first boot
of each backend runs. A parent is identified by its process (boot id, pid namespace, pid
and start time, checked in ``/proc`` by a sweeper on the same kernel) and, when it is a
container of the engine, by that container's id and start time (checked with the engine).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _redact
from .._errors import BootError
from .._exits import describe_exit
from .._version import __version__
from ._base import Backend, RunnerHandle, RunnerLaunch
from ._cleanups import CleanupTasks

try:
    import httpx
except ImportError:  # pragma: no cover - exercised only without the extra installed
    httpx = None  # type: ignore[assignment]

__all__ = ["ContainerHandle", "DockerBackend"]

logger = logging.getLogger("flame.docker")

DEFAULT_HOST = "unix:///var/run/docker.sock"

#: Engine API versions flame speaks: 1.41 is Docker 20.10; newer engines are asked for the
#: newest version both know.
API_MIN = (1, 41)
API_MAX = (1, 47)

LABEL_POOL = "flame-py.pool"
LABEL_RUNNER = "flame-py.runner-id"
#: the parent process: ``<boot id>:<pid namespace>:<pid>:<start time>``
LABEL_PARENT = "flame-py.parent"
#: the parent's container on this engine (id, and its State.StartedAt), when it is one
LABEL_PARENT_CONTAINER = "flame-py.parent-container"
LABEL_PARENT_STARTED = "flame-py.parent-started"
LABEL_VERSION = "flame-py.version"
_LABEL_PREFIX = "flame-py."

_INSTALL_HINT = "DockerBackend needs httpx, which is not installed: pip install 'flame-py[docker]'"
_TAIL_LINES = 40
_REQUEST_TIMEOUT = 30.0
_DISCOVERY_TIMEOUT = 5.0
_CLEANUP_GRACE = 15.0  # how long aclose() waits for removals under way
_LOOKS = 5  # look-ups by label after a lost create answer, _LOOK_DELAY apart
_LOOK_DELAY = 0.2

#: create-body keys flame sets itself (top level, and in HostConfig), with the option to use
_RESERVED = {
    "Image": "use image=",
    "Cmd": "the command is `<python> -m flame runner`: use python= and app=",
    "Env": "use env=",
    "Labels": "use labels=",
    "Tty": "flame reads the output as a non-TTY stream",
}
_RESERVED_HOST = {
    "AutoRemove": "flame relies on it",
    "NetworkMode": "use network=",
    "Mounts": "use mounts=",
    "NanoCpus": "use cpus=",
    "Memory": "use memory_mb=",
    "DeviceRequests": "use gpus=",
}

_ENV_NAME = re.compile(r"^[^=\s]+$")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MOUNTINFO_ID = re.compile(r"/containers/([0-9a-f]{64})/")
_SHORT_ID = re.compile(r"^[0-9a-f]{12}$")
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")


def _require_httpx() -> None:
    if httpx is None:
        raise ImportError(_INSTALL_HINT)


# -- the engine's address ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Endpoint:
    url: str
    uds: str | None  # the socket path, for unix://
    base_url: str
    local: bool  # the engine runs on this machine (its loopback and bridges are ours)


def _endpoint(host: str) -> _Endpoint:
    if host.startswith("unix://"):
        path = host[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(f"DockerBackend: host {host!r} must name an absolute socket path")
        return _Endpoint(host, path, "http://docker", True)
    for scheme in ("tcp://", "http://"):
        if host.startswith(scheme):
            rest = host[len(scheme) :].rstrip("/")
            if not rest or "/" in rest:
                raise ValueError(f"DockerBackend: host {host!r} must be {scheme}HOST:PORT")
            if os.environ.get("DOCKER_TLS_VERIFY"):
                raise ValueError(
                    "DockerBackend: DOCKER_TLS_VERIFY is set, but flame speaks plain HTTP to "
                    "tcp:// engines; forward the engine's socket instead (ssh -L "
                    "/tmp/docker.sock:/var/run/docker.sock HOST) and use unix:///tmp/docker.sock"
                )
            name = rest.rsplit(":", 1)[0].strip("[]")
            return _Endpoint(
                host, None, f"http://{rest}", name in ("localhost", "127.0.0.1", "::1")
            )
    raise ValueError(
        f"DockerBackend: host {host!r} is not supported: use unix:///path/to/docker.sock or "
        "tcp://HOST:PORT (for ssh:// or TLS engines, forward the socket: ssh -L "
        "/tmp/docker.sock:/var/run/docker.sock HOST)"
    )


# -- who the parent is -----------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of stat: starttime


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


_key_cache: tuple[int, str] | None = None


def process_key() -> str:
    """This process's identity in :data:`LABEL_PARENT`: boot id, pid namespace, pid, start."""
    global _key_cache
    pid = os.getpid()
    if _key_cache is None or _key_cache[0] != pid:
        boot = _read("/proc/sys/kernel/random/boot_id").strip() or "?"
        _key_cache = (pid, f"{boot}:{_pid_namespace()}:{pid}:{_start_ticks(pid) or '?'}")
    return _key_cache[1]


def process_alive(key: str) -> bool | None:
    """Whether the parent process named by ``key`` still runs, ``None`` if this process
    cannot tell (another kernel or pid namespace)."""
    parts = key.split(":")
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    mine = process_key().split(":")
    if parts[:2] != mine[:2] or "?" in parts[:2]:
        return None
    return _start_ticks(int(parts[2])) == parts[3]


def container_id_candidates(cgroup: str, mountinfo: str, hostname: str) -> list[str]:
    """Ids (or id prefixes) this process's container may have, most specific first.

    From ``/proc/self/cgroup`` (cgroup v1 ``/docker/<id>``, systemd ``docker-<id>.scope``),
    from ``/proc/self/mountinfo`` (the engine bind-mounts ``.../containers/<id>/hostname``,
    ``hosts`` and ``resolv.conf``, also under cgroup v2) and from the host name (a
    container's default host name is its short id; not with ``--network host``).
    """
    found: list[str] = []
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        found += reversed(_HEX64.findall(path))
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            found += _MOUNTINFO_ID.findall(fields[3])
    if _SHORT_ID.match(hostname):
        found.append(hostname)
    return list(dict.fromkeys(found))


def _interface_ipv4(name: str) -> str | None:
    """The IPv4 address of network interface ``name`` on this machine, or ``None``."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(
                s.fileno(),
                0x8915,
                struct.pack("256s", name.encode()[:15]),  # SIOCGIFADDR
            )
    except OSError:
        return None
    return socket.inet_ntoa(packed[20:24])


def _bindable(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


# -- the engine's answers ----------------------------------------------------------------------
def _message(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        text = doc["message"]
    else:
        text = response.text.strip() or response.reason_phrase
    return _redact.scrub(f"HTTP {response.status_code}: {text.strip()[:500]}")


def _transport_text(exc: BaseException) -> str:
    return _redact.scrub(f"{type(exc).__name__}: {exc}".rstrip(": "))


def describe_status(code: int) -> str:
    """A container's exit status as text: 128 + n is "killed by <signal n>", as the engine
    reports a signal; flame's own codes say what they mean."""
    if 128 < code <= 128 + 64:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(code - 128).name}"
    return describe_exit(code)


@dataclass(frozen=True)
class _Where:
    """Where runners go and how they reach the parent (found once per backend)."""

    api: str  # path prefix, "/v1.41"
    image: str
    network: str
    listen: str
    advertise: tuple[str, ...]
    parent_container: str | None
    parent_started: str | None


class ContainerHandle(RunnerHandle):
    """One runner container, as returned by :meth:`DockerBackend.boot`.

    Attributes:
        container_id: the full container id (``None`` until it was created).
        runner_id: the id the pool gave the runner.
        name: the container's name (``flame-<runner id>``).
    """

    def __init__(self, backend: DockerBackend, where: _Where, runner_id: str, name: str) -> None:
        self._backend = backend
        self._where = where
        self.runner_id = runner_id
        self.name = name
        self.container_id: str | None = None
        self.created_at = time.time()
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._partial = ""
        self._wait_task: asyncio.Task[int | None] | None = None
        self._attach_task: asyncio.Task[None] | None = None
        self._ended: asyncio.Future[str] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._streams: list[httpx.Response] = []
        self.state = "not created"
        self.abandoned = False  # the pool gave up on the boot: start nothing more

    @property
    def id(self) -> str:
        """``container <short id>``."""
        if self.container_id is None:
            return f"container {self.name} (not created)"
        return f"container {self.container_id[:12]}"

    def __repr__(self) -> str:
        return (
            f"<ContainerHandle {self.id} name={self.name!r} runner_id={self.runner_id!r} "
            f"{self.state}>"
        )

    def diagnostics(self) -> str:
        """The container, its image and network, and the last lines it wrote."""
        text = f"{self.id} of image {self._where.image} on network {self._where.network}"
        lines = [*self._tail, self._partial] if self._partial else list(self._tail)
        if lines:
            text += "\nlast output of the container:\n" + "\n".join(lines)
        return _redact.scrub(text)

    # -- watching ---------------------------------------------------------------------------
    async def _open_streams(self) -> None:
        """Register the exit wait and attach to the output, before the container starts."""
        wait = await self._stream("wait", {"condition": "next-exit"}, "watch")
        self._wait_task = asyncio.ensure_future(self._read_wait(wait))
        params = {"stream": "1", "stdout": "1", "stderr": "1", "logs": "1"}
        attach = await self._stream("attach", params, "attach to")
        self._attach_task = asyncio.ensure_future(self._read_output(attach))

    async def _stream(self, endpoint: str, params: dict[str, str], what: str) -> httpx.Response:
        """A long-lived answer of ``POST /containers/{id}/<endpoint>``, once its headers are
        in (the engine has registered it)."""
        assert self.container_id is not None
        client = self._backend._client()
        request = client.build_request(
            "POST",
            f"{self._where.api}/containers/{self.container_id}/{endpoint}",
            params=params,
            timeout=httpx.Timeout(_REQUEST_TIMEOUT, read=None),
        )
        response = await client.send(request, stream=True)
        self._streams.append(response)
        if response.status_code != 200:
            await response.aread()
            raise BootError(f"the Docker engine refused to {what} {self.id}: {_message(response)}")
        return response

    async def _read_wait(self, response: httpx.Response) -> int | None:
        """The exit status from the wait answer, ``None`` if the stream broke."""
        try:
            body = await response.aread()
            doc = json.loads(body)
        except (httpx.HTTPError, ValueError):
            return None
        finally:
            await response.aclose()
        if not isinstance(doc, dict) or not isinstance(doc.get("StatusCode"), int):
            return None
        error = doc.get("Error")
        if isinstance(error, dict) and error.get("Message"):
            self._tail.append(f"[engine] {error['Message']}")
        return int(doc["StatusCode"])

    async def _read_output(self, response: httpx.Response) -> None:
        """Keep the last lines of the multiplexed stdout/stderr stream (8-byte headers)."""
        buffer = b""
        try:
            async for chunk in response.aiter_raw():
                buffer += chunk
                while len(buffer) >= 8:
                    size = struct.unpack(">I", buffer[4:8])[0]
                    if len(buffer) < 8 + size:
                        break
                    self._add_output(buffer[8 : 8 + size].decode(errors="replace"))
                    buffer = buffer[8 + size :]
        except httpx.HTTPError:
            pass
        finally:
            await response.aclose()

    def _add_output(self, text: str) -> None:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()[-4096:]
        self._tail.extend(line[-4096:] for line in lines)

    async def wait(self) -> str:
        """Resolve when the container has exited, with its exit status as text."""
        if self._ended is None:
            self._ended = asyncio.ensure_future(self._wait_for_end())
        return await asyncio.shield(self._ended)

    async def _wait_for_end(self) -> str:
        if self._wait_task is None:
            await asyncio.Event().wait()  # never created: nothing to watch
        assert self._wait_task is not None
        code = await asyncio.shield(self._wait_task)
        if code is None:  # the stream broke (the engine restarted?): ask until it is gone
            code = await self._poll_exit()
        if self._attach_task is not None:  # the output ends with the container's streams
            await asyncio.wait({self._attach_task}, timeout=1.0)
        text = describe_status(code) if code is not None else "its container is gone"
        if code == 128 + signal.SIGKILL and await self._was_oom_killed():
            text += ", out of memory (the container's memory limit)"
        self.state = text
        return text

    async def _poll_exit(self) -> int | None:
        assert self.container_id is not None
        while True:
            try:
                response = await self._backend._client().get(
                    f"{self._where.api}/containers/{self.container_id}/json"
                )
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 404:
                return None
            if response is not None and response.status_code == 200:
                state = response.json().get("State") or {}
                if not state.get("Running") and state.get("Status") not in ("created", None):
                    code = state.get("ExitCode")
                    return code if isinstance(code, int) else None
            await asyncio.sleep(1.0)

    async def _was_oom_killed(self) -> bool:
        """Whether the engine recorded an OOM kill of this container (its events outlive it)."""
        assert self.container_id is not None
        params = {
            "since": f"{self.created_at - 5:.0f}",
            "until": f"{time.time():.9f}",
            "filters": json.dumps({"container": [self.container_id], "event": ["oom"]}),
        }
        try:
            response = await self._backend._client().get(
                f"{self._where.api}/events", params=params, timeout=5.0
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and bool(response.text.strip())

    # -- stopping ---------------------------------------------------------------------------
    async def stop(self) -> None:
        """Remove the container (``DELETE ?force=1``). Idempotent; "no such container" is
        success. The removal runs in its own task, so it completes even if the caller is
        cancelled; failures are logged, not raised (AutoRemove still removes the container
        once its runner exits)."""
        if self._stop_task is None:
            self._stop_task = self._backend._spawn_cleanup(self._remove())
        await asyncio.shield(self._stop_task)

    async def _remove(self) -> None:
        try:
            if self.container_id is not None:
                await self._backend._remove(self.container_id, why=f"runner {self.runner_id}")
                self.state = "removed"
        finally:
            if self._attach_task is not None:
                await asyncio.wait({self._attach_task}, timeout=1.0)
            for task in (self._attach_task, self._wait_task):
                if task is not None and not task.done():
                    task.cancel()
            for response in self._streams:
                await response.aclose()


class DockerBackend(Backend):
    """Boot each runner as a container of the app's image on a Docker Engine.

    The image must hold the application and flame, as a deployment image does; a runner
    starts as ``<python> -m flame runner`` (the image's ENTRYPOINT is replaced; put a
    wrapper back with ``extra_config={"Entrypoint": [...]}``). The engine does not pull
    images for flame: a missing image is a :class:`flame.BootError`.

    Settings that need the engine (the parent's own container, image and network) are found
    on first use (:meth:`validate`, :meth:`listen_host`, :meth:`boot`), so an app that builds
    a ``DockerBackend`` at import time can still be imported where there is no engine.

    Args:
        image: the runners' image. Default: the image of the container the parent runs in
            (its exact image id); a parent that is not a container of this engine must name
            one (``ValueError`` at first use).
        host: the engine's endpoint, ``unix:///path`` or ``tcp://HOST:PORT`` (plain HTTP).
            Default: ``DOCKER_HOST``, else ``unix:///var/run/docker.sock``.
        network: the network runners join. Default: the parent container's own network, or
            ``"bridge"`` for a parent outside the engine's containers. ``"host"`` shares the
            host's network, and runners dial the parent on loopback; on a bridge network
            from the host, they dial the network's gateway, where the listener binds.
        parent_host: the address runners dial to reach the parent, overriding the above
            (needed for an engine on another machine, or an overlay network).
        env: environment variables for runners. Nothing of the parent's environment is
            passed on except this and ``FLAME_PARENT`` (the image's own ``ENV`` applies).
        labels: extra container labels (flame's own are ``flame-py.*``).
        cpus: CPU limit (``NanoCpus``), e.g. ``0.5`` or ``2``.
        memory_mb: memory limit in MiB (``Memory``; swap is not added on top of it).
        gpus: ``DeviceRequests`` for GPUs: a count, ``"all"``, or a list of device ids.
        mounts: ``HostConfig.Mounts`` entries, passed as they are
            (``[{"Type": "bind", "Source": "/data", "Target": "/data"}]``).
        python: the interpreter in the image (default ``"python3"``).
        extra_config: further keys of the create request, passed as they are; a
            ``"HostConfig"`` mapping is merged into flame's (``PidsLimit``, ``ShmSize``,
            ``Init``, ``ExtraHosts``...). Keys flame sets itself are refused, naming the
            option to use.
        app: what the runner imports as the application: a module name or a ``.py`` path
            inside the image. Default: the parent's main module.

    Raises:
        ValueError: at construction for a malformed option or an unsupported ``host``.
        ImportError: at construction when httpx is not installed.
    """

    name = "docker"

    def __init__(
        self,
        image: str | None = None,
        *,
        host: str | None = None,
        network: str | None = None,
        parent_host: str | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        cpus: float | None = None,
        memory_mb: int | None = None,
        gpus: int | str | Sequence[str] | None = None,
        mounts: Sequence[Mapping[str, Any]] | None = None,
        python: str = "python3",
        extra_config: Mapping[str, Any] | None = None,
        app: str | None = None,
    ) -> None:
        _require_httpx()
        for option, value in (
            ("image", image),
            ("host", host),
            ("network", network),
            ("parent_host", parent_host),
            ("python", python),
            ("app", app),
        ):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(
                    f"DockerBackend: {option} must be a non-empty string, got {value!r}"
                )
        self.image = image
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        self._endpoint = _endpoint(self.host)
        self.network = network
        self.parent_host = parent_host
        self.env = _str_map("env", env)
        for key in self.env:
            if not _ENV_NAME.match(key):
                raise ValueError(f"DockerBackend: env key {key!r} is not a variable name")
            if key == "FLAME_PARENT":
                raise ValueError("DockerBackend: env['FLAME_PARENT'] is set by flame itself")
        self.labels = _str_map("labels", labels)
        for key in self.labels:
            if key.startswith(_LABEL_PREFIX):
                raise ValueError(f"DockerBackend: label {key!r}: the prefix 'flame-py.' is flame's")
        if cpus is not None and (
            isinstance(cpus, bool) or not isinstance(cpus, int | float) or not cpus > 0
        ):
            raise ValueError(f"DockerBackend: cpus must be a number > 0, got {cpus!r}")
        self.cpus = cpus
        if memory_mb is not None and (
            isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 6
        ):
            raise ValueError(
                f"DockerBackend: memory_mb must be an integer >= 6 (MiB), got {memory_mb!r}"
            )
        self.memory_mb = memory_mb
        self.gpus = _check_gpus(gpus)
        if mounts is not None and (
            isinstance(mounts, str | bytes) or not all(isinstance(m, Mapping) for m in mounts)
        ):
            raise ValueError(
                "DockerBackend: mounts must be a list of Engine API mount objects, e.g. "
                '[{"Type": "bind", "Source": "/data", "Target": "/data"}]'
            )
        self.mounts = [dict(m) for m in mounts or ()]
        self.python = python
        self.extra_config = _check_extra(extra_config)
        self.app = app
        self._where: _Where | None = None
        self._where_lock = threading.Lock()
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._cleanups = CleanupTasks()
        self._swept = False
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"<DockerBackend host={self.host!r} image={self.image!r} network={self.network!r} "
            f"env_keys={sorted(self.env)!r}>"
        )

    # -- where the parent runs ----------------------------------------------------------------
    def validate(self) -> None:
        """Find where the parent runs now (once), raising what booting would raise.

        Raises:
            ValueError: no image can be found, or runners cannot reach the parent without
                ``parent_host``; the message says what to pass.
            flame.BootError: the engine cannot be reached or refused.
        """
        self._where_now()

    def listen_host(self) -> str:
        """Where the parent's listener binds: loopback with ``network="host"``, the
        gateway of a bridge network (a parent on the host), or all of a parent container's
        addresses."""
        return self._where_now().listen

    def advertise_hosts(self) -> Sequence[str]:
        """The parent's address as runners see it (see :meth:`listen_host`)."""
        return list(self._where_now().advertise)

    def runner_app(self) -> Mapping[str, str] | None:
        """The ``app`` option as the runner expects it, or ``None`` for the main module."""
        if self.app is None:
            return None
        return {"path": self.app} if self.app.endswith(".py") else {"module": self.app}

    def _where_now(self) -> _Where:
        with self._where_lock:
            if self._where is None:
                self._where = self._discover()
            return self._where

    def _sync_client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self._endpoint.uds) if self._endpoint.uds else None
        return httpx.Client(
            transport=transport,
            base_url=self._endpoint.base_url,
            timeout=_DISCOVERY_TIMEOUT,
            headers={"User-Agent": f"flame-py/{__version__}"},
        )

    def _discover(self) -> _Where:
        try:
            with self._sync_client() as client:
                return self._discover_with(client)
        except httpx.HTTPError as exc:
            raise BootError(
                f"cannot reach the Docker engine at {self.host}: {_transport_text(exc)}"
                " (is dockerd running, and may this process use its socket?)"
            ) from exc

    def _discover_with(self, client: httpx.Client) -> _Where:
        ping = client.get("/_ping")
        if ping.status_code != 200:
            raise BootError(
                f"the Docker engine at {self.host} answered /_ping with {_message(ping)}"
            )
        api = _negotiate(ping.headers.get("api-version", ""), self.host)
        info = client.get(f"{api}/info")
        if info.status_code == 200 and info.json().get("Driver") == "vfs":
            logger.warning(
                "docker: the engine at %s uses the vfs storage driver: each runner container "
                "takes seconds to create (overlay2 takes a fraction of one)",
                self.host,
            )
        me = self._own_container(client, api)
        container_id = me["Id"] if me else None
        started = (me.get("State") or {}).get("StartedAt") if me else None
        image = self.image or (me.get("Image") if me else None)
        if not image:
            raise ValueError(
                "DockerBackend: image= is required, since this process is not a container of "
                f"the engine at {self.host} (no id of one found in /proc/self/cgroup, "
                "/proc/self/mountinfo or the host name); pass DockerBackend(image='myapp:tag')"
            )
        if me is not None:
            network, listen, advertise = self._from_container(me)
        else:
            network, listen, advertise = self._from_host(client, api)
        if self.parent_host is not None:
            advertise = (self.parent_host,)
            if self.parent_host in ("127.0.0.1", "localhost"):
                listen = "127.0.0.1"
            elif _bindable(self.parent_host):
                listen = self.parent_host
            else:
                listen = "::" if ":" in self.parent_host else "0.0.0.0"
        where = _Where(api, image, network, listen, advertise, container_id, started)
        logger.debug("docker: %s", where)
        return where

    def _own_container(self, client: httpx.Client, api: str) -> dict[str, Any] | None:
        candidates = container_id_candidates(
            _read("/proc/self/cgroup"), _read("/proc/self/mountinfo"), socket.gethostname()
        )
        for candidate in candidates:
            response = client.get(f"{api}/containers/{candidate}/json")
            if response.status_code != 200:
                continue
            doc = response.json()
            if isinstance(doc, dict) and (doc.get("State") or {}).get("Running"):
                return doc
        return None

    def _from_container(self, me: Mapping[str, Any]) -> tuple[str, str, tuple[str, ...]]:
        """Network, listen address and advertised addresses for a parent container."""
        mode = str((me.get("HostConfig") or {}).get("NetworkMode") or "bridge")
        if mode == "default":
            mode = "bridge"
        networks: dict[str, Any] = (me.get("NetworkSettings") or {}).get("Networks") or {}
        network = self.network or mode
        if network == "host" and mode == "host":
            return network, "127.0.0.1", ("127.0.0.1",)
        if network.startswith("container:") and network == mode:
            return network, "127.0.0.1", ("127.0.0.1",)
        ips = {name: n.get("IPAddress") for name, n in networks.items() if n.get("IPAddress")}
        if self.parent_host is not None:
            return network, "0.0.0.0", (self.parent_host,)
        mine = ips.get(network) or next(
            (
                n.get("IPAddress")
                for n in networks.values()
                if n.get("IPAddress")
                and network in (n.get("NetworkID"), n.get("NetworkID", "")[:12])
            ),
            None,
        )
        if mine:
            return network, mine, (mine,)
        if network == "host" and ips:  # host-network runners reach the parent's bridges
            return network, "0.0.0.0", tuple(ips.values())
        have = ", ".join(sorted(networks)) or f"none (network mode {mode})"
        raise ValueError(
            f"DockerBackend: runners on network {network!r} cannot reach the parent container: "
            f"it is not attached to that network (its networks: {have}); attach it "
            f"(docker network connect {network} <parent>), leave network= out, or pass "
            "parent_host="
        )

    def _from_host(self, client: httpx.Client, api: str) -> tuple[str, str, tuple[str, ...]]:
        """Network, listen address and advertised addresses for a parent on the host."""
        network = self.network or "bridge"
        if self.parent_host is not None:
            return network, "0.0.0.0", (self.parent_host,)
        if not self._endpoint.local:
            raise ValueError(
                f"DockerBackend: the engine at {self.host} is on another machine and this "
                "process is not one of its containers, so flame cannot tell how runners reach "
                "it: pass parent_host= (an address of this machine that the runners can dial)"
            )
        if network == "host":
            return network, "127.0.0.1", ("127.0.0.1",)
        response = client.get(f"{api}/networks/{network}")
        if response.status_code != 200:
            raise ValueError(
                f"DockerBackend: network {network!r}: the engine answered {_message(response)}"
            )
        doc = response.json()
        gateway = next(
            (
                c["Gateway"]
                for c in (doc.get("IPAM") or {}).get("Config") or []
                if c.get("Gateway") and ":" not in c["Gateway"]
            ),
            None,
        )
        bridge = (doc.get("Options") or {}).get("com.docker.network.bridge.name")
        if gateway is None and doc.get("Driver") == "bridge":
            # the default bridge records no gateway: it is the bridge interface's address
            gateway = _interface_ipv4(bridge or "docker0")
        if gateway is None or not _bindable(gateway):
            raise ValueError(
                f"DockerBackend: runners on network {network!r} (driver {doc.get('Driver')}) "
                "have no gateway address on this machine to dial the parent at; use "
                "network='host', or pass parent_host="
            )
        return network, gateway, (gateway,)

    # -- the API client ---------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            transport = (
                httpx.AsyncHTTPTransport(uds=self._endpoint.uds) if self._endpoint.uds else None
            )
            self._http = httpx.AsyncClient(
                transport=transport,
                base_url=self._endpoint.base_url,
                timeout=httpx.Timeout(_REQUEST_TIMEOUT, connect=_DISCOVERY_TIMEOUT),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=8),
                headers={"User-Agent": f"flame-py/{__version__}"},
            )
            self._http_loop = loop
        return self._http

    def _spawn_cleanup(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self._cleanups.spawn(coro)

    async def aclose(self) -> None:
        """Wait (up to 15 s) for container removals under way, then close the client."""
        await self._cleanups.drain(_CLEANUP_GRACE, logger, "docker: a container removal")
        client, self._http = self._http, None
        if client is not None:
            await client.aclose()

    # -- the create request -------------------------------------------------------------------
    def container_config(self, launch: RunnerLaunch, *, image: str, network: str) -> dict[str, Any]:
        """The JSON body of the create request for ``launch`` (pure, no I/O).

        Holds ``FLAME_PARENT`` (the runner's secret) in ``Env``: do not log it.
        """
        argv = list(launch.argv)
        if argv[:1] == ["python"]:
            argv[0] = self.python
        env = {**self.env, **dict(launch.env)}
        labels = {
            **self.labels,
            LABEL_POOL: launch.pool,
            LABEL_RUNNER: launch.runner_id,
            LABEL_PARENT: process_key(),
            LABEL_VERSION: __version__,
        }
        where = self._where
        if where is not None and where.parent_container:
            labels[LABEL_PARENT_CONTAINER] = where.parent_container
            labels[LABEL_PARENT_STARTED] = where.parent_started or ""
        host_config: dict[str, Any] = {
            **self.extra_config.get("HostConfig", {}),
            "AutoRemove": True,
            "NetworkMode": network,
        }
        if self.cpus is not None:
            host_config["NanoCpus"] = round(self.cpus * 1e9)
        if self.memory_mb is not None:
            host_config["Memory"] = host_config["MemorySwap"] = self.memory_mb * 1024 * 1024
        if self.gpus is not None:
            host_config["DeviceRequests"] = [_device_request(self.gpus)]
        if self.mounts:
            host_config["Mounts"] = [dict(m) for m in self.mounts]
        return {
            "Entrypoint": [""],  # reset: the runner command is the whole command line
            **{k: v for k, v in self.extra_config.items() if k != "HostConfig"},
            "Image": image,
            "Cmd": argv,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": labels,
            "AttachStdout": True,
            "AttachStderr": True,
            "HostConfig": host_config,
        }

    # -- booting --------------------------------------------------------------------------------
    async def boot(self, launch: RunnerLaunch) -> ContainerHandle:
        """Create and start one runner container and return its handle (not waiting for the
        runner to dial in). On any failure, or if cancelled, the container is removed."""
        where = self._where_now()
        if not self._swept:
            self._swept = True
            try:
                await self.sweep()
            except (httpx.HTTPError, BootError) as exc:
                logger.warning("docker: could not look for containers of dead parents: %s", exc)
        name = "flame-" + _NAME_UNSAFE.sub("-", launch.runner_id)[:100]
        handle = ContainerHandle(self, where, launch.runner_id, name)
        task = asyncio.ensure_future(self._create_and_start(launch, where, handle))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # the requests under way are not cut off (the engine may be creating the
            # container): let them end, start nothing more, and remove what they made
            handle.abandoned = True
            self._spawn_cleanup(_finish_abandoned(task, handle))
            raise
        return handle

    async def _create_and_start(
        self, launch: RunnerLaunch, where: _Where, handle: ContainerHandle
    ) -> None:
        body = self.container_config(launch, image=where.image, network=where.network)
        try:
            handle.container_id = await self._create(handle.name, body, launch, where)
            handle.state = "created"
            await handle._open_streams()
            if handle.abandoned:
                raise BootError(f"the boot of runner {launch.runner_id} was abandoned")
            await self._start(handle)
            handle.state = "started"
        except BaseException as exc:
            await handle.stop()
            if isinstance(exc, httpx.HTTPError):
                raise BootError(
                    f"lost the Docker engine ({self.host}) while booting runner "
                    f"{launch.runner_id}: {_transport_text(exc)}"
                ) from exc
            raise
        logger.debug("docker: runner %s is %s (%s)", launch.runner_id, handle.id, handle.name)

    async def _create(
        self, name: str, body: dict[str, Any], launch: RunnerLaunch, where: _Where
    ) -> str:
        client = self._client()
        what = f"create a runner container of image {where.image!r}"
        try:
            response = await client.post(
                f"{where.api}/containers/create", params={"name": name}, json=body
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise BootError(
                f"cannot reach the Docker engine at {self.host} to {what}: {_transport_text(exc)}"
            ) from exc
        except httpx.TransportError as exc:
            # the request went out: the container may exist although no answer said so
            found = await self._find_runner(launch.runner_id, looks=_LOOKS)
            if found is not None:
                logger.info(
                    "docker: the answer to creating %s was lost (%s); found it by its label",
                    name,
                    _transport_text(exc),
                )
                return found
            self._spawn_cleanup(self._remove_by_label(launch.runner_id))
            raise BootError(
                f"lost the Docker engine's answer to the request to {what} "
                f"({_transport_text(exc)}), and no container labelled "
                f"{LABEL_RUNNER}={launch.runner_id} turned up"
            ) from exc
        if response.status_code == 201:
            doc = response.json()
            for warning in doc.get("Warnings") or []:
                if warning not in self._warned:  # the same for every runner: say it once
                    self._warned.add(warning)
                    logger.info("docker: creating %s: the engine warns: %s", name, warning)
            return str(doc["Id"])
        text = _message(response)
        if response.status_code >= 500 or response.status_code == 409:
            found = await self._find_runner(
                launch.runner_id, looks=1 if response.status_code == 409 else _LOOKS
            )
            if found is not None:
                return found
        if response.status_code == 404:
            raise BootError(
                f"the Docker engine cannot {what}: {text} (build, load or pull it on the "
                "engine first: flame does not pull images)"
            )
        raise BootError(f"the Docker engine refused to {what}: {text}")

    async def _start(self, handle: ContainerHandle) -> None:
        assert handle.container_id is not None
        path = f"{handle._where.api}/containers/{handle.container_id}/start"
        client = self._client()
        try:
            response = await client.post(path)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
            raise
        except httpx.TransportError:
            response = await client.post(path)  # the answer was lost: starting twice is 304
        if response.status_code in (204, 304):
            return
        raise BootError(
            f"the Docker engine could not start {handle.id} (image {handle._where.image}, "
            f"command {self.python} -m flame runner): {_message(response)}"
        )

    # -- finding and removing containers ------------------------------------------------------
    async def _list(self, labels: Sequence[str]) -> list[dict[str, Any]]:
        where = self._where_now()
        response = await self._client().get(
            f"{where.api}/containers/json",
            params={"all": "1", "filters": json.dumps({"label": list(labels)})},
        )
        if response.status_code != 200:
            raise BootError(f"the Docker engine refused to list containers: {_message(response)}")
        doc = response.json()
        return [c for c in doc if isinstance(c, dict)] if isinstance(doc, list) else []

    async def _find_runner(self, runner_id: str, *, looks: int) -> str | None:
        """The id of this parent's container for ``runner_id``, looking ``looks`` times."""
        labels = [f"{LABEL_RUNNER}={runner_id}", f"{LABEL_PARENT}={process_key()}"]
        for look in range(looks):
            try:
                found = await self._list(labels)
            except (httpx.HTTPError, BootError):
                found = []
            if found:
                return str(found[0]["Id"])
            if look + 1 < looks:
                await asyncio.sleep(_LOOK_DELAY)
        return None

    async def _remove_by_label(self, runner_id: str) -> None:
        """After a lost create answer: remove the container if it turns up late."""
        found = await self._find_runner(runner_id, looks=10)
        if found is not None:
            await self._remove(found, why=f"runner {runner_id} (its create answer was lost)")

    async def _remove(self, container_id: str, *, why: str) -> None:
        """Force-remove a container; "no such container" and "already being removed" are
        success. Logs (never raises) what it could not remove."""
        path = f"{self._where_now().api}/containers/{container_id}"
        last = ""
        for attempt in range(4):
            try:
                response = await self._client().delete(path, params={"force": "1"})
            except httpx.HTTPError as exc:
                last = _transport_text(exc)
            else:
                if response.status_code in (204, 404, 409):
                    # 409: AutoRemove is removing it already
                    logger.debug("docker: removed container %s of %s", container_id[:12], why)
                    return
                last = _message(response)
            await asyncio.sleep(0.2 * (attempt + 1))
        logger.warning(
            "docker: could not remove container %s of %s: %s (it removes itself when its "
            "runner exits)",
            container_id[:12],
            why,
            last,
        )

    async def sweep(self) -> list[str]:
        """Remove the runner containers on this engine whose parent is gone; return their ids.

        Runs by itself at the first boot of each backend (so at a pool's start, or its first
        boot). A parent is gone when its process no longer runs (checked in ``/proc`` when
        this process shares its kernel and pid namespace), or when the container it ran in
        no longer runs or was restarted since. Containers of parents it cannot judge (on
        another machine) are left alone: their runners exit by themselves when they lose
        their parent, and AutoRemove removes them.
        """
        mine = process_key()
        containers = await self._list([LABEL_PARENT])
        verdicts: dict[str, bool | None] = {}
        removed: list[str] = []
        for c in containers:
            labels = c.get("Labels") or {}
            key = str(labels.get(LABEL_PARENT, ""))
            if not key or key == mine:
                continue
            if key not in verdicts:
                verdicts[key] = await self._parent_gone(labels)
            if verdicts[key]:
                logger.info(
                    "docker: removing container %s (%s, pool %r): its parent %s is gone",
                    str(c["Id"])[:12],
                    c.get("State"),
                    labels.get(LABEL_POOL),
                    key,
                )
                await self._remove(str(c["Id"]), why=f"a parent that is gone ({key})")
                removed.append(str(c["Id"]))
        return removed

    async def _parent_gone(self, labels: Mapping[str, Any]) -> bool | None:
        alive = process_alive(str(labels.get(LABEL_PARENT, "")))
        if alive is not None:
            return not alive
        container = labels.get(LABEL_PARENT_CONTAINER)
        if not container:
            return None
        response = await self._client().get(f"{self._where_now().api}/containers/{container}/json")
        if response.status_code == 404:
            return True
        if response.status_code != 200:
            return None
        state = response.json().get("State") or {}
        return not state.get("Running") or state.get("StartedAt") != labels.get(
            LABEL_PARENT_STARTED
        )

    async def containers(self) -> list[dict[str, Any]]:
        """The runner containers of this parent process on the engine (the engine's list
        entries: ``Id``, ``Names``, ``State``, ``Labels``...)."""
        return await self._list([f"{LABEL_PARENT}={process_key()}"])


async def _finish_abandoned(task: asyncio.Future[None], handle: ContainerHandle) -> None:
    with contextlib.suppress(BaseException):
        await task
    await handle.stop()


def _negotiate(server: str, host: str) -> str:
    try:
        version = tuple(int(p) for p in server.split(".")[:2])
    except ValueError:
        version = ()
    if len(version) != 2:
        raise BootError(f"the Docker engine at {host} did not say its API version (/_ping)")
    if version < API_MIN:
        raise BootError(
            f"the Docker engine at {host} speaks API {server}; flame needs "
            f"{API_MIN[0]}.{API_MIN[1]} (Docker 20.10) or newer"
        )
    major, minor = min(version, API_MAX)
    return f"/v{major}.{minor}"


def _str_map(option: str, value: Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"DockerBackend: {option} must map strings to strings")
    return dict(value)


def _check_gpus(gpus: int | str | Sequence[str] | None) -> int | str | list[str] | None:
    if gpus is None:
        return None
    if isinstance(gpus, int) and not isinstance(gpus, bool) and gpus > 0:
        return gpus
    if gpus == "all":
        return "all"
    if (
        not isinstance(gpus, str | bytes | int)
        and isinstance(gpus, Sequence)
        and gpus
        and all(isinstance(g, str) and g for g in gpus)
    ):
        return list(gpus)
    raise ValueError(
        f"DockerBackend: gpus must be a count > 0, 'all', or a list of device ids; got {gpus!r}"
    )


def _device_request(gpus: int | str | list[str]) -> dict[str, Any]:
    request: dict[str, Any] = {"Driver": "", "Capabilities": [["gpu"]]}
    if isinstance(gpus, list):
        request["DeviceIDs"] = gpus
    else:
        request["Count"] = -1 if gpus == "all" else gpus
    return request


def _check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ValueError(
            "DockerBackend: extra_config must be a mapping (the create request's keys)"
        )
    out = dict(extra)
    host_config = out.get("HostConfig", {})
    if not isinstance(host_config, Mapping):
        raise ValueError("DockerBackend: extra_config['HostConfig'] must be a mapping")
    out["HostConfig"] = dict(host_config)
    refused = [(k, o) for k, o in _RESERVED.items() if k in out]
    refused += [(f"HostConfig.{k}", o) for k, o in _RESERVED_HOST.items() if k in host_config]
    if refused:
        what = "; ".join(f"{k} ({why})" for k, why in refused)
        raise ValueError(f"DockerBackend: extra_config may not set {what}")
    return out
