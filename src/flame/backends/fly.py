"""``FlyBackend``: every runner is a Fly.io Machine, created through the Machines API.

This module owns the conversation with the Fly Machines API (``https://api.machines.dev``):
one ``POST /v1/apps/{app}/machines`` per runner, a long-poll on ``.../wait`` to notice the
machine's end, and a ``DELETE ...?force=true`` to get rid of it. Nothing else.

The machine runs the parent's own image (``FLY_IMAGE_REF``) in the parent's app and region,
with ``auto_destroy`` and restart policy ``"no"``: when the runner process exits, Fly
destroys the machine. Its environment is exactly the ``env`` option plus what the core puts
in ``RunnerLaunch.env`` (``FLAME_PARENT``). The API token is never part of it: a machine's
config can be read back by anyone holding a token for the app, and a runner never needs it.

The runner dials the parent over Fly's private network (6PN, IPv6): the parent advertises
``FLY_PRIVATE_IP`` and its listener binds ``"::"`` (IPv6 and IPv4).

Leaks cost money, so every path that may have created a machine ends in its destruction:

* answers that leave it unclear whether the machine exists (a dropped connection, a 5xx, a
  cancelled boot) are followed by a look-up by the machine's name, and what is found is
  adopted or destroyed;
* :meth:`FlyMachineHandle.stop` destroys with ``force=true``, tolerates "already gone", is
  idempotent, and finishes even when the task awaiting it is cancelled;
* :meth:`FlyBackend.aclose` waits (bounded) for clean-ups still in flight.

Settings that come from the environment (token, app, image, private IP) are read when the
backend is built but checked when it is first *used* (:meth:`FlyBackend.listen_host`,
:meth:`~FlyBackend.advertise_hosts`, :meth:`~FlyBackend.boot`), so that an application that
builds a ``FlyBackend`` at import time can still be imported on a laptop, in CI, or on the
runner itself. Call :meth:`FlyBackend.validate` to fail fast at start-up instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from .. import _redact
from .._errors import BootError
from .._exits import describe_exit
from .._version import __version__
from ._base import Backend, RunnerHandle, RunnerLaunch

try:
    import httpx
except ImportError:  # pragma: no cover - exercised only without the extra installed
    httpx = None  # type: ignore[assignment]

__all__ = ["FlyBackend", "FlyMachineHandle"]

logger = logging.getLogger("flame.fly")

DEFAULT_HOST = "https://api.machines.dev"

#: Answers to a create that mean "not now": rate limited (429), no capacity found (412),
#: capacity vanished while placing (409), no capacity for a volume workload (422).
RETRY_STATUSES = frozenset({409, 412, 422, 429})

#: Longest single back-off between two create attempts, in seconds.
MAX_BACKOFF = 16.0

#: Fly's ``/wait`` endpoint accepts at most 60 seconds per request.
WAIT_SECONDS = 60

#: Machine states after which the runner is certainly gone.
TERMINAL_STATES = frozenset({"stopped", "destroying", "destroyed", "failed", "replaced"})

#: How long :meth:`FlyBackend.aclose` waits for destroys still in flight.
CLEANUP_GRACE = 15.0

#: Machine config keys flame sets itself, which ``extra_config`` may not carry.
_RESERVED_CONFIG = frozenset(
    {"image", "guest", "auto_destroy", "restart", "env", "metadata", "init", "services", "mounts"}
)

_ENV_VARS = {
    "token": "FLY_API_TOKEN",
    "app": "FLY_APP_NAME",
    "image": "FLY_IMAGE_REF",
    "advertise_host": "FLY_PRIVATE_IP",
}


def _require_httpx() -> None:
    if httpx is None:
        raise ImportError(
            "FlyBackend needs httpx, which is not installed: pip install 'flame-py[fly]'"
        )


def _auth_header(token: str) -> str:
    """The ``Authorization`` value for a Fly token.

    Tokens made by ``fly tokens create`` are macaroons ("FlyV1 fm2_...") and go in as they
    are; a bare macaroon gets its ``FlyV1`` scheme; anything else is a bearer token.
    """
    token = token.strip()
    if token.startswith(("FlyV1 ", "Bearer ")):
        return token
    if token.startswith(("fm1", "fm2_", "m2.")):
        return f"FlyV1 {token}"
    return f"Bearer {token}"


class FlyBackend(Backend):
    """Boot each runner as a Fly.io Machine running the parent's own image.

    All options are keyword-only; the ones that default to an environment variable read it
    when the backend is built. Fly sets ``FLY_APP_NAME``, ``FLY_IMAGE_REF``, ``FLY_REGION``
    and ``FLY_PRIVATE_IP`` on every machine; ``FLY_API_TOKEN`` is yours to set, as a secret
    (``fly secrets set FLY_API_TOKEN="$(fly tokens create deploy)"``).

    Args:
        token: Fly API token (default ``FLY_API_TOKEN``). Macaroon tokens ("FlyV1 ...") and
            classic bearer tokens both work. Never logged, never shown in a repr, never
            handed to runners.
        app: Fly app the machines are created in (default ``FLY_APP_NAME``).
        image: image the machines run (default ``FLY_IMAGE_REF``: the parent's own).
        region: region to create machines in (default ``FLY_REGION``; ``None`` lets Fly pick).
        host: base URL of the Machines API. Point it at
            :class:`flame.testing.fly.FlyMachinesEmulator` in tests.
        cpu_kind: ``"performance"`` (default) or ``"shared"``.
        cpus: CPUs per machine (default: the parent's ``os.cpu_count()``).
        memory_mb: memory per machine in MB, a multiple of 256 (default 4096).
        gpu_kind: GPU model (``"a100-pcie-40gb"``, ``"l40s"``...), or ``None`` for no GPU.
        gpus: number of GPUs (default 1 when ``gpu_kind`` is set).
        env: environment variables for the runners. Nothing of the parent's environment is
            passed on except this and ``FLAME_PARENT``: forward what the runner's import of
            your app needs (``DATABASE_URL``...). Fly app secrets reach every machine of the
            app without being listed here.
        init: Fly's init object. By default the machine runs the runner command
            (``{"cmd": ["python", "-m", "flame", "runner"]}``, after the image's
            ENTRYPOINT); keys given here are laid over that default, so
            ``{"exec": [...]}`` replaces the whole command and ``{"swap_size_mb": 1024}``
            just adds swap.
        services: Fly services (public ports) for the machine; none by default, since the
            runner dials out and needs none.
        metadata: extra machine metadata (string values). flame adds ``flame_pool``,
            ``flame_runner_id`` and ``flame_parent_ip``.
        mounts: Fly volume mounts (``[{"volume": "vol_...", "path": "/data"}]``).
        extra_config: further keys of the machine config (``checks``, ``stop_config``,
            ``files``, ``dns``...). Keys flame sets itself (image, guest, env, init,
            auto_destroy, restart, services, metadata, mounts) are refused.
        app_module: what the runner imports as "the application": a module name or a
            ``.py`` path inside the image. Default: the parent's main module.
        advertise_host: address runners dial to reach the parent (default
            ``FLY_PRIVATE_IP``).
        bind_host: address the parent's listener binds (default ``"::"``, all IPv6 and IPv4).
        max_boot_retries: how many times a create answered 429/412/409/422/5xx, or lost on
            the network, is tried again before :class:`flame.BootError` (default 5).
        retry_backoff: first back-off in seconds; it doubles each retry (up to 16 s), with
            jitter, and a ``Retry-After`` answer is honoured (default 1.0: Fly allows about
            one create per second).
        request_timeout: timeout of each API request, in seconds (default 30).

    Raises:
        ValueError: at construction for a malformed option; at first use (or
            :meth:`validate`) when ``token``, ``app``, ``image`` or the advertised address
            is missing, naming the option and its environment variable.
        ImportError: at construction when httpx is not installed.
    """

    name = "fly"

    def __init__(
        self,
        *,
        token: str | None = None,
        app: str | None = None,
        image: str | None = None,
        region: str | None = None,
        host: str = DEFAULT_HOST,
        cpu_kind: str = "performance",
        cpus: int | None = None,
        memory_mb: int = 4096,
        gpu_kind: str | None = None,
        gpus: int | None = None,
        env: Mapping[str, str] | None = None,
        init: Mapping[str, Any] | None = None,
        services: Sequence[Mapping[str, Any]] | None = None,
        metadata: Mapping[str, str] | None = None,
        mounts: Sequence[Mapping[str, Any]] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        app_module: str | None = None,
        advertise_host: str | None = None,
        bind_host: str = "::",
        max_boot_retries: int = 5,
        retry_backoff: float = 1.0,
        request_timeout: float = 30.0,
    ) -> None:
        _require_httpx()
        self._token = token if token is not None else os.environ.get("FLY_API_TOKEN") or None
        self.app = app if app is not None else os.environ.get("FLY_APP_NAME") or None
        self.image = image if image is not None else os.environ.get("FLY_IMAGE_REF") or None
        self.region = region if region is not None else os.environ.get("FLY_REGION") or None
        self.advertise_host = (
            advertise_host
            if advertise_host is not None
            else os.environ.get("FLY_PRIVATE_IP") or None
        )
        if not isinstance(host, str) or not host.startswith(("http://", "https://")):
            raise ValueError(f"FlyBackend: host must be an http(s) URL, got {host!r}")
        self.host = host.rstrip("/")
        if not isinstance(cpu_kind, str) or not cpu_kind:
            raise ValueError(f"FlyBackend: cpu_kind must be a non-empty string, got {cpu_kind!r}")
        self.cpu_kind = cpu_kind
        cpus = cpus if cpus is not None else (os.cpu_count() or 1)
        if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
            raise ValueError(f"FlyBackend: cpus must be a positive integer, got {cpus!r}")
        self.cpus = cpus
        if (
            not isinstance(memory_mb, int)
            or isinstance(memory_mb, bool)
            or memory_mb < 256
            or memory_mb % 256
        ):
            raise ValueError(
                f"FlyBackend: memory_mb must be a positive multiple of 256, got {memory_mb!r}"
            )
        self.memory_mb = memory_mb
        if gpus is not None and gpu_kind is None:
            raise ValueError("FlyBackend: gpus was given without gpu_kind")
        if gpus is not None and (not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1):
            raise ValueError(f"FlyBackend: gpus must be a positive integer, got {gpus!r}")
        self.gpu_kind = gpu_kind
        self.gpus = gpus if gpus is not None else (1 if gpu_kind is not None else None)
        self.env: dict[str, str] = _str_mapping("env", env)
        for key, value in self.env.items():
            if key == "FLY_API_TOKEN" or (self._token and value == self._token):
                raise ValueError(
                    f"FlyBackend: env[{key!r}] would hand the Fly API token to runners; "
                    "flame never does that (it would be readable in the machine config). "
                    "Set it as a Fly secret if runners really need it."
                )
            if key == "FLAME_PARENT":
                raise ValueError("FlyBackend: env['FLAME_PARENT'] is set by flame itself")
        self.init: dict[str, Any] = dict(init) if init is not None else {}
        self.services: list[dict[str, Any]] = [dict(s) for s in services or ()]
        self.metadata: dict[str, str] = _str_mapping("metadata", metadata)
        self.mounts: list[dict[str, Any]] = [dict(m) for m in mounts or ()]
        self.extra_config: dict[str, Any] = dict(extra_config) if extra_config else {}
        reserved = sorted(_RESERVED_CONFIG.intersection(self.extra_config))
        if reserved:
            raise ValueError(
                f"FlyBackend: extra_config may not set {', '.join(reserved)}: flame sets "
                "those itself (use the option of the same name where there is one)"
            )
        self.app_module = app_module
        if not isinstance(bind_host, str) or not bind_host:
            raise ValueError(f"FlyBackend: bind_host must be a host string, got {bind_host!r}")
        self.bind_host = bind_host
        if not isinstance(max_boot_retries, int) or max_boot_retries < 0:
            raise ValueError(
                f"FlyBackend: max_boot_retries must be an integer >= 0, got {max_boot_retries!r}"
            )
        self.max_boot_retries = max_boot_retries
        if not isinstance(retry_backoff, int | float) or retry_backoff < 0:
            raise ValueError(f"FlyBackend: retry_backoff must be >= 0, got {retry_backoff!r}")
        self.retry_backoff = float(retry_backoff)
        if not isinstance(request_timeout, int | float) or request_timeout <= 0:
            raise ValueError(f"FlyBackend: request_timeout must be > 0, got {request_timeout!r}")
        self.request_timeout = float(request_timeout)
        self._http: httpx.AsyncClient | None = None
        self._cleanups: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        token = "<hidden>" if self._token else "<missing>"
        return (
            f"<FlyBackend app={self.app!r} region={self.region!r} image={self.image!r} "
            f"host={self.host!r} cpu_kind={self.cpu_kind!r} cpus={self.cpus} "
            f"memory_mb={self.memory_mb} gpu_kind={self.gpu_kind!r} "
            f"env_keys={sorted(self.env)!r} token={token}>"
        )

    # -- configuration -------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``ValueError`` now if a setting needed to boot machines is missing.

        The message names the option and the environment variable it defaults to. Booting
        runs the same check; call this at start-up to fail fast.
        """
        values = {
            "token": self._token,
            "app": self.app,
            "image": self.image,
            "advertise_host": self.advertise_host,
        }
        missing = [option for option, value in values.items() if not value]
        if missing:
            what = ", ".join(f"{o} (environment variable {_ENV_VARS[o]})" for o in missing)
            them = "it" if len(missing) == 1 else "them"
            raise ValueError(
                f"FlyBackend is missing {what}. Pass {them} to FlyBackend(...) or set the "
                "environment: on a Fly machine FLY_APP_NAME, FLY_IMAGE_REF and FLY_PRIVATE_IP "
                "are set by Fly, and FLY_API_TOKEN is a secret you set "
                "(fly secrets set FLY_API_TOKEN=...)"
            )

    def listen_host(self) -> str:
        """Bind all addresses (``"::"``): runners dial in over Fly's IPv6 private network."""
        self.validate()
        return self.bind_host

    def advertise_hosts(self) -> Sequence[str]:
        """``[FLY_PRIVATE_IP]`` (or ``advertise_host``): the parent's 6PN address."""
        self.validate()
        assert self.advertise_host is not None
        return [self.advertise_host]

    def runner_app(self) -> Mapping[str, str] | None:
        """The ``app_module`` option as the runner's app, or ``None`` for the main module."""
        if self.app_module is None:
            return None
        if self.app_module.endswith(".py") or "/" in self.app_module:
            return {"path": self.app_module}
        return {"module": self.app_module}

    def machine_request(self, launch: RunnerLaunch, *, name: str | None = None) -> dict[str, Any]:
        """The JSON body of the create request for ``launch`` (pure, no I/O).

        Holds ``FLAME_PARENT`` (the runner's secret) in ``config.env``: do not log it.
        """
        self.validate()
        assert self.app is not None
        guest: dict[str, Any] = {
            "cpu_kind": self.cpu_kind,
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
        }
        if self.gpu_kind is not None:
            guest["gpu_kind"] = self.gpu_kind
            guest["gpus"] = self.gpus
        env = {**self.env, **dict(launch.env)}
        metadata = {
            **self.metadata,
            "flame_pool": launch.pool,
            "flame_runner_id": launch.runner_id,
            "flame_parent_ip": str(self.advertise_host),
            "flame_version": __version__,
        }
        parent_machine = os.environ.get("FLY_MACHINE_ID")
        if parent_machine:
            metadata["flame_parent_machine_id"] = parent_machine
        init: dict[str, Any] = {"cmd": list(launch.argv), **self.init}
        config: dict[str, Any] = {
            **self.extra_config,
            "image": self.image,
            "guest": guest,
            "auto_destroy": True,
            "restart": {"policy": "no"},
            "env": env,
            "metadata": metadata,
            "init": init,
            "services": [dict(s) for s in self.services],
        }
        if self.mounts:
            config["mounts"] = [dict(m) for m in self.mounts]
        body: dict[str, Any] = {
            "name": name or self._machine_name(),
            "config": config,
        }
        if self.region:
            body["region"] = self.region
        return body

    def _machine_name(self) -> str:
        return f"{self.app}-flame-{secrets.token_hex(10)}"

    # -- HTTP ------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            assert self._token is not None
            self._http = httpx.AsyncClient(
                base_url=self.host,
                headers={
                    "Authorization": _auth_header(self._token),
                    "User-Agent": f"flame-py/{__version__}",
                },
                timeout=httpx.Timeout(self.request_timeout),
                follow_redirects=False,
            )
        return self._http

    def _scrub(self, text: str) -> str:
        """Remove the token, and any runner's secrets Fly may echo back, from text that may
        end up in an error or a log line."""
        if self._token and self._token in text:
            text = text.replace(self._token, "<hidden>")
        return _redact.scrub(text)

    def _describe_answer(self, response: httpx.Response) -> str:
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            message = doc["error"]
        else:
            message = response.text.strip() or response.reason_phrase
        return self._scrub(f"HTTP {response.status_code}: {message[:300]}")

    def _machines_path(self) -> str:
        return f"/v1/apps/{self.app}/machines"

    # -- booting ---------------------------------------------------------------------------

    async def boot(self, launch: RunnerLaunch) -> FlyMachineHandle:
        """Create one machine for ``launch`` and return its handle.

        Returns as soon as Fly accepted the machine; dialling in is the pool's business.
        Raises :class:`flame.BootError` with Fly's status and message when Fly refuses, or
        keeps answering "not now" past ``max_boot_retries``.
        """
        body = self.machine_request(launch)
        name: str = body["name"]
        client = self._client()
        attempts = 0
        unsure = False  # a machine may exist although no answer said so
        last = ""
        in_flight = False
        try:
            while True:
                attempts += 1
                retry_after: float | None = None
                try:
                    in_flight = True
                    response = await client.post(self._machines_path(), json=body)
                    in_flight = False
                except httpx.TransportError as exc:
                    in_flight = False
                    last = self._scrub(f"{type(exc).__name__}: {exc}")
                    if not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                        unsure = True
                        found = await self._find_by_name(name)
                        if found is not None:
                            return self._adopt(found, launch)
                else:
                    if response.is_success:
                        machine = _json_object(response)
                        if machine is not None and isinstance(machine.get("id"), str):
                            return self._adopt(machine, launch)
                        unsure = True
                        found = await self._find_by_name(name)
                        if found is not None:
                            return self._adopt(found, launch)
                        last = f"HTTP {response.status_code} without a machine id"
                    else:
                        last = self._describe_answer(response)
                        status = response.status_code
                        if status >= 500:
                            unsure = True
                            found = await self._find_by_name(name)
                            if found is not None:
                                return self._adopt(found, launch)
                        elif status not in RETRY_STATUSES:
                            raise BootError(
                                f"Fly Machines API refused to create a machine in app "
                                f"{self.app!r}: {last}{_hint(status)}"
                            )
                        retry_after = _retry_after(response)
                if attempts > self.max_boot_retries:
                    raise BootError(
                        f"Fly Machines API did not create a machine in app {self.app!r} "
                        f"after {attempts} attempts; last answer: {last}"
                    )
                delay = self._backoff(attempts, retry_after)
                logger.info(
                    "fly: create attempt %d for pool %r failed (%s); retrying in %.2fs",
                    attempts,
                    launch.pool,
                    last,
                    delay,
                )
                await asyncio.sleep(delay)
        except BootError:
            if unsure:  # shielded: a cancel now must not leave the machine behind
                await asyncio.shield(self._spawn_cleanup(self._destroy_by_name(name)))
            raise
        except asyncio.CancelledError:
            if unsure or in_flight:
                self._spawn_cleanup(self._destroy_by_name(name))
            raise

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        base = min(MAX_BACKOFF, self.retry_backoff * 2.0 ** (attempt - 1))
        delay = base * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_BACKOFF * 2))
        return delay

    def _adopt(self, machine: Mapping[str, Any], launch: RunnerLaunch) -> FlyMachineHandle:
        handle = FlyMachineHandle(self, machine)
        logger.info(
            "fly: created machine %s (%s) in %s for pool %r runner %s",
            handle.id,
            handle.machine_name,
            handle.region or "?",
            launch.pool,
            launch.runner_id,
        )
        return handle

    async def _find_by_name(self, name: str) -> dict[str, Any] | None:
        """The live machine called ``name``, or ``None`` (also when the look-up fails)."""
        try:
            response = await self._client().get(self._machines_path())
        except httpx.TransportError:
            return None
        if not response.is_success:
            return None
        try:
            machines = response.json()
        except ValueError:
            return None
        if not isinstance(machines, list):
            return None
        for machine in machines:
            if (
                isinstance(machine, dict)
                and machine.get("name") == name
                and isinstance(machine.get("id"), str)
                and machine.get("state") not in ("destroying", "destroyed")
            ):
                return machine
        return None

    async def _destroy_by_name(self, name: str, *, looks: int = 3) -> None:
        """Destroy the machine called ``name`` if it exists (after a boot that may have
        made it). Looks ``looks`` times, a second apart, in case the create is still being
        carried out; gives up quietly."""
        for look in range(looks):
            machine = await self._find_by_name(name)
            if machine is not None:
                logger.info("fly: destroying machine %s left by a failed boot", machine["id"])
                await FlyMachineHandle(self, machine).stop()
                return
            if look + 1 < looks:
                await asyncio.sleep(1.0)

    def _spawn_cleanup(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def aclose(self) -> None:
        """Wait (up to 15 s) for machine clean-ups still in flight, then close the client."""
        pending = [t for t in self._cleanups if not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=CLEANUP_GRACE)
            for task in late:
                logger.warning("fly: a machine clean-up did not finish before close")
                task.cancel()
        client, self._http = self._http, None
        if client is not None:
            await client.aclose()


class FlyMachineHandle(RunnerHandle):
    """One Fly machine booted by :class:`FlyBackend`.

    ``id`` is the machine id. :meth:`stop` destroys the machine (``force=true``);
    :meth:`wait` resolves once the machine has stopped or been destroyed.
    """

    def __init__(self, backend: FlyBackend, machine: Mapping[str, Any]) -> None:
        self._backend = backend
        self._id = str(machine["id"])
        self.machine_name: str | None = _opt_str(machine.get("name"))
        self.instance_id: str | None = _opt_str(machine.get("instance_id"))
        self.private_ip: str | None = _opt_str(machine.get("private_ip"))
        self.region: str | None = _opt_str(machine.get("region"))
        self.state: str | None = _opt_str(machine.get("state"))
        self._exit: str | None = None
        self._stop_task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        """The Fly machine id."""
        return self._id

    def __repr__(self) -> str:
        return (
            f"<FlyMachineHandle id={self._id!r} name={self.machine_name!r} "
            f"region={self.region!r} state={self.state!r}>"
        )

    def _path(self) -> str:
        return f"{self._backend._machines_path()}/{self._id}"

    def diagnostics(self) -> str:
        """Where the machine was and what it last did, and how to read its logs."""
        parts = [f"Fly machine {self._id}"]
        if self.region:
            parts.append(f"in {self.region}")
        if self.state:
            parts.append(f"last seen {self.state}")
        if self._exit:
            parts.append(f"({self._exit})")
        text = " ".join(parts)
        return f"{text}; logs: fly logs --app {self._backend.app} --machine {self._id}"

    async def stop(self) -> None:
        """Destroy the machine (``DELETE ...?force=true``). Idempotent; 404 counts as done.

        The destroy runs in its own task, so it completes even if the caller is cancelled.
        A machine that cannot be destroyed is logged (it still destroys itself when its
        runner exits, thanks to ``auto_destroy``); this method does not raise for it.
        """
        if self._stop_task is None:
            self._stop_task = self._backend._spawn_cleanup(self._destroy())
        await asyncio.shield(self._stop_task)

    async def _destroy(self) -> None:
        backend = self._backend
        client = backend._client()
        last = ""
        for attempt in range(1, 5):
            try:
                response = await client.delete(self._path(), params={"force": "true"})
            except httpx.TransportError as exc:
                last = backend._scrub(f"{type(exc).__name__}: {exc}")
            else:
                if response.is_success or response.status_code == 404:
                    self.state = "destroyed"
                    logger.info("fly: destroyed machine %s", self._id)
                    return
                last = backend._describe_answer(response)
                status = response.status_code
                if status not in RETRY_STATUSES and status < 500:
                    state = await self._fetch_state()
                    if state is None or state in ("destroying", "destroyed"):
                        self.state = state or "destroyed"
                        return
            await asyncio.sleep(min(2.0, backend.retry_backoff) * attempt * random.uniform(0.5, 1))
        logger.warning(
            "fly: could not destroy machine %s (%s); it is destroyed when its runner exits",
            self._id,
            last,
        )

    async def _fetch_state(self) -> str | None:
        """The machine's state, ``None`` if Fly no longer knows it; raises nothing else."""
        try:
            response = await self._backend._client().get(self._path())
        except httpx.TransportError:
            return self.state
        if response.status_code == 404:
            return None
        machine = _json_object(response) if response.is_success else None
        if machine is None:
            return self.state
        self.state = _opt_str(machine.get("state")) or self.state
        exit_text = _exit_description(machine)
        if exit_text:
            self._exit = exit_text
        return self.state

    async def _ended(self) -> str | None:
        """A description if the machine is over (per a fresh GET), else ``None``."""
        state = await self._fetch_state()
        if state is None:
            self.state = "destroyed"
            return self._end_text()
        if state in TERMINAL_STATES:
            return self._end_text()
        return None

    def _end_text(self) -> str:
        machine = f"Fly machine {self.state or 'gone'}"
        return f"{self._exit}; {machine}" if self._exit else machine

    async def wait(self) -> str:
        """Resolve when the machine has stopped or been destroyed.

        Long-polls ``GET .../wait?state=stopped`` (one request a minute while the runner
        lives), and confirms with a ``GET`` of the machine whenever the poll times out or
        answers something unexpected.
        """
        params: dict[str, str | int] = {"state": "stopped", "timeout": WAIT_SECONDS}
        if self.instance_id:
            params["instance_id"] = self.instance_id
        while True:
            try:
                response: httpx.Response | None = await self._backend._client().get(
                    f"{self._path()}/wait",
                    params=params,
                    timeout=WAIT_SECONDS + self._backend.request_timeout,
                )
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 404:
                self.state = "destroyed"
                return self._end_text()
            ended = await self._ended()
            if ended is not None:
                return ended
            if response is None or response.status_code not in (200, 408):
                # Not a long-poll answer (an outage, an API change): do not spin.
                await asyncio.sleep(max(1.0, self._backend.retry_backoff * 5))


def _str_mapping(option: str, value: Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"FlyBackend: {option} must be a mapping of strings to strings")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise ValueError(f"FlyBackend: {option} must map strings to strings; {key!r} does not")
        out[key] = item
    return out


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        doc = response.json()
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _hint(status: int) -> str:
    if status == 401:
        return " (check the token: FlyBackend(token=...) or FLY_API_TOKEN)"
    if status == 403:
        return " (the token may not be allowed to manage machines of this app)"
    if status == 404:
        return " (check the app name: FlyBackend(app=...) or FLY_APP_NAME)"
    return ""


def _exit_description(machine: Mapping[str, Any]) -> str | None:
    """Describe the machine's most recent exit event ("exited with code 3 (idle shutdown)")."""
    events = machine.get("events")
    if not isinstance(events, list):
        return None
    for event in events:
        if not isinstance(event, dict) or event.get("type") != "exit":
            continue
        request = event.get("request")
        exit_event = request.get("exit_event") if isinstance(request, dict) else None
        if not isinstance(exit_event, dict):
            continue
        code = exit_event.get("exit_code")
        text = describe_exit(code) if isinstance(code, int) else "exited"
        if exit_event.get("oom_killed"):
            text += ", out of memory"
        return text
    return None
