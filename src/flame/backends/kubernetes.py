"""``KubernetesBackend``: each runner is a Pod cloned from the parent's own Pod.

What this module owns: turning one :class:`RunnerLaunch` into one runner Pod (and one
Secret), watching that Pod until it is gone, and deleting both. The Kubernetes API is reached
through lightkube (optional extra ``flame-py[kubernetes]``), imported on first use so that
``import flame`` works without it.

The parent finds its own Pod from ``POD_NAME`` / ``POD_NAMESPACE`` (the downward API) and
reads its spec once. A runner Pod is a *trimmed* copy of it: the app container's image, env,
``envFrom``, working directory, resources and security context, the Pod's service account,
image pull secrets, scheduling constraints and its config-like volumes (ConfigMaps, Secrets,
projected, downward API, emptyDir). It does not copy the parent's labels (a Service or
ReplicaSet selecting the parent must not select runners), probes, ports, lifecycle hooks,
init containers, sidecars (unless named in ``keep_containers``) or persistent volumes: with
``restartPolicy: Never`` a sidecar would keep a finished runner's Pod running, so a runner's
end is read from its own container's status. The command is the runner's
(``python -m flame runner``), ``restartPolicy`` is ``Never``, and an ``ownerReference`` to the
parent Pod (``controller: true``, so no controller can adopt it) lets the cluster's garbage
collector delete the runner when the parent goes away, even if the parent dies without
cleaning up.

The runner's secret (``FLAME_PARENT``) never appears in the Pod spec, where anyone allowed to
read Pods could see it. It goes into a Secret that is created *before* the Pod, owned at first
by the parent Pod, then re-owned by the runner Pod as soon as that exists, and referenced from
the Pod with ``valueFrom.secretKeyRef``. So at every moment the Secret has a living owner, is
collected with its runner (or with the parent, if the parent dies in between), and is also
deleted explicitly by :meth:`PodHandle.stop`. The parent never reads Secrets.

Nothing is left behind when answers get lost. The backend names the Pod and the Secret
itself (:func:`runner_names`) before asking for them, so a request that failed in a way that
may have taken effect (a dropped connection, a timeout, a 5xx) is repeated as it was: a
create answered 409 AlreadyExists then means the earlier attempt made it. Whatever a failed
or cancelled boot may have created is deleted by name. And the first boot of each backend
sweeps the namespace for runner Pods whose parent Pod is gone (or that an earlier process of
this parent left finished), which the garbage collector misses after ``--cascade=orphan``.

Life of a runner Pod::

    boot()   pick names -> create Secret (owner: parent Pod) -> create Pod
             -> re-own Secret (owner: runner Pod); each step retried on ambiguous failures;
             on any failure or cancellation: delete both by name, raise BootError
    wait()   GET the Pod, then watch it; resolve with a description when it is deleted, its
             runner container has ended (or the Pod Succeeded/Failed), cannot pull its image
             or build its container, or is Unschedulable (unless wait_for_capacity=True)
    stop()   delete the Pod and the Secret; 404 is success; retried; idempotent
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _redact
from .._errors import BootError
from .._exits import ExitCode
from ._base import Backend, RunnerHandle, RunnerLaunch

if TYPE_CHECKING:
    from lightkube import AsyncClient

__all__ = ["KubernetesBackend", "PodHandle"]

logger = logging.getLogger("flame.backends.kubernetes")

T = TypeVar("T")
Manifest = dict[str, Any]
PodTemplateHook = Callable[[Manifest], "Manifest | None"]

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_POOL = "flame-py/pool"
LABEL_RUNNER = "flame-py/runner-id"
LABEL_PARENT = "flame-py/parent"
LABEL_PARENT_UID = "flame-py/parent-uid"
LABEL_INSTANCE = "flame-py/instance"
ANNOTATION_POOL = "flame-py/pool"
ANNOTATION_PARENT = "flame-py/parent"

_INSTALL_HINT = "KubernetesBackend needs lightkube: pip install 'flame-py[kubernetes]'"
_RBAC_HINT = "the parent's service account needs the Role in docs/backends/kubernetes.md"

#: Pod spec fields copied from the parent Pod to runner Pods.
_CLONED_POD_FIELDS = (
    "serviceAccountName",
    "automountServiceAccountToken",
    "imagePullSecrets",
    "securityContext",
    "nodeSelector",
    "affinity",
    "tolerations",
    "priorityClassName",
    "runtimeClassName",
    "dnsPolicy",
    "dnsConfig",
    "hostAliases",
    "enableServiceLinks",
    "terminationGracePeriodSeconds",
)
#: Fields of the parent's app container copied to the runner container.
_CLONED_CONTAINER_FIELDS = ("imagePullPolicy", "workingDir", "envFrom", "securityContext")
#: Volume types that are safe to mount in another Pod (no persistent or node-bound storage).
_CLONED_VOLUME_TYPES = frozenset({"configMap", "secret", "projected", "downwardAPI", "emptyDir"})
_SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Container waiting reasons after which a runner Pod will not start by itself.
_FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)
_RETRY_DELAY = 1.0  # seconds between attempts to re-establish a broken watch
_ATTEMPTS = 3  # tries of one API request that failed in a way worth retrying
_RETRY_AFTER_MAX = 2.0  # the most a server's retryAfterSeconds delays a retry here
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet Kubernetes uses for generateName
_FINISHED = ("Succeeded", "Failed")
_WATCH_SERVER_TIMEOUT = 60  # the API server ends each watch after this; lightkube resumes it
_LOG_TAIL_LINES = 20
_ACLOSE_WAIT = 30.0  # seconds aclose() waits for deletions under way

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def _require_lightkube() -> None:
    try:
        import lightkube  # noqa: F401
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc


def _label_value(text: str) -> str:
    """``text`` made into a valid label value (at most 63 characters, alphanumeric ends)."""
    value = re.sub(r"^[^A-Za-z0-9]+", "", re.sub(r"[^A-Za-z0-9_.-]", "-", text))
    value = re.sub(r"[^A-Za-z0-9]+$", "", value[:63])
    return value or "unnamed"


def _name_prefix(parent_name: str) -> str:
    """The start of runner Pod names: the parent's name (shortened), then ``-flame-``.

    Kept short enough that the whole name (8 more characters) is a valid host name.
    """
    base = re.sub(r"[^a-z0-9-]", "-", parent_name.lower())[:48].strip("-") or "flame"
    return f"{base}-flame-"


def runner_names(parent_name: str) -> tuple[str, str]:
    """Fresh names for a runner's Pod and Secret: ``<parent>-flame-<8 random>`` and
    ``<parent>-flame-secret-<the same 8>``.

    The backend picks names itself (no ``generateName``) so that it knows them before it
    asks: a create whose answer is lost can be repeated (the second answer is 201 or 409,
    both meaning the object exists) and anything left by a failed boot deleted by name.
    """
    token = "".join(secrets.choice(_NAME_CHARS) for _ in range(8))
    prefix = _name_prefix(parent_name)
    return prefix + token, prefix + "secret-" + token


_instance: tuple[int, str] | None = None


def _process_instance() -> str:
    """A random id of this process (a new one after ``fork``), labelling the runners it boots."""
    global _instance
    if _instance is None or _instance[0] != os.getpid():
        _instance = (os.getpid(), secrets.token_hex(6))
    return _instance[1]


def _quantities(resources: Mapping[str, Any]) -> Manifest:
    """Resource requirements with numeric quantities written as strings, as the API stores them."""
    out: Manifest = {}
    for section, values in resources.items():
        if section in ("limits", "requests"):
            out[section] = {str(k): str(v) for k, v in values.items()}
        else:
            out[section] = copy.deepcopy(values)
    return out


def _owner_reference(obj: Mapping[str, Any]) -> Manifest:
    meta = obj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": obj.get("kind") or "Pod",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


def describe_pod(pod: Mapping[str, Any]) -> str:
    """One line on a Pod's state, for diagnostics: phase, conditions, container state."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    parts = [f"pod {meta.get('namespace')}/{meta.get('name')}: {status.get('phase', 'Unknown')}"]
    if status.get("reason"):
        parts.append(f"{status['reason']}: {status.get('message', '')}".rstrip(": "))
    for cond in status.get("conditions") or []:
        if cond.get("status") == "False" and cond.get("reason"):
            text = f"{cond['type']}=False {cond['reason']}"
            if cond.get("message"):
                text += f": {cond['message']}"
            parts.append(text)
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        for key in ("waiting", "terminated"):
            detail = state.get(key)
            if detail:
                text = f"container {cs.get('name')} {key}"
                if "exitCode" in detail:
                    text += f" with code {detail['exitCode']}"
                if detail.get("reason"):
                    text += f" ({detail['reason']})"
                if detail.get("message"):
                    text += f": {detail['message']}"
                parts.append(text)
    return "; ".join(parts)


