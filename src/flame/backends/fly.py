"""``FlyBackend``: every runner is a Fly.io Machine, created through the Machines API.

This module owns the conversation with the Fly Machines API (``https://api.machines.dev``),
held to Fly's published OpenAPI document and rules: one ``POST /v1/apps/{app}/machines``
per runner, a long-poll on ``.../wait`` to notice the machine's end, and, to get rid of it,
a graceful ``POST .../stop`` (SIGTERM, with a timeout) before ``DELETE ...?force=true``.

The machine runs the parent's own image (``FLY_IMAGE_REF``) in the parent's app and region,
with ``auto_destroy`` and restart policy ``"no"``: when the runner process exits, Fly
destroys the machine. Its environment is exactly the ``env`` option plus what the core puts
in ``RunnerLaunch.env`` (``FLAME_PARENT``), and the app's Fly secrets unless
``skip_secrets``. The API token is never part of ``env``: a machine's config can be read back
by anyone holding a token for the app, and a runner never needs it.

The rules the server enforces beyond its schema are obeyed before a request leaves:

* **Sizing** (``cpu_kind`` x ``cpus`` x ``memory_mb``) is checked at construction, and the
  defaults are valid on any parent (:data:`CPU_COUNTS`, :data:`MEMORY_PER_CPU`).
* **Rate limits** (:class:`FlyRateLimits`): every request waits for a token of a pacer, one
  per app and action in this process for create, list and get, one per machine and action
  for the others, so a burst of boots draws no 429 and still goes as fast as Fly allows.
* **Errors** are classified by the body's ``status`` (``insufficient_capacity``...) and the
  HTTP code: capacity and rate limits are retried with back-off, an invalid request fails at
  once with Fly's reason, and every BootError quotes Fly's ``fly-request-id``.

Leaks cost money, so every path that may have created a machine ends in its destruction:

* answers that leave it unclear whether the machine exists (a dropped connection, a 5xx, a
  cancelled boot) are followed, after the back-off and before any new create, by a look-up
  of the machine by its runner id (``?summary=true&metadata.flame_runner_id=...``) and
  name, and what is found is adopted or destroyed: a lost answer leaves no machine behind
  and makes no twin;
* :meth:`FlyMachineHandle.stop` tolerates "already gone", is idempotent, and finishes even
  when the task awaiting it is cancelled;
* :meth:`FlyBackend.aclose` waits (bounded) for clean-ups still in flight.

Settings that come from the environment (token, app, image, private IP) are read when the
backend is built but checked when it is first *used* (:meth:`FlyBackend.listen_host`,
:meth:`~FlyBackend.advertise_hosts`, :meth:`~FlyBackend.boot`), so that an application that
builds a ``FlyBackend`` at import time can still be imported on a laptop, in CI, or on the
runner itself. Call :meth:`FlyBackend.validate` to fail fast at start-up instead.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import random
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .. import _redact
from .._errors import BootError
from .._exits import describe_exit
from .._version import __version__
from ._base import Backend, RunnerHandle, RunnerLaunch

try:
    import httpx
except ImportError:  # pragma: no cover - exercised only without the extra installed
    httpx = None  # type: ignore[assignment]

__all__ = ["FlyBackend", "FlyMachineHandle", "FlyRateLimits", "RateLimit"]

logger = logging.getLogger("flame.fly")

DEFAULT_HOST = "https://api.machines.dev"

#: CPU counts Fly offers for each ``cpu_kind``.
CPU_COUNTS: Mapping[str, tuple[int, ...]] = {
    "shared": (1, 2, 4, 6, 8),
    "performance": (1, 2, 4, 8, 16),
}
#: Memory Fly allows per CPU, in MiB (inclusive bounds), for each ``cpu_kind``.
MEMORY_PER_CPU: Mapping[str, tuple[int, int]] = {
    "shared": (256, 2048),
    "performance": (2048, 8192),
}
#: Memory comes in multiples of this many MiB.
MEMORY_STEP = 256
#: Memory a runner gets when neither ``memory_mb`` nor ``FLY_VM_MEMORY_MB`` says (brought
#: within the range its CPUs allow).
DEFAULT_MEMORY_MB = 4096
#: Fly's GPU presets all pair one GPU with 8 performance CPUs and 32 GiB.
GPU_CPUS, GPU_MEMORY_MB = 8, 32768

#: ``ErrorResponse.status`` values that mean "no capacity right now": retried.
CAPACITY_STATUSES = frozenset({"insufficient_capacity", "volume_placement_capacity"})
#: HTTP codes of a create that mean "not now": rate limited (429), no capacity found (412),
#: capacity vanished while placing (409). Other 4xx answers are final.
RETRY_HTTP = frozenset({409, 412, 429})

#: Longest single back-off between two create attempts, in seconds.
MAX_BACKOFF = 16.0

#: Fly's ``/wait`` endpoint accepts at most 60 seconds per request.
WAIT_SECONDS = 60

#: Machine states after which the runner is certainly gone.
TERMINAL_STATES = frozenset(
    {"stopped", "destroying", "destroyed", "failed", "launch_failed", "replaced"}
)
#: The states ``wait`` long-polls for (``stopped`` needs the machine's version).
_END_STATES = ("stopped", "failed", "destroyed")

#: How long :meth:`FlyBackend.aclose` waits for destroys still in flight.
CLEANUP_GRACE = 15.0

#: Seconds the pacer keeps between its schedule and Fly's bucket (at most half an
#: interval), so that requests that travel at slightly different speeds still arrive
#: within the limit.
PACE_MARGIN = 0.1

#: Machine config keys flame sets itself, which ``extra_config`` may not carry.
_RESERVED_CONFIG = frozenset(
    {"image", "guest", "auto_destroy", "restart", "env", "metadata", "init", "services", "mounts"}
)
#: Metadata keys flame sets on every runner machine.
_FLAME_METADATA = frozenset(
    {"flame_pool", "flame_runner_id", "flame_parent_ip", "flame_version", "flame_parent_machine_id"}
)

_ENV_VARS = {
    "token": "FLY_API_TOKEN",
    "app": "FLY_APP_NAME",
    "image": "FLY_IMAGE_REF",
    "advertise_host": "FLY_PRIVATE_IP",
}


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``burst`` requests at once, refilled at ``per_second``."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not self.per_second > 0 or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"RateLimit needs per_second > 0 and burst >= 1, got {self!r}")


@dataclass(frozen=True)
class FlyRateLimits:
    """The Machines API rate limits: by default, the ones Fly publishes.

    Fly allows each action 1 request a second with bursts of 3, per identifier (the app for
    create and list, the machine for the others), and Get Machine 5 a second with bursts of
    10. :class:`FlyBackend` paces its requests to these, and
    :class:`flame.testing.fly.FlyMachinesEmulator` enforces them; give both a faster one
    (:meth:`scaled`) for tests that boot many runners.
    """

    #: ``POST /machines``, per app.
    create: RateLimit = RateLimit(1.0, 3)
    #: ``GET /machines``, per app.
    list_machines: RateLimit = RateLimit(1.0, 3)
    #: ``GET /machines/{id}``, per machine (the backend paces it per app, to be safe).
    get_machine: RateLimit = RateLimit(5.0, 10)
    #: Each other action (wait, stop, delete), per machine.
    per_machine: RateLimit = RateLimit(1.0, 3)

    def scaled(self, factor: float) -> FlyRateLimits:
        """These limits with every rate multiplied by ``factor`` (bursts unchanged)."""
        return FlyRateLimits(
            *(
                RateLimit(limit.per_second * factor, limit.burst)
                for limit in (self.create, self.list_machines, self.get_machine, self.per_machine)
            )
        )


@dataclass
class _Slot:
    """One request's place in a :class:`_Pacer`'s schedule."""

    seq: int
    #: when it may go (``time.monotonic()``)
    due: float
    #: the pacer's theoretical arrival time before this request
    tat_before: float
    #: how many corrections the pacer had made when this slot was last checked
    seen: int


class _Pacer:
    """Schedules requests within a :class:`RateLimit`, for any thread or event loop.

    The schedule is the one Fly's bucket follows (GCRA: a theoretical arrival time moved
    ``1 / per_second`` by each request; a request may go once it is no more than
    ``burst - 1`` intervals ahead), kept a margin behind. A request counts from the moment
    its body has been written (:meth:`sent`): one that left later than its slot, as the
    first of a burst on a fresh connection does, moves the schedule of the requests behind
    it, which check for such moves before they go.
    """

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._tat = -math.inf
        self._seq = 0
        self._corrections: collections.deque[tuple[int, int, float]] = collections.deque(
            maxlen=256
        )  # (correction number, seq of the late request, seconds late)
        self._count = 0

    @property
    def _interval(self) -> float:
        return 1.0 / self.limit.per_second

    def reserve(self) -> _Slot:
        with self._lock:
            now = time.monotonic()
            interval = self._interval
            ahead = (self.limit.burst - 1) * interval
            margin = min(PACE_MARGIN, interval / 2)
            due = now
            if self._tat > now and self._tat - ahead + margin > now:  # no token to spare
                due = self._tat - ahead + margin
            slot = _Slot(self._seq, due, self._tat, self._count)
            self._seq += 1
            self._tat = max(self._tat, due) + interval
            return slot

    def sent(self, slot: _Slot, at: float) -> None:
        """The request of ``slot`` left at ``at``: if later than planned, Fly counts it later."""
        with self._lock:
            late = max(slot.tat_before, at) - max(slot.tat_before, slot.due)
            if late > 0:
                self._tat += late
                self._count += 1
                self._corrections.append((self._count, slot.seq, late))

    def _moved(self, slot: _Slot) -> float:
        """How far requests ahead of ``slot`` moved the schedule since it last looked."""
        with self._lock:
            moved = sum(
                late
                for number, seq, late in self._corrections
                if number > slot.seen and seq < slot.seq
            )
            slot.seen = self._count
            return moved

    def refund(self, slot: _Slot) -> None:
        """Give back the slot of a request that was never sent."""
        with self._lock:
            if slot.seq == self._seq - 1:  # the last one booked: undo it
                self._tat -= self._interval

    def drain(self) -> None:
        """Fly said 429: someone else uses the same limit; start from an empty bucket."""
        with self._lock:
            self._tat = max(self._tat, time.monotonic() + self.limit.burst * self._interval)

    async def wait(self) -> _Slot:
        """Wait for the next slot; returns it (hand it to :meth:`sent`)."""
        slot = self.reserve()
        try:
            while True:
                delay = slot.due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                moved = self._moved(slot)
                if moved <= 0:
                    return slot
                slot.due = max(slot.due, time.monotonic()) + moved
        except asyncio.CancelledError:
            self.refund(slot)
            raise


_pacers_lock = threading.Lock()
_pacers: dict[tuple[str, str, str, RateLimit], _Pacer] = {}


def _app_pacer(host: str, app: str, action: str, limit: RateLimit) -> _Pacer:
    """The process-wide pacer of one action of one app."""
    key = (host, app, action, limit)
    with _pacers_lock:
        pacer = _pacers.get(key)
        if pacer is None:
            pacer = _pacers[key] = _Pacer(limit)
        return pacer


def _forget_pacers() -> None:
    global _pacers_lock
    _pacers_lock = threading.Lock()
    _pacers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pacers)


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


def _sizes(kind: str) -> str:
    counts = CPU_COUNTS[kind]
    return ", ".join(map(str, counts[:-1])) + f" or {counts[-1]}"


def _size_rule(kind: str, cpus: int) -> tuple[int, int, str]:
    low, high = MEMORY_PER_CPU[kind]
    rule = (
        f"Fly's sizing rule for {kind} CPUs: {low}-{high} MiB per CPU, so "
        f"{low * cpus}-{high * cpus} MiB for cpus={cpus}, in steps of {MEMORY_STEP}"
    )
    return low * cpus, high * cpus, rule


def _guest_size(
    cpu_kind: str, cpus: int | None, memory_mb: int | None, gpu: bool
) -> tuple[int, int]:
    """``(cpus, memory_mb)``: the given ones checked against Fly's sizing rules, the
    missing ones derived so that they obey them. Raises ``ValueError`` naming the rule."""
    if cpu_kind not in CPU_COUNTS:
        raise ValueError(
            f"FlyBackend: cpu_kind must be 'shared' or 'performance' (Fly's CPU kinds), "
            f"got {cpu_kind!r}"
        )
    if cpus is None:
        available = GPU_CPUS if gpu else (os.cpu_count() or 1)
        cpus = max(c for c in CPU_COUNTS[cpu_kind] if c <= max(available, 1))
    elif not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
        raise ValueError(f"FlyBackend: cpus must be a positive integer, got {cpus!r}")
    elif cpus not in CPU_COUNTS[cpu_kind]:
        other = "shared" if cpu_kind == "performance" else "performance"
        raise ValueError(
            f"FlyBackend: cpus={cpus} is not a size Fly offers: {cpu_kind} CPUs come in "
            f"{_sizes(cpu_kind)} ({other}: {_sizes(other)})"
        )
    low, high, rule = _size_rule(cpu_kind, cpus)
    if memory_mb is None:
        wanted = _env_memory() or (GPU_MEMORY_MB if gpu else DEFAULT_MEMORY_MB)
        memory_mb = min(high, max(low, wanted)) // MEMORY_STEP * MEMORY_STEP
    elif not isinstance(memory_mb, int) or isinstance(memory_mb, bool):
        raise ValueError(f"FlyBackend: memory_mb must be an integer (MiB), got {memory_mb!r}")
    elif memory_mb % MEMORY_STEP or not low <= memory_mb <= high:
        raise ValueError(f"FlyBackend: memory_mb={memory_mb} is outside {rule}")
    return cpus, memory_mb


def _env_memory() -> int | None:
    """The parent's own memory (``FLY_VM_MEMORY_MB``, set by Fly), if it says one."""
    value = os.environ.get("FLY_VM_MEMORY_MB", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


class _Reply:
    """What one answer of the API says, read once."""

    def __init__(self, backend: FlyBackend, response: httpx.Response) -> None:
        self.code = response.status_code
        self.ok = response.is_success
        self.request_id = response.headers.get("fly-request-id") or ""
        try:
            self.doc: Any = response.json()
        except ValueError:
            self.doc = None
        doc = self.doc if isinstance(self.doc, dict) else {}
        status = doc.get("status")
        self.status = status if isinstance(status, str) else ""
        message = doc.get("message") or doc.get("error")
        if not isinstance(message, str) or not message:
            message = response.text.strip() or response.reason_phrase
        text = f"HTTP {self.code}: {message[:300]}"
        if self.status and self.status != "unknown":
            text += f" [{self.status}]"
        if self.request_id:
            text += f" (fly-request-id {self.request_id})"
        self.text = backend._scrub(text)
        self.retry_after = _retry_after(response)

    @property
    def kind(self) -> Literal["ok", "capacity", "name_taken", "unsure", "invalid"]:
        """``capacity``: not now, retry; ``name_taken``: a machine of this name exists;
        ``unsure``: it may or may not have been done (5xx, 408); ``invalid``: final."""
        if self.ok:
            return "ok"
        if self.status in CAPACITY_STATUSES:
            return "capacity"
        if self.status == "name_taken":
            return "name_taken"
        if self.code in RETRY_HTTP:
            return "capacity"
        if self.code >= 500 or self.code == 408:
            return "unsure"
        return "invalid"


class FlyBackend(Backend):
    """Boot each runner as a Fly.io Machine running the parent's own image.

    All options are keyword-only; the ones that default to an environment variable read it
    when the backend is built. Fly sets ``FLY_APP_NAME``, ``FLY_IMAGE_REF``, ``FLY_REGION``,
    ``FLY_PRIVATE_IP`` and ``FLY_VM_MEMORY_MB`` on every machine; ``FLY_API_TOKEN`` is yours
    to set, as a secret (``fly secrets set FLY_API_TOKEN="$(fly tokens create deploy)"``).

    Args:
        token: Fly API token (default ``FLY_API_TOKEN``). Macaroon tokens ("FlyV1 ...") and
            classic bearer tokens both work. Never logged, never shown in a repr, never
            put in a runner's ``env``.
        app: Fly app the machines are created in (default ``FLY_APP_NAME``).
        image: image the machines run (default ``FLY_IMAGE_REF``: the parent's own).
        region: region to create machines in (default ``FLY_REGION``; ``None`` lets Fly pick).
        host: base URL of the Machines API. Point it at
            :class:`flame.testing.fly.FlyMachinesEmulator` in tests.
        cpu_kind: ``"performance"`` (default) or ``"shared"``.
        cpus: CPUs per machine, a count Fly offers for ``cpu_kind`` (shared: 1, 2, 4, 6 or
            8; performance: 1, 2, 4, 8 or 16). Default: the largest such count not above the
            parent's ``os.cpu_count()`` (8 with a GPU).
        memory_mb: memory per machine in MiB, a multiple of 256 within Fly's range for the
            CPUs (shared: 256-2048 per CPU; performance: 2048-8192 per CPU). Default: the
            parent's own (``FLY_VM_MEMORY_MB``), else 4096 (32768 with a GPU), brought
            within that range.
        gpu_kind: GPU model (``"a100-pcie-40gb"``, ``"l40s"``...), or ``None`` for no GPU.
        gpus: number of GPUs (default 1 when ``gpu_kind`` is set).
        env: environment variables for the runners. Nothing of the parent's environment is
            passed on except this and ``FLAME_PARENT``: forward what the runner's import of
            your app needs (``DATABASE_URL``...). The app's Fly secrets also reach every
            machine unless ``skip_secrets``.
        skip_secrets: create the machines without the app's Fly secrets (default
            ``False``: runners get them, as every machine of the app does). With ``True``,
            a ``FLY_API_TOKEN`` kept as a secret stays off the runners too; pass what they
            need in ``env``.
        init: Fly's init object. By default the machine runs the runner command
            (``{"cmd": ["python", "-m", "flame", "runner"]}``, after the image's
            ENTRYPOINT); keys given here are laid over that default, so
            ``{"exec": [...]}`` replaces the whole command and ``{"swap_size_mb": 1024}``
            just adds swap.
        services: Fly services (public ports) for the machine; none by default, since the
            runner dials out and needs none.
        metadata: extra machine metadata (string values). flame adds ``flame_pool``,
            ``flame_runner_id``, ``flame_parent_ip`` and ``flame_version``; those keys, and
            the ``fly_`` keys Fly's own tools use (``fly deploy`` picks the machines it
            manages by ``fly_process_group``), are refused.
        mounts: Fly volume mounts (``[{"volume": "vol_...", "path": "/data"}]``).
        extra_config: further keys of the machine config (``checks``, ``stop_config``,
            ``files``, ``dns``...). Keys flame sets itself (image, guest, env, init,
            auto_destroy, restart, services, metadata, mounts) are refused.
        app_module: what the runner imports as "the application": a module name or a
            ``.py`` path inside the image. Default: the parent's main module.
        advertise_host: address runners dial to reach the parent (default
            ``FLY_PRIVATE_IP``).
        bind_host: address the parent's listener binds (default ``"::"``, all IPv6 and IPv4).
        max_boot_retries: how many times a create that Fly answered "not now" (capacity,
            429, 412, 409), a 5xx, or that was lost on the network, is tried again before
            :class:`flame.BootError` (default 5). An invalid request is never retried.
        retry_backoff: first back-off in seconds; it doubles each retry (up to 16 s), with
            jitter, and a ``Retry-After`` answer is honoured (default 1.0).
        request_timeout: timeout of each API request, in seconds (default 30).
        stop_timeout: how long :meth:`FlyMachineHandle.stop` lets a runner's machine stop
            after SIGTERM (``POST .../stop``) before destroying it by force; 0 destroys at
            once (default 5).
        rate_limits: the API rate limits requests are paced to (default: Fly's published
            ones, :class:`FlyRateLimits`). Raise them only if Fly raised yours.

    Raises:
        ValueError: at construction for a malformed option or a size Fly would refuse
            (naming the rule); at first use (or :meth:`validate`) when ``token``, ``app``,
            ``image`` or the advertised address is missing, naming the option and its
            environment variable.
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
        memory_mb: int | None = None,
        gpu_kind: str | None = None,
        gpus: int | None = None,
        env: Mapping[str, str] | None = None,
        skip_secrets: bool = False,
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
        stop_timeout: float = 5.0,
        rate_limits: FlyRateLimits | None = None,
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
        if gpus is not None and gpu_kind is None:
            raise ValueError("FlyBackend: gpus was given without gpu_kind")
        if gpus is not None and (not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1):
            raise ValueError(f"FlyBackend: gpus must be a positive integer, got {gpus!r}")
        self.cpu_kind = cpu_kind
        self.cpus, self.memory_mb = _guest_size(cpu_kind, cpus, memory_mb, gpu_kind is not None)
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
        if not isinstance(skip_secrets, bool):
            raise ValueError(
                f"FlyBackend: skip_secrets must be True or False, got {skip_secrets!r}"
            )
        self.skip_secrets = skip_secrets
        self.init: dict[str, Any] = dict(init) if init is not None else {}
        self.services: list[dict[str, Any]] = [dict(s) for s in services or ()]
        self.metadata: dict[str, str] = _str_mapping("metadata", metadata)
        for key in self.metadata:
            if key.lower().startswith(("fly_", "fly-")):
                raise ValueError(
                    f"FlyBackend: metadata key {key!r} is refused: keys starting with 'fly_' "
                    "belong to Fly's own tools (fly deploy updates or replaces the machines "
                    "it finds by fly_process_group and fly_platform_version)"
                )
            if key in _FLAME_METADATA:
                raise ValueError(f"FlyBackend: metadata key {key!r} is set by flame itself")
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
        if not isinstance(stop_timeout, int | float) or not 0 <= stop_timeout <= WAIT_SECONDS:
            raise ValueError(
                f"FlyBackend: stop_timeout must be between 0 and {WAIT_SECONDS} seconds, "
                f"got {stop_timeout!r}"
            )
        self.stop_timeout = float(stop_timeout)
        if rate_limits is not None and not isinstance(rate_limits, FlyRateLimits):
            raise ValueError(
                f"FlyBackend: rate_limits must be a FlyRateLimits, got {rate_limits!r}"
            )
        self.rate_limits = rate_limits or FlyRateLimits()
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
        if self.skip_secrets:
            body["skip_secrets"] = True
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

    def _pacer(self, action: Literal["create", "list", "get"]) -> _Pacer:
        limits = self.rate_limits
        limit = {
            "create": limits.create,
            "list": limits.list_machines,
            "get": limits.get_machine,
        }[action]
        return _app_pacer(self.host, str(self.app), action, limit)

    async def _send(self, pacer: _Pacer, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, once ``pacer`` allows it; a 429 also holds back the next ones."""
        client = self._client()  # first: making one takes long enough to skew the schedule
        slot = await pacer.wait()

        async def trace(event: str, info: Mapping[str, Any]) -> None:
            if event.endswith("send_request_body.complete"):
                pacer.sent(slot, time.monotonic())

        response = await client.request(method, path, extensions={"trace": trace}, **kwargs)
        if response.status_code == 429:
            pacer.drain()
        return response

    def _scrub(self, text: str) -> str:
        """Remove the token, and any runner's secrets Fly may echo back, from text that may
        end up in an error or a log line."""
        if self._token and self._token in text:
            text = text.replace(self._token, "<hidden>")
        return _redact.scrub(text)

    def _machines_path(self) -> str:
        return f"/v1/apps/{self.app}/machines"

    # -- booting ---------------------------------------------------------------------------

    async def boot(self, launch: RunnerLaunch) -> FlyMachineHandle:
        """Create one machine for ``launch`` and return its handle.

        Returns as soon as Fly accepted the machine; dialling in is the pool's business.
        Raises :class:`flame.BootError` with Fly's answer (and its ``fly-request-id``) when
        Fly refuses the request, or keeps answering "not now" past ``max_boot_retries``.
        """
        body = self.machine_request(launch)
        name: str = body["name"]
        attempts = 0
        unsure = False  # a machine may exist although no answer said so
        last = ""
        in_flight = False
        try:
            while True:
                attempts += 1
                if unsure:  # look before creating again: no twin, no orphan
                    found = await self._find(launch.runner_id, name)
                    if found is not None:
                        return self._adopt(found, launch)
                retry_after: float | None = None
                try:
                    in_flight = True
                    response = await self._send(
                        self._pacer("create"), "POST", self._machines_path(), json=body
                    )
                    in_flight = False
                except httpx.TransportError as exc:
                    in_flight = False
                    last = self._scrub(f"{type(exc).__name__}: {exc}")
                    if not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                        unsure = True  # sent, maybe carried out; the answer is lost
                else:
                    reply = _Reply(self, response)
                    kind = reply.kind
                    if kind == "ok":
                        machine = reply.doc if isinstance(reply.doc, dict) else {}
                        if isinstance(machine.get("id"), str):
                            return self._adopt(machine, launch)
                        kind, reply.text = "unsure", f"HTTP {reply.code} without a machine id"
                    last = reply.text
                    if kind == "name_taken" or (unsure and reply.code in (409, 422)):
                        # probably our own machine, made by an attempt whose answer was lost
                        found = await self._find(launch.runner_id, name)
                        if found is not None:
                            return self._adopt(found, launch)
                        unsure = True
                    elif kind == "unsure":
                        unsure = True
                    elif kind == "invalid":
                        raise BootError(
                            f"Fly Machines API refused to create a machine in app "
                            f"{self.app!r}: {last}{_hint(reply.code)}"
                        )
                    retry_after = reply.retry_after
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
                cleanup = self._destroy_by_name(launch.runner_id, name)
                await asyncio.shield(self._spawn_cleanup(cleanup))
            raise
        except asyncio.CancelledError:
            if unsure or in_flight:
                self._spawn_cleanup(self._destroy_by_name(launch.runner_id, name))
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

    async def _find(self, runner_id: str, name: str) -> dict[str, Any] | None:
        """The live machine of this runner called ``name``, or ``None`` (also when the
        look-up fails). Asks only for that runner's machines, in summary (no configs:
        other runners' environments stay where they are)."""
        params = {"summary": "true", "metadata.flame_runner_id": runner_id}
        try:
            response = await self._send(
                self._pacer("list"), "GET", self._machines_path(), params=params
            )
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

    async def _destroy_by_name(self, runner_id: str, name: str, *, looks: int = 3) -> None:
        """Destroy the machine called ``name`` if it exists (after a boot that may have
        made it). Looks ``looks`` times, a second apart, in case the create is still being
        carried out; gives up quietly."""
        for look in range(looks):
            machine = await self._find(runner_id, name)
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

    ``id`` is the machine id, ``version`` its version (``instance_id`` on older answers).
    :meth:`wait` resolves once the machine has stopped, failed or been destroyed;
    :meth:`stop` stops it gracefully (SIGTERM), then destroys it.
    """

    def __init__(self, backend: FlyBackend, machine: Mapping[str, Any]) -> None:
        self._backend = backend
        self._id = str(machine["id"])
        self.machine_name: str | None = _opt_str(machine.get("name"))
        self.version: str | None = _opt_str(machine.get("version")) or _opt_str(
            machine.get("instance_id")
        )
        self.private_ip: str | None = _opt_str(machine.get("private_ip"))
        self.region: str | None = _opt_str(machine.get("region"))
        self.state: str | None = _opt_str(machine.get("state"))
        self._exit: str | None = None
        self._host_status: str | None = None
        self._stop_task: asyncio.Task[None] | None = None
        # Fly limits each action per machine; each of ours gets its own pacer
        limit = backend.rate_limits.per_machine
        self._pacers = {action: _Pacer(limit) for action in ("wait", "stop", "delete")}
        self._version_param: str | None = "version"  # "instance_id", then None, if refused

    @property
    def id(self) -> str:
        """The Fly machine id."""
        return self._id

    @property
    def instance_id(self) -> str | None:
        """The machine's version, under its deprecated name."""
        return self.version

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
        if self._host_status and self._host_status != "ok":
            parts.append(f"(its host is {self._host_status}: the state may be stale)")
        if self._exit:
            parts.append(f"({self._exit})")
        text = " ".join(parts)
        return f"{text}; logs: fly logs --app {self._backend.app} --machine {self._id}"

    # -- requests --------------------------------------------------------------------------

    async def _fetch_state(self) -> str | None:
        """The machine's state, ``None`` if Fly no longer knows it; raises nothing else."""
        backend = self._backend
        try:
            response = await backend._send(backend._pacer("get"), "GET", self._path())
        except httpx.TransportError:
            return self.state
        if response.status_code == 404:
            return None
        machine = _json_object(response) if response.is_success else None
        if machine is None:
            return self.state
        self.state = _opt_str(machine.get("state")) or self.state
        self.version = (
            _opt_str(machine.get("version")) or _opt_str(machine.get("instance_id")) or self.version
        )
        self._host_status = _opt_str(machine.get("host_status"))
        exit_text = _exit_description(machine)
        if exit_text:
            self._exit = exit_text
        return self.state

    async def _wait_for(self, states: Sequence[str], timeout: int) -> httpx.Response | None:
        """One long-poll of ``.../wait`` for ``states``; ``None`` when it did not get through.

        Waiting for ``stopped`` needs the machine's version: without one (or once Fly
        refused both spellings of it) only the other states are asked for.
        """
        param = self._version_param if self.version else None
        wanted = [s for s in states if param is not None or s != "stopped"]
        params: list[tuple[str, str | int]] = [("state", s) for s in wanted]
        if param is not None and self.version:
            params.append((param, self.version))
        params.append(("timeout", timeout))
        backend = self._backend
        try:
            response = await backend._send(
                self._pacers["wait"],
                "GET",
                f"{self._path()}/wait",
                params=params,
                timeout=timeout + backend.request_timeout,
            )
        except httpx.TransportError:
            return None
        if response.status_code == 400 and param is not None:
            # a server that wants the deprecated name, or none: try the next spelling
            self._version_param = "instance_id" if param == "version" else None
        return response

    async def wait(self) -> str:
        """Resolve when the machine has stopped, failed or been destroyed.

        Long-polls ``GET .../wait?state=stopped&state=failed&state=destroyed&version=...``
        (one request a minute while the runner lives), and confirms with a ``GET`` of the
        machine, which also carries its exit event, whenever the poll ends.
        """
        while True:
            if self.state == "destroyed":
                return self._end_text()
            if not self.version:
                await self._fetch_state()
            response = await self._wait_for(_END_STATES, WAIT_SECONDS)
            if response is not None and response.status_code == 404:
                self.state = "destroyed"
                return self._end_text()
            ended = await self._ended()
            if ended is not None:
                return ended
            if response is None or response.status_code not in (200, 408):
                # Not a long-poll answer (an outage, a rate limit, an API change): no spin.
                await asyncio.sleep(max(1.0, self._backend.retry_backoff * 5))

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

    async def stop(self) -> None:
        """Stop the machine, then destroy it. Idempotent; "not found" counts as done.

        First ``POST .../stop`` with SIGTERM and the backend's ``stop_timeout`` (after which
        Fly sends SIGKILL), waiting up to that long for the machine to stop; then
        ``DELETE ...?force=true`` unless it is known to be destroyed already. Runs in its
        own task, so it completes even if the caller is cancelled. A machine that cannot be
        destroyed is logged (it still destroys itself when its runner exits, thanks to
        ``auto_destroy``); this method does not raise for it.
        """
        if self._stop_task is None:
            self._stop_task = self._backend._spawn_cleanup(self._shut_down())
        await asyncio.shield(self._stop_task)

    async def _shut_down(self) -> None:
        if self.state == "destroyed":  # seen destroyed: nothing left to release
            logger.info("fly: destroyed machine %s (auto_destroy, as its runner exited)", self._id)
            return
        if self._backend.stop_timeout > 0 and self.state not in TERMINAL_STATES:
            await self._stop_gracefully()
            if self.state == "destroyed":
                logger.info("fly: destroyed machine %s (it stopped on SIGTERM)", self._id)
                return
        await self._destroy()

    async def _stop_gracefully(self) -> None:
        backend = self._backend
        grace = math.ceil(backend.stop_timeout)
        body = {"signal": "SIGTERM", "timeout": f"{grace}s"}
        try:
            response = await backend._send(
                self._pacers["stop"], "POST", f"{self._path()}/stop", json=body
            )
        except httpx.TransportError:
            return
        if response.status_code == 404:
            self.state = "destroyed"
            return
        if not response.is_success:
            return  # destroyed already (400), or refused: the forced destroy follows
        waited = await self._wait_for(
            ("stopped", "destroyed", "failed"), min(WAIT_SECONDS, grace + 2)
        )
        if waited is not None and waited.status_code == 404:
            self.state = "destroyed"
        elif waited is not None and waited.is_success:
            doc = _json_object(waited) or {}
            self.state = _opt_str(doc.get("state")) or self.state

    async def _destroy(self) -> None:
        backend = self._backend
        last = ""
        for attempt in range(1, 5):
            try:
                response = await backend._send(
                    self._pacers["delete"], "DELETE", self._path(), params={"force": "true"}
                )
            except httpx.TransportError as exc:
                last = backend._scrub(f"{type(exc).__name__}: {exc}")
            else:
                if response.is_success or response.status_code == 404:
                    self.state = "destroyed"
                    logger.info("fly: destroyed machine %s", self._id)
                    return
                reply = _Reply(backend, response)
                last = reply.text
                if reply.kind == "invalid":
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
    """Describe the machine's most recent exit event ("exited with code 3 (idle shutdown)").

    The exit event sits in the event's ``request``, directly or under ``MonitorEvent``.
    Fly's Go types leave zero values out, so an exit event without a code or a signal is an
    exit with code 0. Which of ``exit_code`` and ``guest_exit_code`` carries the runner
    process's own code is not documented: ``exit_code`` is read first.
    """
    events = machine.get("events")
    if not isinstance(events, list):
        return None
    for event in events:
        if not isinstance(event, dict) or event.get("type") != "exit":
            continue
        request = event.get("request")
        if not isinstance(request, dict):
            continue
        exit_event = request.get("exit_event")
        monitor = request.get("MonitorEvent")
        if not isinstance(exit_event, dict) and isinstance(monitor, dict):
            exit_event = monitor.get("exit_event")
        if not isinstance(exit_event, dict):
            continue
        code = _first_int(exit_event, "exit_code", "guest_exit_code")
        sig = _first_int(exit_event, "signal", "guest_signal")
        if code is None and sig:
            code = -sig
        text = describe_exit(code if code is not None else 0)
        if exit_event.get("oom_killed"):
            text += ", out of memory"
        return text
    return None


def _first_int(doc: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = doc.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value != 0:
            return value
    return None