def _exit_reason(code: Any, reason: Any) -> str:
    """What a container's exit means: the runtime's reason when it says more than "Error"
    (OOMKilled...), else the signal (128 + n), else what flame's runner exit codes mean."""
    if reason and reason not in ("Error", "Completed"):
        return str(reason)
    if isinstance(code, int) and 128 < code < 128 + 65:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(code - 128).name}"
    if isinstance(code, int):
        with contextlib.suppress(ValueError):
            return ExitCode(code).describe()
    return str(reason or "unknown")


def _terminated(term: Mapping[str, Any]) -> str:
    code = term.get("exitCode")
    text = f"exited with code {code} ({_exit_reason(code, term.get('reason'))})"
    if term.get("message"):
        text += f": {term['message']}"
    return text


def _failed(pod: Mapping[str, Any], container: str | None) -> bool:
    """Whether the runner ended with an error (its output then helps the message)."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and cs.get("name") == container:
            return bool(term.get("exitCode") != 0)
    return status.get("phase") == "Failed"


def pod_outcome(
    pod: Mapping[str, Any], *, wait_for_capacity: bool = False, container: str | None = None
) -> str | None:
    """Why a runner Pod is finished or will never start, or ``None`` while it may still run.

    ``container`` names the runner's container: once it has terminated the runner is over,
    even while other containers (a service mesh proxy, a log shipper) keep the Pod Running,
    and only its own waiting reasons count. Without it, the Pod's phase and any container
    decide. The text is a predicate about the runner ("exited with code 1 (Error)", "could
    not start its container app: ErrImagePull: ...", "could not be scheduled
    (Unschedulable): ...").
    """
    status = pod.get("status") or {}
    phase = status.get("phase")
    statuses = status.get("containerStatuses") or []
    if container is not None:
        statuses = [cs for cs in statuses if cs.get("name") == container] or statuses
        for cs in statuses:
            term = (cs.get("state") or {}).get("terminated")
            if term and cs.get("name") == container:
                return _terminated(term)
    if phase in _FINISHED:
        for cs in statuses:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                return _terminated(term)
        reason = status.get("reason") or phase
        return f"failed: {reason}: {status.get('message', '')}".rstrip(": ")
    for cs in statuses:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _FATAL_WAITING:
            return (
                f"could not start its container {cs.get('name')}: {waiting['reason']}: "
                f"{waiting.get('message', '')}".rstrip(": ")
            )
    if phase != "Pending":
        return None
    if not wait_for_capacity:
        for cond in status.get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                return f"could not be scheduled (Unschedulable): {cond.get('message', '')}"
    return None


def _api_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions lightkube raises for API, configuration and transport failures."""
    from lightkube import ApiError, ConfigError

    # lightkube's transport is httpx (or its fork httpx2): take HTTPError from ApiError's bases
    http_error = next((c for c in ApiError.__mro__ if c.__name__ == "HTTPError"), ApiError)
    return (ApiError, ConfigError, http_error, OSError)


def _http_module() -> Any:
    """lightkube's HTTP library (httpx, or its fork httpx2 from lightkube 1.0)."""
    from lightkube import ApiError

    status_error = next(c for c in ApiError.__mro__ if c.__name__ == "HTTPStatusError")
    return sys.modules[status_error.__module__.split(".")[0]]


def _status_code(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    code = getattr(status, "code", None)
    return code if isinstance(code, int) else None


#: transport errors raised before the request left: the server cannot have acted on it
_UNSENT = frozenset({"ConnectError", "ConnectTimeout", "PoolTimeout", "UnsupportedProtocol"})


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _maybe_applied(exc: BaseException) -> bool:
    """Whether the server may have carried the request out although no answer says so: the
    answer was lost (a dropped connection, a timeout) or the server timed out itself (504,
    or a 500 from a storage timeout)."""
    code = _status_code(exc)
    if code is not None:
        return code in (500, 504)
    names = _names(exc)
    return "TransportError" in names and not names & _UNSENT


def _retryable(exc: BaseException) -> bool:
    """Worth another try: a transport failure, throttling (429) or a server-side error."""
    code = _status_code(exc)
    if code is not None:
        return code in (429, 500, 502, 503, 504)
    return "TransportError" in _names(exc)


def _retry_delay(exc: BaseException, attempt: int) -> float:
    details = getattr(getattr(exc, "status", None), "details", None)
    after = getattr(details, "retryAfterSeconds", None)
    if isinstance(after, int | float) and after > 0:
        return min(float(after), _RETRY_AFTER_MAX)
    return float(0.2 * 2**attempt)


async def _retrying(call: Callable[[], Awaitable[T]], *, give_up: Callable[[], bool]) -> T:
    """``call()``, tried again (up to ``_ATTEMPTS`` times) after an error worth retrying,
    unless ``give_up()`` says to stop; the last error is raised as it is."""
    for attempt in range(_ATTEMPTS):
        try:
            return await call()
        except _api_error_types() as exc:
            if not _retryable(exc) or attempt == _ATTEMPTS - 1 or give_up():
                raise
            logger.debug("retrying a Kubernetes API request after %r", exc)
            await asyncio.sleep(_retry_delay(exc, attempt))
    raise AssertionError("unreachable")


def _translate(exc: BaseException, action: str) -> BootError:
    """An API, configuration or transport error as a BootError saying what failed (no token,
    nor any runner secret the API may have echoed)."""
    return BootError(_redact.scrub(str(_describe_error(exc, action))))


def _describe_error(exc: BaseException, action: str) -> BootError:
    from lightkube import ApiError, ConfigError

    if isinstance(exc, ApiError):
        status = exc.status
        text = (
            f"Kubernetes API refused to {action}: {status.code} {status.reason}: {status.message}"
        )
        if status.code == 401:
            text += " (the API server rejected the client's credentials)"
        elif status.code == 403:
            text += f" ({_RBAC_HINT})"
        return BootError(text)
    if isinstance(exc, ConfigError):
        return BootError(f"Kubernetes client configuration error while trying to {action}: {exc}")
    return BootError(
        f"cannot reach the Kubernetes API to {action}: {type(exc).__name__}: {exc}".rstrip(": ")
    )


async def _collect(items: AsyncIterable[T]) -> list[T]:
    return [item async for item in items]


def _parent_of(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(uid, name)`` of the parent Pod that booted a runner Pod, if it can be told."""
    meta = pod.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "Pod" and ref.get("controller") and ref.get("uid"):
            return str(ref["uid"]), str(ref.get("name") or "")
    uid = (meta.get("labels") or {}).get(LABEL_PARENT_UID)
    name = (meta.get("annotations") or {}).get(ANNOTATION_PARENT)
    return (str(uid), str(name)) if uid and name else None


def _secret_of(pod: Mapping[str, Any]) -> str | None:
    """The Secret a runner Pod takes ``FLAME_PARENT`` from."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
            if e.get("name") == "FLAME_PARENT" and ref.get("name"):
                return str(ref["name"])
    return None


class PodHandle(RunnerHandle):
    """A runner Pod (and its Secret), as returned by :meth:`KubernetesBackend.boot`.

    Attributes:
        namespace: the namespace of the Pod.
        pod_name: the Pod's name (``None`` until it was created).
        secret_name: the name of the Secret holding the runner's environment.
        runner_id: the id the pool gave the runner.
    """

    def __init__(self, backend: KubernetesBackend, namespace: str, runner_id: str) -> None:
        self._backend = backend
        self.namespace = namespace
        self.runner_id = runner_id
        self.pod_name: str | None = None
        self.secret_name: str | None = None
        self._ended: str | None = None
        self._state = "not created"
        self._log_tail = ""
        self._stopped = False
        self._stopping: asyncio.Future[None] | None = None
        self._container: str | None = None  # the runner's container in the Pod
        self._abandoned = False  # the boot was cancelled: no more retries of its requests

    @property
    def id(self) -> str:
        """The Pod's name."""
        return self.pod_name or f"(pod of runner {self.runner_id})"

    def __repr__(self) -> str:
        return (
            f"<PodHandle {self.namespace}/{self.pod_name} runner_id={self.runner_id!r} "
            f"{'stopped' if self._stopped else self._ended or 'live'}>"
        )

    def diagnostics(self) -> str:
        """The Pod's last observed state, and the tail of its output if it failed."""
        text = self._state
        if self._log_tail:
            text += f"\nlast output of the runner container:\n{self._log_tail.rstrip()}"
        return text

    async def wait(self) -> str:
        """Resolve when the Pod is gone, finished, or cannot start, with the reason."""
        if self._ended is not None:
            return self._ended
        failures = 0
        while True:
            if self._backend._closed or self.pod_name is None:
                await asyncio.Event().wait()  # nothing to watch: leave it to the heartbeats
            try:
                outcome = await self._watch()
            except _api_error_types() as exc:
                failures += 1
                logger.debug("watching pod %s/%s: %r", self.namespace, self.pod_name, exc)
                if _status_code(exc) in (401, 403) and failures == 1:
                    logger.warning(
                        "cannot watch runner pod %s/%s (%s); runner death is left to "
                        "heartbeats until this works (%s)",
                        self.namespace,
                        self.pod_name,
                        _status_code(exc),
                        _RBAC_HINT,
                    )
                await asyncio.sleep(_RETRY_DELAY)
                continue
            if outcome is None:  # the watch ended without news: resume it
                continue
            self._ended = outcome
            return outcome

    async def _watch(self) -> str | None:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        assert self.pod_name is not None
        client = self._backend._client()
        gone = "was deleted (its Pod is gone)"
        try:
            pod = await client.get(Pod, self.pod_name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return gone
            raise
        outcome = await self._observe(pod.to_dict())
        if outcome is not None:
            return outcome
        events = client.watch(
            Pod,
            namespace=self.namespace,
            fields={"metadata.name": self.pod_name},
            resource_version=pod.metadata.resourceVersion if pod.metadata else None,
            server_timeout=_WATCH_SERVER_TIMEOUT,
        )
        try:
            async for kind, obj in events:
                if kind == "DELETED":
                    self._state = describe_pod(obj.to_dict()) + " (deleted)"
                    return gone
                outcome = await self._observe(obj.to_dict())
                if outcome is not None:
                    return outcome
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        return None

    async def _observe(self, pod: Manifest) -> str | None:
        self._state = describe_pod(pod)
        outcome = pod_outcome(
            pod, wait_for_capacity=self._backend._wait_for_capacity, container=self._container
        )
        if outcome is not None and _failed(pod, self._container):
            self._log_tail = await self._read_log_tail()
        return outcome

    async def _read_log_tail(self) -> str:
        """The last lines the runner container wrote (best effort: empty if not allowed)."""
        assert self.pod_name is not None
        errors: tuple[type[BaseException], ...] = (TimeoutError, *_api_error_types())
        try:
            async with asyncio.timeout(3):
                lines = [
                    line
                    async for line in self._backend._client().log(
                        self.pod_name,
                        namespace=self.namespace,
                        container=self._container,
                        tail_lines=_LOG_TAIL_LINES,
                    )
                ]
        except errors:
            return ""
        return "".join(lines)

    async def stop(self) -> None:
        """Delete the Pod and its Secret. A missing object counts as deleted. Idempotent.

        The deletion goes on even if the caller is cancelled (and the backend's ``aclose``
        waits for it). Failures are logged (naming what is left behind), not raised; the
        ownerReferences still let the cluster collect both when the parent Pod goes.
        """
        if self._stopped:
            return
        if self._stopping is None or self._stopping.done():
            self._stopping = asyncio.ensure_future(self._stop_now())
            self._backend._track(self._stopping)
        await asyncio.shield(self._stopping)

    async def _stop_now(self) -> None:
        async with self._backend._client_for_cleanup() as client:
            done = True
            if self.pod_name is not None:
                done &= await self._delete(client, "Pod", self.pod_name)
            if self.secret_name is not None:
                done &= await self._delete(client, "Secret", self.secret_name)
        self._stopped = done

    async def _delete(self, client: AsyncClient, kind: str, name: str) -> bool:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod, Secret

        async def delete() -> None:
            if kind == "Pod":
                await client.delete(
                    Pod,
                    name,
                    namespace=self.namespace,
                    grace_period=self._backend._stop_grace_period,
                )
            else:
                await client.delete(Secret, name, namespace=self.namespace)

        try:
            # a delete whose answer was lost is repeated: the second one finds it gone (404)
            await _retrying(delete, give_up=lambda: False)
        except _api_error_types() as exc:
            if isinstance(exc, ApiError) and exc.status.code == 404:
                return True
            logger.warning(
                "could not delete runner %s %s/%s: %s",
                kind,
                self.namespace,
                name,
                _translate(exc, f"delete {kind} {name}"),
            )
            return False
        return True


class KubernetesBackend(Backend):
    """Runs each runner in a Pod cloned from the parent's own Pod.

    The parent must run in a Pod whose ``POD_NAME`` and ``POD_NAMESPACE`` (and ideally
    ``POD_IP``) come from the downward API, under a service account allowed to manage Pods
    and create Secrets in its namespace; see ``docs/backends/kubernetes.md``.

    Args:
        kubeconfig: path of a kubeconfig file. ``None`` (the default) uses the in-cluster
            service account.
        context: the kubeconfig context to use (default: its current context).
        namespace: namespace of the parent Pod and of the runners (default:
            ``POD_NAMESPACE``, then the configuration's namespace).
        pod_name: the parent's own Pod (default: ``POD_NAME``).
        container: name of the parent's app container to clone (default: the first).
        keep_containers: names of other containers of the parent Pod (or of its init
            containers, for sidecars declared as init containers with ``restartPolicy:
            Always``) to copy unchanged into runner Pods, for sidecars the app cannot work
            without (a database proxy). By default runners have only the app container: a
            service mesh proxy or a log shipper would keep a finished runner Pod running.
        image: image of the runners (default: the app container's).
        command: the runner command (default: the launch's ``python -m flame runner``).
        resources: the runner container's ``resources`` (``{"requests": {...},
            "limits": {...}}``), replacing the app container's.
        env: extra plain environment variables for runners (visible in the Pod spec: put
            secrets in a Kubernetes Secret and reference it through ``pod_template``).
        labels: extra labels for runner Pods.
        pod_template: called with the runner Pod manifest (a dict) just before it is
            created; modify it in place or return a new one (node selectors, tolerations,
            GPUs, volumes, sidecars). The backend then re-applies what it relies on: the
            namespace, the owner reference to the parent, ``restartPolicy: Never``, its
            labels and the Secret references of the runner environment.
        app: the module (or script path) runners import as the application (default: the
            parent's main module).
        listen_host: address the parent listens on for runners (default ``"0.0.0.0"``, or
            ``"::"`` when the Pod IP is IPv6).
        advertise_host: address runners dial (default: ``POD_IP``, then the parent Pod's
            ``status.podIP``, then this host name's address).
        wait_for_capacity: keep waiting (within the pool's ``boot_timeout``) for a runner
            Pod that is Unschedulable, for clusters that add nodes on demand, instead of
            failing its boot at once.
        stop_grace_period: seconds a stopped runner Pod gets between SIGTERM and SIGKILL.
        request_timeout: seconds each API request may take (watches excepted). A request
            that times out or loses its answer is repeated (up to 3 tries in all; a create
            whose first answer was lost is recognised by its name), and whatever a failed
            boot created is deleted.
    """

    name = "kubernetes"

    def __init__(
        self,
        *,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        namespace: str | None = None,
        pod_name: str | None = None,
        container: str | None = None,
        keep_containers: Sequence[str] = (),
        image: str | None = None,
        command: Sequence[str] | None = None,
        resources: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        pod_template: PodTemplateHook | None = None,
        app: str | None = None,
        listen_host: str | None = None,
        advertise_host: str | None = None,
        wait_for_capacity: bool = False,
        stop_grace_period: int = 1,
        request_timeout: float = 10.0,
    ) -> None:
        _require_lightkube()
        for option, value in (
            ("context", context),
            ("namespace", namespace),
            ("pod_name", pod_name),
            ("container", container),
            ("image", image),
            ("app", app),
            ("listen_host", listen_host),
            ("advertise_host", advertise_host),
        ):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{option} must be a non-empty string, got {value!r}")
        if context is not None and kubeconfig is None:
            raise ValueError("context needs kubeconfig (in-cluster configuration has none)")
        if command is not None and (
            isinstance(command, str)
            or not command
            or not all(isinstance(a, str) and a for a in command)
        ):
            raise ValueError(f"command must be a non-empty sequence of strings, got {command!r}")
        if resources is not None:
            if not isinstance(resources, Mapping) or not set(resources) <= {
                "limits",
                "requests",
                "claims",
            }:
                raise ValueError(
                    "resources must be a mapping with keys among 'limits', 'requests', 'claims'"
                )
            for section in ("limits", "requests"):
                if not isinstance(resources.get(section, {}), Mapping):
                    raise ValueError(f"resources[{section!r}] must be a mapping")
        for key, val in (env or {}).items():
            if not isinstance(key, str) or not _ENV_NAME.match(key) or not isinstance(val, str):
                raise ValueError(f"env must map variable names to strings, got {key!r}: ...")
        for key, val in (labels or {}).items():
            if not _LABEL_KEY.match(key) or not isinstance(val, str) or not _LABEL_VALUE.match(val):
                raise ValueError(f"labels: {key!r}: {val!r} is not a valid Kubernetes label")
        if pod_template is not None and not callable(pod_template):
            raise ValueError("pod_template must be a callable taking and returning a manifest")
        if isinstance(stop_grace_period, bool) or not isinstance(stop_grace_period, int):
            raise ValueError("stop_grace_period must be an int (seconds)")
        if stop_grace_period < 0:
            raise ValueError("stop_grace_period must be >= 0")
        if isinstance(keep_containers, str) or not all(
            isinstance(c, str) and c for c in keep_containers
        ):
            raise ValueError(
                f"keep_containers must be a sequence of container names, got {keep_containers!r}"
            )
        if (
            isinstance(request_timeout, bool)
            or not isinstance(request_timeout, int | float)
            or not request_timeout > 0
        ):
            raise ValueError(
                f"request_timeout must be a number of seconds > 0, got {request_timeout!r}"
            )

        self._kubeconfig = os.fspath(kubeconfig) if kubeconfig is not None else None
        self._context = context
        self._namespace = namespace
        self._pod_name = pod_name
        self._container = container
        self._keep_containers = tuple(keep_containers)
        self._image = image
        self._command = tuple(command) if command is not None else None
        self._resources = _quantities(resources) if resources is not None else None
        self._env = dict(env or {})
        self._labels = dict(labels or {})
        self._pod_template = pod_template
        self._app = app
        self._listen_host = listen_host
        self._advertise_host = advertise_host
        self._wait_for_capacity = bool(wait_for_capacity)
        self._stop_grace_period = stop_grace_period
        self._request_timeout = float(request_timeout)

        self._client_obj: AsyncClient | None = None
        self._closed = False
        self._stopping: set[asyncio.Future[None]] = set()  # deletions under way
        self._parent: Manifest | None = None
        self._parent_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._swept = False

    def __repr__(self) -> str:
        source = f"kubeconfig={self._kubeconfig!r}" if self._kubeconfig else "in-cluster"
        pod = self._pod_name or os.environ.get("POD_NAME") or "?"
        return f"<KubernetesBackend {source} pod={pod!r} namespace={self._namespace!r}>"

    # -- addresses --------------------------------------------------------------------------
    def _pod_ips(self) -> list[str]:
        if self._advertise_host:
            return [self._advertise_host]
        from_env = os.environ.get("POD_IPS") or os.environ.get("POD_IP")
        if from_env:
            return [ip.strip() for ip in from_env.split(",") if ip.strip()]
        if self._parent is not None:
            status = self._parent.get("status") or {}
            ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
            if ips or status.get("podIP"):
                return ips or [status["podIP"]]
        # In a Pod, the kubelet maps the Pod's host name to its IP in /etc/hosts.
        host = socket.gethostname()
        try:
            return [socket.gethostbyname(host)]
        except OSError:
            logger.warning(
                "cannot tell this Pod's IP: set POD_IP from the downward API "
                "(status.podIP); runners will dial %r",
                host,
            )
            return [host]

    def listen_host(self) -> str:
        """``"0.0.0.0"``, or ``"::"`` (dual stack) when the Pod has an IPv6 address."""
        if self._listen_host is not None:
            return self._listen_host
        return "::" if any(":" in ip for ip in self._pod_ips()) else "0.0.0.0"

    def advertise_hosts(self) -> Sequence[str]:
        """The parent Pod's IP addresses (see ``advertise_host``)."""
        return self._pod_ips()

    def runner_app(self) -> Mapping[str, str] | None:
        """The ``app`` option as the runner expects it, or ``None`` for the main module."""
        if self._app is None:
            return None
        return {"path": self._app} if self._app.endswith(".py") else {"module": self._app}

    # -- the API client ---------------------------------------------------------------------
    def _config(self) -> Any:
        from lightkube import KubeConfig

        if self._kubeconfig is None:
            return KubeConfig.from_service_account().get()
        return KubeConfig.from_file(self._kubeconfig).get(context_name=self._context)

    def _new_client(self) -> AsyncClient:
        from lightkube import AsyncClient

        try:
            config = self._config()
        except _api_error_types() as exc:
            raise _translate(exc, "load its configuration") from exc
        except KeyError as exc:  # an incomplete kubeconfig
            raise BootError(f"Kubernetes configuration is missing {exc}") from exc
        return AsyncClient(
            config=config,
            namespace=self._namespace,
            field_manager="flame",
            timeout=_http_module().Timeout(self._request_timeout),
        )

    def _client(self) -> AsyncClient:
        if self._client_obj is None:
            self._client_obj = self._new_client()
        return self._client_obj

    @contextlib.asynccontextmanager
    async def _client_for_cleanup(self) -> AsyncIterator[AsyncClient]:
        """The backend's client, or a temporary one when the backend was closed already."""
        if not self._closed and self._client_obj is not None:
            yield self._client_obj
            return
        client = self._new_client()
        try:
            yield client
        finally:
            await client.close()

    async def _api(self, action: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except _api_error_types() as exc:
            raise _translate(exc, action) from exc

    def _target_namespace(self) -> str:
        ns = self._namespace or os.environ.get("POD_NAMESPACE") or self._client().namespace
        return str(ns)

    async def parent_pod(self) -> Manifest:
        """The parent's own Pod, as a dict (read once, on first use).

        Raises :class:`flame.BootError` when it cannot be found or read.
        """
        from lightkube.resources.core_v1 import Pod

        loop = asyncio.get_running_loop()
        if self._parent_lock is None or self._parent_lock[0] is not loop:
            self._parent_lock = (loop, asyncio.Lock())
        async with self._parent_lock[1]:
            if self._parent is None:
                name = self._pod_name or os.environ.get("POD_NAME")
                if not name:
                    raise BootError(
                        "KubernetesBackend cannot find its own Pod: set POD_NAME and "
                        "POD_NAMESPACE from the downward API (metadata.name, "
                        "metadata.namespace), or pass pod_name="
                    )
                ns = self._target_namespace()
                client = self._client()
                pod = await self._api(
                    f"read the parent's own Pod {ns}/{name} (from POD_NAME/POD_NAMESPACE)",
                    _retrying(lambda: client.get(Pod, name, namespace=ns), give_up=lambda: False),
                )
                self._parent = pod.to_dict()
            return copy.deepcopy(self._parent)

    # -- manifests --------------------------------------------------------------------------
    def _app_container(self, parent: Mapping[str, Any]) -> Manifest:
        containers = (parent.get("spec") or {}).get("containers") or []
        if not containers:
            raise BootError("the parent Pod has no containers to clone")
        if self._container is None:
            return dict(containers[0])
        for c in containers:
            if c.get("name") == self._container:
                return dict(c)
        names = ", ".join(repr(c.get("name")) for c in containers)
        raise BootError(f"container={self._container!r} is not in the parent Pod (it has {names})")

    def _runner_labels(self, parent: Mapping[str, Any], launch: RunnerLaunch) -> dict[str, str]:
        labels = dict(self._labels)
        labels.update(
            {
                LABEL_MANAGED_BY: "flame",
                LABEL_COMPONENT: "flame-runner",
                LABEL_POOL: _label_value(launch.pool),
                LABEL_RUNNER: _label_value(launch.runner_id),
                LABEL_PARENT: _label_value(parent["metadata"]["name"]),
                LABEL_PARENT_UID: _label_value(parent["metadata"]["uid"]),
                LABEL_INSTANCE: _process_instance(),
            }
        )
        return labels

    def _kept_containers(self, parent: Mapping[str, Any]) -> tuple[list[Manifest], list[Manifest]]:
        """The parent's containers and init containers named in ``keep_containers``."""
        spec = parent.get("spec") or {}
        kept: tuple[list[Manifest], list[Manifest]] = ([], [])
        for name in self._keep_containers:
            for group, out in (("containers", kept[0]), ("initContainers", kept[1])):
                found = [c for c in spec.get(group) or [] if c.get("name") == name]
                out.extend(copy.deepcopy(found))
                if found:
                    break
            else:
                names = [
                    c.get("name")
                    for g in ("containers", "initContainers")
                    for c in spec.get(g) or []
                ]
                raise BootError(
                    f"keep_containers: {name!r} is not a container of the parent Pod "
                    f"(it has {', '.join(map(repr, names))})"
                )
        return kept

    @staticmethod
    def _parent_meta(parent: Mapping[str, Any]) -> Mapping[str, Any]:
        meta = parent.get("metadata") or {}
        for field in ("name", "namespace", "uid"):
            if not meta.get(field):
                raise BootError(f"the parent Pod has no metadata.{field}")
        return meta

    def runner_secret_manifest(
        self, parent_pod: Mapping[str, Any], launch: RunnerLaunch, *, name: str | None = None
    ) -> Manifest:
        """The Secret ``name`` holding ``launch.env`` for one runner, owned by the parent Pod.

        Its keys are the variable names. It is immutable, labelled like the runner Pod, and
        re-owned by the runner Pod once that exists. ``name`` defaults to a fresh one (see
        :func:`runner_names`).
        """
        meta = self._parent_meta(parent_pod)
        for key in launch.env:
            if not _ENV_NAME.match(key):
                raise BootError(f"runner environment variable {key!r} cannot be a Secret key")
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name or runner_names(meta["name"])[1],
                "namespace": meta["namespace"],
                "labels": self._runner_labels(parent_pod, launch),
                "annotations": {ANNOTATION_POOL: launch.pool, ANNOTATION_PARENT: meta["name"]},
                "ownerReferences": [_owner_reference(parent_pod)],
            },
            "type": "Opaque",
            "immutable": True,
            "data": {
                k: base64.b64encode(v.encode()).decode("ascii") for k, v in launch.env.items()
            },
        }

    def runner_pod_manifest(
        self,
        parent_pod: Mapping[str, Any],
        launch: RunnerLaunch,
        *,
        secret_name: str,
        name: str | None = None,
    ) -> Manifest:
        """The runner Pod ``name`` for ``launch``, cloned from ``parent_pod``, as a dict.

        ``launch.env`` is referenced from the Secret ``secret_name`` (see
        :meth:`runner_secret_manifest`), never written into the Pod. ``pod_template`` has
        been applied. ``name`` defaults to a fresh one (see :func:`runner_names`). Raises
        :class:`flame.BootError` if the parent cannot be cloned.
        """
        parent = copy.deepcopy(dict(parent_pod))
        meta = self._parent_meta(parent)
        spec = parent.get("spec") or {}
        app = self._app_container(parent)

        # volumes that can be shared with another Pod, and the app's mounts of them
        volumes = [
            v
            for v in spec.get("volumes") or []
            if set(v) & _CLONED_VOLUME_TYPES
            and not str(v.get("name")).startswith("kube-api-access-")
        ]
        volume_names = {v.get("name") for v in volumes}
        mounts = [
            m
            for m in app.get("volumeMounts") or []
            if m.get("name") in volume_names and m.get("mountPath") != _SERVICE_ACCOUNT_MOUNT
        ]
        used = {m.get("name") for m in mounts}
        volumes = [v for v in volumes if v.get("name") in used]

        reserved = set(launch.env) | set(self._env)
        env = [e for e in app.get("env") or [] if e.get("name") not in reserved]
        env += [{"name": k, "value": v} for k, v in self._env.items()]
        container: Manifest = {
            "name": app.get("name") or "runner",
            "image": self._image or app.get("image"),
            "command": list(self._command or launch.argv),
            "env": env,
        }
        for field in _CLONED_CONTAINER_FIELDS:
            if app.get(field) is not None:
                container[field] = app[field]
        resources = self._resources if self._resources is not None else app.get("resources")
        if resources:
            container["resources"] = copy.deepcopy(resources)
        if mounts:
            container["volumeMounts"] = mounts

        sidecars, init_sidecars = self._kept_containers(parent)
        pod_spec: Manifest = {"restartPolicy": "Never", "containers": [container, *sidecars]}
        if init_sidecars:
            pod_spec["initContainers"] = init_sidecars
        for field in _CLONED_POD_FIELDS:
            if spec.get(field) is not None:
                pod_spec[field] = spec[field]
        kept_mounts = {
            m.get("name") for c in sidecars + init_sidecars for m in c.get("volumeMounts") or []
        }
        volumes += [
            v
            for v in spec.get("volumes") or []
            if v.get("name") in kept_mounts - used and set(v) & _CLONED_VOLUME_TYPES
        ]
        if volumes:
            pod_spec["volumes"] = volumes

        pod_name = name or runner_names(meta["name"])[0]
        manifest: Manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": meta["namespace"],
                "labels": self._runner_labels(parent, launch),
                "annotations": {ANNOTATION_POOL: launch.pool, ANNOTATION_PARENT: meta["name"]},
                "ownerReferences": [_owner_reference(parent)],
            },
            "spec": pod_spec,
        }
        self._add_secret_env(manifest, launch, secret_name, str(container["name"]))
        if self._pod_template is not None:
            result = self._pod_template(manifest)
            if result is not None:
                manifest = result
            if not isinstance(manifest, dict):
                raise BootError(
                    f"pod_template returned {type(manifest).__name__}, not a manifest dict"
                )
            self._enforce(manifest, parent, launch, pod_name, secret_name, str(container["name"]))
        return manifest

    @staticmethod
    def _add_secret_env(
        manifest: Manifest, launch: RunnerLaunch, secret_name: str, container_name: str
    ) -> None:
        containers = manifest["spec"]["containers"]
        target = next((c for c in containers if c.get("name") == container_name), containers[0])
        keep = [e for e in target.get("env") or [] if e.get("name") not in launch.env]
        target["env"] = keep + [
            {"name": k, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": k}}}
            for k in sorted(launch.env)
        ]

    def _enforce(
        self,
        manifest: Manifest,
        parent: Mapping[str, Any],
        launch: RunnerLaunch,
        pod_name: str,
        secret_name: str,
        container_name: str,
    ) -> None:
        """Re-apply, after ``pod_template``, what the backend's guarantees rest on."""
        meta = parent["metadata"]
        manifest["apiVersion"], manifest["kind"] = "v1", "Pod"
        md = manifest.setdefault("metadata", {})
        md["namespace"] = meta["namespace"]
        md["name"] = pod_name  # the name a lost answer or a failed boot is cleaned up by
        md.pop("generateName", None)
        md["annotations"] = {**(md.get("annotations") or {}), ANNOTATION_PARENT: meta["name"]}
        refs = [r for r in md.get("ownerReferences") or [] if r.get("uid") != meta["uid"]]
        for r in refs:
            r.pop("controller", None)  # only one controller: the parent Pod
        md["ownerReferences"] = [_owner_reference(parent), *refs]
        md["labels"] = {**(md.get("labels") or {}), **self._runner_labels(parent, launch)}
        spec = manifest.setdefault("spec", {})
        spec["restartPolicy"] = "Never"
        if not spec.get("containers"):
            raise BootError("pod_template left the runner Pod without containers")
        self._add_secret_env(manifest, launch, secret_name, container_name)

    # -- booting ----------------------------------------------------------------------------
    async def boot(self, launch: RunnerLaunch) -> PodHandle:
        """Create the runner's Secret and Pod and return at once (not waiting for it to run).

        On any failure, or if cancelled, whatever was created is deleted before raising. The
        first boot of a backend also starts :meth:`sweep` in the background.
        """
        self._closed = False
        handle = PodHandle(self, self._namespace or "", launch.runner_id)
        task = asyncio.ensure_future(self._create(launch, handle))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The request under way is not interrupted half-way (the server may act on it
            # anyway): no more retries, let it end, then delete what may exist, by name.
            handle._abandoned = True
            try:
                with contextlib.suppress(Exception):
                    await task
            finally:
                await handle.stop()
            raise
        if not self._swept:
            self._swept = True
            self._track(asyncio.ensure_future(self._sweep_quietly()))
        return handle

    async def _create(self, launch: RunnerLaunch, handle: PodHandle) -> None:
        from lightkube.resources.core_v1 import Pod, Secret
        from lightkube.types import PatchType

        parent = await self.parent_pod()
        client = self._client()
        ns = parent["metadata"]["namespace"]
        handle.namespace = ns
        pod_name, secret_name = runner_names(parent["metadata"]["name"])
        secret = self.runner_secret_manifest(parent, launch, name=secret_name)
        manifest = self.runner_pod_manifest(parent, launch, secret_name=secret_name, name=pod_name)
        try:
            pod_obj = Pod.from_dict(manifest)
        except (ValueError, TypeError) as exc:
            raise BootError(f"the runner Pod manifest is not a valid Pod: {exc}") from exc
        handle._container = str(self._app_container(parent).get("name") or "runner")
        # From here on stop() knows what to delete, whatever answers get lost.
        handle.secret_name, handle.pod_name = secret_name, pod_name
        try:
            await self._create_once(
                client, Secret.from_dict(secret), handle, f"create Secret {ns}/{secret_name}"
            )
            created: Any = await self._create_once(
                client, pod_obj, handle, f"create the runner Pod {ns}/{pod_name}"
            )
            if created is None:  # made by an attempt whose answer was lost
                created = await self._api(
                    f"read the runner Pod {ns}/{pod_name}",
                    _retrying(
                        lambda: client.get(Pod, pod_name, namespace=ns),
                        give_up=lambda: handle._abandoned,
                    ),
                )
            pod: Manifest = created.to_dict()
            handle._state = describe_pod(pod)
            try:
                await self._api(
                    f"hand Secret {secret_name} to Pod {pod_name}",
                    _retrying(
                        lambda: client.patch(
                            Secret,
                            secret_name,
                            {"metadata": {"ownerReferences": [_owner_reference(pod)]}},
                            namespace=ns,
                            patch_type=PatchType.MERGE,
                        ),
                        give_up=lambda: handle._abandoned,
                    ),
                )
            except BootError as exc:
                # Not fatal: stop() deletes the Secret, and the parent Pod still owns it.
                logger.warning("%s; it stays owned by the parent Pod until deleted", exc)
        except BaseException:
            await handle.stop()
            raise
        logger.debug("runner %s: created pod %s/%s", launch.runner_id, ns, pod_name)

    async def _create_once(
        self, client: AsyncClient, obj: Any, handle: PodHandle, action: str
    ) -> Any | None:
        """Create ``obj`` (which has its name), exactly once although answers get lost.

        A create that failed in a way that may have taken effect anyway (a lost answer, a
        timeout) is repeated with the same name: then 409 AlreadyExists means the earlier
        attempt made it, and ``None`` is returned instead of the created object.
        """
        maybe_created = False

        async def create() -> Any | None:
            nonlocal maybe_created
            try:
                return await client.create(obj)
            except _api_error_types() as exc:
                if maybe_created and _status_code(exc) == 409:
                    return None
                maybe_created = maybe_created or _maybe_applied(exc)
                raise

        return await self._api(action, _retrying(create, give_up=lambda: handle._abandoned))

    # -- sweeping ---------------------------------------------------------------------------
    async def sweep(self) -> list[str]:
        """Delete the runner Pods (and their Secrets) in the namespace that nobody will stop.

        These are the runner Pods whose parent Pod no longer exists (found by the owner
        reference, or, when that was removed, by the ``flame-py/parent-uid`` label and the
        ``flame-py/parent`` annotation), which the cluster's garbage collector missed (a
        parent deleted with ``--cascade=orphan``, a collector that is behind), and the
        finished runner Pods of this same parent Pod booted by an earlier process (a parent
        container that restarted). Returns the names of the Pods deleted. Pods it cannot
        judge (no owner, a parent it cannot read) are left alone.

        The first boot of each backend runs it in the background; it needs only the
        permissions of the documented Role.
        """
        from lightkube.resources.core_v1 import Pod

        parent = await self.parent_pod()
        meta = parent["metadata"]
        ns = meta["namespace"]
        client = self._client()
        runners: list[Any] = await self._api(
            f"list runner Pods in namespace {ns}",
            _retrying(
                lambda: _collect(
                    client.list(
                        Pod,
                        namespace=ns,
                        labels={LABEL_MANAGED_BY: "flame", LABEL_COMPONENT: "flame-runner"},
                    )
                ),
                give_up=lambda: False,
            ),
        )
        alive: dict[str, bool] = {meta["uid"]: True}
        doomed: list[Manifest] = []
        for obj in runners:
            pod = obj.to_dict()
            owner = _parent_of(pod)
            if owner is None:
                continue
            uid, name = owner
            if uid == meta["uid"]:
                labels = pod["metadata"].get("labels") or {}
                phase = (pod.get("status") or {}).get("phase")
                if phase in _FINISHED and labels.get(LABEL_INSTANCE) != _process_instance():
                    doomed.append(pod)
                continue
            if uid not in alive:
                alive[uid] = await self._pod_exists(client, ns, name, uid)
            if not alive[uid]:
                doomed.append(pod)
        for pod in doomed:
            labels = pod["metadata"].get("labels") or {}
            handle = PodHandle(self, ns, labels.get(LABEL_RUNNER, "?"))
            handle.pod_name = pod["metadata"]["name"]
            handle.secret_name = _secret_of(pod)
            logger.info(
                "deleting runner pod %s/%s left behind by %s", ns, handle.pod_name, _parent_of(pod)
            )
            await handle.stop()
        return [pod["metadata"]["name"] for pod in doomed]

    async def _sweep_quietly(self) -> None:
        errors: tuple[type[BaseException], ...] = (BootError, *_api_error_types())
        try:
            await self.sweep()
        except errors as exc:
            logger.warning("could not sweep runner pods left behind: %s", exc)

    async def _pod_exists(self, client: AsyncClient, ns: str, name: str, uid: str) -> bool:
        """Whether Pod ``name`` with ``uid`` exists (True also when it cannot be told)."""
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Pod

        try:
            pod = await _retrying(
                lambda: client.get(Pod, name, namespace=ns), give_up=lambda: False
            )
        except ApiError as exc:
            return exc.status.code != 404
        except _api_error_types():
            return True
        return pod.metadata is not None and pod.metadata.uid == uid

    def _track(self, stopping: asyncio.Future[None]) -> None:
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)

    async def aclose(self) -> None:
        """Close the API client, once the deletions under way are done.

        Handles stopped later use a short-lived client of their own.
        """
        self._closed = True
        loop = asyncio.get_running_loop()
        pending = [f for f in self._stopping if not f.done() and f.get_loop() is loop]
        if pending:
            await asyncio.wait(pending, timeout=_ACLOSE_WAIT)
        client, self._client_obj = self._client_obj, None
        if client is not None:
            await client.close()
