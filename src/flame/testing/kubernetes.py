"""``KubernetesAPIEmulator``: a small Kubernetes API server that runs Pods as local processes.

What this module owns: an emulator of the part of the Kubernetes API that
:class:`flame.KubernetesBackend` uses, so the backend and whole pools on it can be tested
without a cluster. It is a real HTTP server on 127.0.0.1 (stdlib only, in a background
thread) that any Kubernetes client can talk to through the kubeconfig file it writes:

* ``pods`` and ``secrets`` in namespaces: get, create, delete, list, watch and merge patch,
  with ``generateName``, ``resourceVersion``, label and field selectors, and the API's own
  ``Status`` error objects (401, 403, 404, 409, 422...). ``pods/log`` serves a Pod's output.
* bearer-token authentication, and optionally a set of allowed verbs per resource (what a
  Role would grant), so that a test proves the documented RBAC rules are enough.
* a stand-in kubelet (``flame.testing._kubelet``): each Pod created through the API really
  runs the command of its first container as a local subprocess, with the Pod's environment
  (plain values, ``fieldRef`` and ``secretKeyRef`` resolved from stored Secrets) plus what
  stands for the image (``env=``, ``cwd=``; a leading ``python`` runs ``python=``, by
  default this interpreter). The Pod's ``status`` follows: ``Pending``, then ``Running``
  with ``podIP`` 127.0.0.1, then ``Succeeded`` or ``Failed`` with the container's exit code.
  Deleting a Pod sends SIGTERM, then SIGKILL after its grace period.
* garbage collection by ``ownerReferences``: when an owner is gone, its dependents (Pods and
  Secrets) are deleted, as the cluster's garbage collector would.
* failure injection: Pods that cannot be scheduled (``PodScheduled=False``,
  ``Unschedulable``), images that cannot be pulled (``ErrImagePull``), and ``403 Forbidden``
  for chosen verbs.

A "parent Pod" standing for the test process itself is added with
:meth:`KubernetesAPIEmulator.add_parent_pod`: it is reported ``Running`` but runs nothing.

What it is not: a scheduler, a container runtime or a full API server. Images are never
pulled (the local interpreter and ``PYTHONPATH`` stand for them), only the first container of
a Pod runs, strategic merge patches are treated as JSON merge patches, and nothing persists.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ._http import EmulatorServer, Handler
from ._kubelet import NODE_NAME, StandInKubelet, container_status
from ._kubelet import now as _now

__all__ = ["KubernetesAPIEmulator"]

JSON = dict[str, Any]

_KINDS = {"pods": "Pod", "secrets": "Secret"}
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet Kubernetes uses for generateName
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def _status(code: int, reason: str, message: str, **details: Any) -> JSON:
    doc: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        doc["details"] = details
    return doc


class _ApiFailure(Exception):
    """Raised inside the emulator to answer a request with a ``Status`` error."""

    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = _status(code, reason, message, **details)
        self.code = code


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


@dataclass(frozen=True)
class _Requirement:
    """One term of a label or field selector."""

    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    key: str
    values: frozenset[str] = frozenset()

    def __call__(self, d: Mapping[str, str]) -> bool:
        value = d.get(self.key)
        if self.op == "=":
            return value in self.values
        if self.op in ("!=", "notin"):
            return value not in self.values
        if self.op == "in":
            return value in self.values
        if self.op == "exists":
            return self.key in d
        return self.key not in d


def _parse_selector(text: str, *, fields: bool) -> list[_Requirement]:
    """Parse a label or field selector into requirements over a flat ``{key: value}`` mapping."""
    tests: list[_Requirement] = []
    # split on commas that are not inside parentheses
    parts = [p.strip() for p in re.split(r",(?![^()]*\))", text) if p.strip()]
    for part in parts:
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part)
        if m and not fields:
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            tests.append(_Requirement(m.group(2), m.group(1), values))
            continue
        m = re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(\S*)", part)
        if m:
            op = "!=" if m.group(2) == "!=" else "="
            tests.append(_Requirement(op, m.group(1), frozenset([m.group(3)])))
            continue
        if fields:
            raise _ApiFailure(400, "BadRequest", f"invalid field selector: {part!r}")
        if part.startswith("!"):
            tests.append(_Requirement("!exists", part[1:]))
        elif re.fullmatch(r"[^\s()=!,]+", part):
            tests.append(_Requirement("exists", part))
        else:
            raise _ApiFailure(400, "BadRequest", f"invalid label selector: {part!r}")
    return tests


def _field_view(obj: JSON) -> dict[str, str]:
    meta = obj.get("metadata", {})
    view = {
        "metadata.name": str(meta.get("name", "")),
        "metadata.namespace": str(meta.get("namespace", "")),
    }
    if "status" in obj and isinstance(obj["status"], dict):
        view["status.phase"] = str(obj["status"].get("phase", ""))
    if isinstance(obj.get("spec"), dict):
        view["spec.nodeName"] = str(obj["spec"].get("nodeName", ""))
    if "type" in obj:
        view["type"] = str(obj["type"])
    return view


@dataclass
class _Rule:
    """One injected failure; ``remaining`` is how many more times it fires (None: always)."""

    action: str  # "schedule" | "image" | "forbid"
    remaining: int | None
    message: str = ""
    reason: str = ""
    image: str | None = None
    verb: str = ""
    resource: str = ""

    def take(self) -> bool:
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


class KubernetesAPIEmulator:
    """An emulated Kubernetes API server that runs each Pod as a local process.

    Use it as a context manager (or call :meth:`start` and :meth:`close`)::

        with KubernetesAPIEmulator(env={"PYTHONPATH": "src"}) as k8s:
            k8s.add_parent_pod("web-0")
            backend = flame.KubernetesBackend(kubeconfig=k8s.kubeconfig, pod_name="web-0")

    Args:
        namespace: the namespace of the kubeconfig's context, and the default of the helpers.
        token: the bearer token clients must send (random by default).
        python: the interpreter that runs a container command starting with ``python``
            (``python``, ``python3``, ``python3.11``, or a path ending in one of those);
            ``sys.executable`` by default.
        cwd: the working directory of containers that set no ``workingDir``.
        env: environment variables "baked into the image", under the Pod's own (for
            instance ``PYTHONPATH``). ``PATH`` is taken from this process unless given.
        allow: the verbs allowed per resource, as a Role would grant them
            (``{"pods": {"get", "create"}, "secrets": {"create"}}``); anything else gets 403.
            ``None`` (the default) allows everything.
        pod_ip: the address reported as every Pod's ``status.podIP``.
    """

    def __init__(
        self,
        *,
        namespace: str = "default",
        token: str | None = None,
        python: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        allow: Mapping[str, Iterable[str]] | None = None,
        pod_ip: str = "127.0.0.1",
    ) -> None:
        self.namespace = namespace
        self.token = token if token is not None else uuid.uuid4().hex
        self.python = python or sys.executable
        self.cwd = cwd
        self.image_env = dict(env or {})
        self.allow = {r: frozenset(v) for r, v in allow.items()} if allow is not None else None
        self.pod_ip = pod_ip
        #: every request that passed authentication, as ``(verb, resource)``; e.g.
        #: ``("create", "pods")``, ``("watch", "pods")``, ``("get", "pods/log")``.
        self.calls: list[tuple[str, str]] = []

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._rv = 0
        self._objects: dict[tuple[str, str, str], JSON] = {}
        self._events: list[tuple[int, str, str, JSON]] = []  # (rv, resource, type, object)
        self._external: set[str] = set()  # uids of Pods that stand for this process
        self._propagation: dict[str, str] = {}  # pod uid -> propagation of its pending delete
        self._rules: list[_Rule] = []
        self._kubelet: StandInKubelet | None = None
        self._closing = False
        self._server: EmulatorServer | None = None
        self._tmpdir: str | None = None
        self._random = random.Random()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> KubernetesAPIEmulator:
        """Start serving on a free port of 127.0.0.1 and write the kubeconfig. Returns self."""
        if self._server is not None:
            return self
        self._tmpdir = tempfile.mkdtemp(prefix="flame-k8s-emulator-")
        self._kubelet = StandInKubelet(_KubeletView(self), self._tmpdir)
        self._server = EmulatorServer(self._handle, "k8s-emulator-http").start()
        self._write_kubeconfig()
        return self

    def close(self) -> None:
        """Stop serving, kill every process the emulator started, and remove its files."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._changed.notify_all()
        if self._kubelet is not None:
            self._kubelet.close()
        if self._server is not None:
            self._server.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> KubernetesAPIEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._lock:
            pods = sum(1 for k in self._objects if k[0] == "pods")
        running = len(self.processes())
        return f"<KubernetesAPIEmulator url={self.url!r} pods={pods} processes={running}>"

    @property
    def url(self) -> str:
        """The server's base URL (``http://127.0.0.1:PORT``)."""
        if self._server is None:
            return "http://127.0.0.1:0"
        return f"http://127.0.0.1:{self._server.port}"

    @property
    def kubeconfig(self) -> str:
        """The path of a kubeconfig file (JSON, which is YAML) pointing at the emulator."""
        if self._tmpdir is None:
            raise RuntimeError("the emulator is not started")
        return os.path.join(self._tmpdir, "kubeconfig")

    def _write_kubeconfig(self) -> None:
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {
                        "cluster": "emulator",
                        "user": "emulator",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "emulator",
        }
        fd = os.open(self.kubeconfig, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)

    # -- helpers for tests -----------------------------------------------------------------
    def add_parent_pod(
        self,
        name: str = "flame-parent",
        *,
        namespace: str | None = None,
        image: str = "registry.example/app:1.0",
        container: str = "app",
        env: Mapping[str, str] | Sequence[Mapping[str, Any]] | None = None,
        labels: Mapping[str, str] | None = None,
        container_fields: Mapping[str, Any] | None = None,
        spec: Mapping[str, Any] | None = None,
    ) -> JSON:
        """Add a ``Running`` Pod that stands for the test process itself; returns a copy.

        The emulator runs nothing for it. ``env`` (a mapping, or a list of Kubernetes env
        entries) and ``container_fields`` (merged into the container, e.g. ``resources``)
        describe its app container; ``spec`` is merged into the Pod spec (extra containers,
        ``imagePullSecrets``...).
        """
        ns = namespace or self.namespace
        if isinstance(env, Mapping):
            env_list: list[Any] = [{"name": k, "value": v} for k, v in env.items()]
        else:
            env_list = [dict(e) for e in env or []]
        app: JSON = {"name": container, "image": image, "env": env_list}
        app.update(copy.deepcopy(dict(container_fields or {})))
        pod_spec: JSON = {
            "containers": [app],
            "restartPolicy": "Always",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
        }
        for key, value in (spec or {}).items():
            if key == "containers":
                pod_spec["containers"] = [app, *copy.deepcopy(list(value))]
            else:
                pod_spec[key] = copy.deepcopy(value)
        pod: JSON = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": dict(labels or {"app": "flame-parent"})},
            "spec": pod_spec,
        }
        with self._lock:
            created = self._create("pods", ns, pod, run=False)
            status = created["status"]
            status.update(
                phase="Running",
                podIP=self.pod_ip,
                podIPs=[{"ip": self.pod_ip}],
                hostIP="127.0.0.1",
                startTime=_now(),
                conditions=[
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
                containerStatuses=[
                    container_status(c, {"running": {"startedAt": _now()}}, ready=True)
                    for c in pod_spec["containers"]
                ],
            )
            created["spec"]["nodeName"] = NODE_NAME
            self._touch("pods", created, "MODIFIED")
            return copy.deepcopy(created)

    def downward_env(self, pod_name: str, namespace: str | None = None) -> dict[str, str]:
        """What the downward API would give the Pod's process: POD_NAME, POD_NAMESPACE, POD_IP."""
        return {
            "POD_NAME": pod_name,
            "POD_NAMESPACE": namespace or self.namespace,
            "POD_IP": self.pod_ip,
        }

    def get_pod(self, name: str, namespace: str | None = None) -> JSON | None:
        """A copy of the Pod, or ``None``."""
        with self._lock:
            obj = self._objects.get(("pods", namespace or self.namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def get_secret(self, name: str, namespace: str | None = None) -> JSON | None:
        """A copy of the Secret, or ``None``."""
        with self._lock:
            obj = self._objects.get(("secrets", namespace or self.namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def pods(
        self, namespace: str | None = None, *, labels: Mapping[str, str] | None = None
    ) -> list[JSON]:
        """Copies of the Pods in ``namespace`` (default: the emulator's) with those labels."""
        return self._select("pods", namespace, labels)

    def secrets(
        self, namespace: str | None = None, *, labels: Mapping[str, str] | None = None
    ) -> list[JSON]:
        """Copies of the Secrets in ``namespace`` with those labels."""
        return self._select("secrets", namespace, labels)

    def _select(
        self, resource: str, ns: str | None, labels: Mapping[str, str] | None
    ) -> list[JSON]:
        ns = ns or self.namespace
        with self._lock:
            out = []
            for (res, obj_ns, _), obj in sorted(self._objects.items()):
                if res != resource or obj_ns != ns:
                    continue
                obj_labels = obj["metadata"].get("labels") or {}
                if labels and any(obj_labels.get(k) != v for k, v in labels.items()):
                    continue
                out.append(copy.deepcopy(obj))
            return out

    def delete_pod(
        self, name: str, namespace: str | None = None, *, grace_period: int | None = None
    ) -> None:
        """Delete a Pod as ``kubectl delete pod`` would; its dependents are collected."""
        with self._lock:
            key = ("pods", namespace or self.namespace, name)
            if key not in self._objects:
                raise KeyError(f"no pod {key[1]}/{name}")
            self._delete("pods", key[1], name, grace_period, "Background")

    def processes(self) -> dict[str, int]:
        """``{pod name: pid}`` of the container processes still running."""
        return self._kubelet.processes() if self._kubelet is not None else {}

    def pod_log(self, name: str, namespace: str | None = None) -> str:
        """What the Pod's container has written to stdout and stderr so far."""
        with self._lock:
            obj = self._objects.get(("pods", namespace or self.namespace, name))
            path = self._log_path(obj["metadata"]["uid"]) if obj else None
        if path is None:
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_until(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` is true, re-checking on every change of the emulator.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"emulator: condition not met within {timeout} s")
                self._changed.wait(min(remaining, 0.5))

    # -- failure injection -----------------------------------------------------------------
    def fail_scheduling(
        self,
        message: str = "0/1 nodes are available: 1 Insufficient cpu.",
        *,
        times: int | None = None,
    ) -> None:
        """Leave the next ``times`` Pods (all, if ``None``) Pending and ``Unschedulable``."""
        with self._lock:
            self._rules.append(_Rule("schedule", times, message=message, reason="Unschedulable"))

    def fail_image_pull(
        self,
        *,
        image: str | None = None,
        reason: str = "ErrImagePull",
        message: str | None = None,
        times: int | None = None,
    ) -> None:
        """Fail to pull ``image`` (any image if ``None``): the container waits with ``reason``."""
        with self._lock:
            self._rules.append(
                _Rule("image", times, message=message or "", reason=reason, image=image)
            )

    def forbid(self, verb: str, resource: str, *, times: int | None = None) -> None:
        """Answer ``verb`` on ``resource`` (e.g. ``"create"``, ``"pods"``) with 403 Forbidden."""
        with self._lock:
            self._rules.append(_Rule("forbid", times, verb=verb, resource=resource))

    def clear_failures(self) -> None:
        """Remove every injected failure (Pods already failing stay as they are)."""
        with self._lock:
            self._rules.clear()

    def _take_rule(self, action: str, match: Callable[[_Rule], bool]) -> _Rule | None:
        for rule in self._rules:
            if rule.action == action and match(rule) and rule.take():
                return rule
        return None

    # -- the store -------------------------------------------------------------------------
    def _touch(self, resource: str, obj: JSON, event: str) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._events.append((self._rv, resource, event, copy.deepcopy(obj)))
        self._changed.notify_all()

    def _log_path(self, uid: str) -> str | None:
        return self._kubelet.log_path(uid) if self._kubelet is not None else None

    def _live(self, ns: str, name: str, uid: str) -> JSON | None:
        obj = self._objects.get(("pods", ns, name))
        if obj is None or obj["metadata"]["uid"] != uid or self._closing:
            return None
        return obj

    def _uid_exists(self, ns: str, uid: str) -> bool:
        return any(
            o["metadata"].get("uid") == uid
            for (_, o_ns, _), o in self._objects.items()
            if o_ns == ns
        )

    def _create(self, resource: str, ns: str, body: JSON, *, run: bool = True) -> JSON:
        if not isinstance(body, dict):
            raise _ApiFailure(400, "BadRequest", "the body must be a JSON object")
        kind = _KINDS[resource]
        if body.get("kind") not in (None, kind):
            raise _ApiFailure(400, "BadRequest", f"expected kind {kind}, got {body.get('kind')!r}")
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = "v1", kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _ApiFailure(400, "BadRequest", "metadata must be an object")
        if meta.get("namespace") not in (None, ns):
            raise _ApiFailure(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        name = str(meta.get("name") or "")
        if not name:
            prefix = meta.get("generateName")
            if not prefix:
                raise self._invalid(kind, "", "metadata.name: Required value: name or generateName")
            for _ in range(100):
                name = prefix + "".join(self._random.choice(_NAME_CHARS) for _ in range(5))
                if (resource, ns, name) not in self._objects:
                    break
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise self._invalid(
                kind,
                name,
                f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain",
            )
        if (resource, ns, name) in self._objects:
            raise _ApiFailure(
                409,
                "AlreadyExists",
                f'{resource} "{name}" already exists',
                name=name,
                kind=resource,
            )
        self._validate_meta(kind, name, meta)
        meta.update(
            name=name,
            namespace=ns,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
        )
        if resource == "pods":
            self._validate_pod(name, obj)
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        else:
            self._normalise_secret(name, obj)
        self._objects[(resource, ns, name)] = obj
        self._touch(resource, obj, "ADDED")
        if resource == "pods":
            if run:
                assert self._kubelet is not None
                self._kubelet.start(ns, name, meta["uid"])
            else:
                self._external.add(meta["uid"])
        self._collect_garbage()
        return obj

    @staticmethod
    def _invalid(kind: str, name: str, cause: str) -> _ApiFailure:
        return _ApiFailure(
            422, "Invalid", f'{kind} "{name}" is invalid: {cause}', name=name, kind=kind
        )

    def _validate_meta(self, kind: str, name: str, meta: JSON) -> None:
        for field in ("labels", "annotations"):
            value = meta.get(field)
            if value is not None and not (
                isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
            ):
                raise self._invalid(kind, name, f"metadata.{field}: must map strings to strings")
        for key, value in (meta.get("labels") or {}).items():
            bare = key.rsplit("/", 1)[-1]
            if len(bare) > 63 or not _LABEL_NAME.match(bare):
                raise self._invalid(kind, name, f"metadata.labels: Invalid value: {key!r}")
            if len(value) > 63 or not _LABEL_VALUE.match(value):
                raise self._invalid(kind, name, f"metadata.labels: Invalid value: {value!r}")
        refs = meta.get("ownerReferences") or []
        if not isinstance(refs, list):
            raise self._invalid(kind, name, "metadata.ownerReferences: must be a list")
        for ref in refs:
            for field in ("apiVersion", "kind", "name", "uid"):
                if not isinstance(ref, dict) or not ref.get(field):
                    raise self._invalid(
                        kind, name, f"metadata.ownerReferences.{field}: Required value"
                    )

    def _validate_pod(self, name: str, pod: JSON) -> None:
        spec = pod.get("spec")
        if not isinstance(spec, dict):
            raise self._invalid("Pod", name, "spec: Required value")
        containers = spec.get("containers")
        if not isinstance(containers, list) or not containers:
            raise self._invalid("Pod", name, "spec.containers: Required value")
        spec.setdefault("restartPolicy", "Always")
        if spec["restartPolicy"] not in ("Always", "OnFailure", "Never"):
            raise self._invalid("Pod", name, "spec.restartPolicy: Unsupported value")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("serviceAccountName", "default")
        volumes = {v.get("name") for v in spec.get("volumes") or []}
        seen: set[str] = set()
        for i, c in enumerate(containers):
            where = f"spec.containers[{i}]"
            if not isinstance(c, dict):
                raise self._invalid("Pod", name, f"{where}: must be an object")
            if not c.get("name") or not _DNS_LABEL.match(str(c["name"])):
                raise self._invalid("Pod", name, f"{where}.name: Invalid value")
            if c["name"] in seen:
                raise self._invalid("Pod", name, f"{where}.name: Duplicate value")
            seen.add(c["name"])
            if not c.get("image"):
                raise self._invalid("Pod", name, f"{where}.image: Required value")
            for key in ("command", "args"):
                if key in c and not (
                    isinstance(c[key], list) and all(isinstance(a, str) for a in c[key])
                ):
                    raise self._invalid("Pod", name, f"{where}.{key}: must be a list of strings")
            for e in c.get("env") or []:
                if not isinstance(e, dict) or not e.get("name"):
                    raise self._invalid("Pod", name, f"{where}.env.name: Required value")
                if "value" in e and not isinstance(e["value"], str):
                    raise self._invalid("Pod", name, f"{where}.env.value: must be a string")
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref is not None and not (ref.get("name") and ref.get("key")):
                    raise self._invalid(
                        "Pod", name, f"{where}.env.valueFrom.secretKeyRef: name and key required"
                    )
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    raise self._invalid(
                        "Pod", name, f"{where}.volumeMounts.name: Not found: {m.get('name')!r}"
                    )
            for section in ("limits", "requests"):
                for rname, q in ((c.get("resources") or {}).get(section) or {}).items():
                    if not isinstance(q, str | int | float) or isinstance(q, bool):
                        raise self._invalid(
                            "Pod", name, f"{where}.resources.{section}[{rname}]: Invalid value"
                        )

    def _normalise_secret(self, name: str, secret: JSON) -> None:
        data = secret.get("data") or {}
        if not isinstance(data, dict):
            raise self._invalid("Secret", name, "data: must be an object")
        for key, value in data.items():
            if not _SECRET_KEY.match(key):
                raise self._invalid("Secret", name, f"data[{key!r}]: Invalid key")
            try:
                base64.b64decode(value, validate=True)
            except (ValueError, TypeError):
                raise self._invalid("Secret", name, f"data[{key!r}]: not base64") from None
        for key, value in (secret.pop("stringData", None) or {}).items():
            if not _SECRET_KEY.match(key):
                raise self._invalid("Secret", name, f"stringData[{key!r}]: Invalid key")
            data[key] = base64.b64encode(str(value).encode()).decode()
        secret["data"] = data
        secret.setdefault("type", "Opaque")

    def _patch(self, resource: str, ns: str, name: str, body: JSON, content_type: str) -> JSON:
        if content_type not in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            raise _ApiFailure(
                415, "UnsupportedMediaType", f"the emulator cannot apply {content_type!r} patches"
            )
        obj = self._get(resource, ns, name)
        patched = _merge_patch(obj, body)
        patched["metadata"].update(
            {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "creationTimestamp")}
        )
        patched["apiVersion"], patched["kind"] = obj["apiVersion"], obj["kind"]
        self._validate_meta(obj["kind"], name, patched["metadata"])
        if resource == "secrets":
            self._normalise_secret(name, patched)
            if obj.get("immutable") and (
                patched.get("data") != obj.get("data") or not patched.get("immutable")
            ):
                raise self._invalid(
                    "Secret", name, "data: Forbidden: field is immutable when `immutable` is set"
                )
        elif patched.get("spec") != obj.get("spec"):
            raise self._invalid("Pod", name, "spec: Forbidden: pod updates may not change spec")
        obj.clear()
        obj.update(patched)
        self._touch(resource, obj, "MODIFIED")
        self._collect_garbage()
        return obj

    def _get(self, resource: str, ns: str, name: str) -> JSON:
        obj = self._objects.get((resource, ns, name))
        if obj is None:
            raise _ApiFailure(
                404, "NotFound", f'{resource} "{name}" not found', name=name, kind=resource
            )
        return obj

    def _delete(
        self, resource: str, ns: str, name: str, grace: int | None, propagation: str
    ) -> JSON:
        obj = self._get(resource, ns, name)
        if resource == "pods":
            uid = obj["metadata"]["uid"]
            if grace is None:
                grace = int(obj["spec"].get("terminationGracePeriodSeconds", 30))
            if self._kubelet is not None and self._kubelet.terminate(uid, grace):
                if not obj["metadata"].get("deletionTimestamp"):
                    obj["metadata"]["deletionTimestamp"] = _now()
                    obj["metadata"]["deletionGracePeriodSeconds"] = grace
                    self._propagation[uid] = propagation
                    self._touch("pods", obj, "MODIFIED")
                return obj  # removed by the kubelet once the process has exited
        self._remove(resource, ns, name, propagation)
        return obj

    def _remove(self, resource: str, ns: str, name: str, propagation: str) -> None:
        obj = self._objects.pop((resource, ns, name), None)
        if obj is None:
            return
        self._touch(resource, obj, "DELETED")
        uid = obj["metadata"]["uid"]
        self._propagation.pop(uid, None)
        self._external.discard(uid)
        if propagation == "Orphan":
            for (_, o_ns, _), dep in list(self._objects.items()):
                refs = dep["metadata"].get("ownerReferences") or []
                if o_ns == ns and any(r.get("uid") == uid for r in refs):
                    dep["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Delete every object whose owners (of the kinds emulated here) are all gone."""
        changed = True
        while changed:
            changed = False
            for (res, ns, name), obj in list(self._objects.items()):
                meta = obj["metadata"]
                refs = [
                    r
                    for r in meta.get("ownerReferences") or []
                    if r.get("kind") in ("Pod", "Secret")
                ]
                if not refs or meta.get("deletionTimestamp"):
                    continue
                if any(self._uid_exists(ns, r["uid"]) for r in refs):
                    continue
                if (res, ns, name) in self._objects:
                    self._delete(res, ns, name, None, "Background")
                    changed = True

    # -- HTTP ------------------------------------------------------------------------------
    def _check_access(self, verb: str, resource: str, ns: str | None) -> None:
        self.calls.append((verb, resource))
        denied = self.allow is not None and verb not in self.allow.get(resource, frozenset())
        if not denied:
            denied = (
                self._take_rule("forbid", lambda r: r.verb == verb and r.resource == resource)
                is not None
            )
        if denied:
            where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
            raise _ApiFailure(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "system:serviceaccount:{ns or "default"}:default" '
                f'cannot {verb} resource "{resource}" in API group ""{where}',
                kind=resource,
            )

    def _handle(self, req: Handler, method: str) -> None:
        try:
            url = urlsplit(req.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if req.headers.get("Authorization") != f"Bearer {self.token}":
                req.read_body()
                raise _ApiFailure(401, "Unauthorized", "Unauthorized")
            body = req.read_body()
            parts = [p for p in url.path.split("/") if p]
            self._route(req, method, parts, query, body)
        except _ApiFailure as exc:
            req.send_json(exc.code, exc.status)
        except OSError:
            raise  # the client went away
        except Exception as exc:  # a request the emulator cannot make sense of
            if req.responded:
                raise
            message = f"emulator error: {type(exc).__name__}: {exc}"
            req.send_json(500, _status(500, "InternalError", message))

    def _route(
        self, req: Handler, method: str, parts: list[str], query: dict[str, str], body: bytes
    ) -> None:
        if parts in (["api"], ["version"]):
            doc: JSON = (
                {"kind": "APIVersions", "versions": ["v1"]}
                if parts == ["api"]
                else {"major": "1", "minor": "30", "gitVersion": "v1.30.0-flame-emulator"}
            )
            req.send_json(200, doc)
            return
        if parts[:2] != ["api", "v1"]:
            raise _ApiFailure(404, "NotFound", "the server could not find the requested resource")
        rest = parts[2:]
        ns: str | None = None
        if len(rest) >= 2 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] not in _KINDS or len(rest) > 3:
            raise _ApiFailure(404, "NotFound", "the server could not find the requested resource")
        resource = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and (resource, sub) != ("pods", "log"):
            raise _ApiFailure(404, "NotFound", "the server could not find the requested resource")
        watch = query.get("watch") in ("true", "1")

        if name is None:
            if method == "GET":
                self._check_access("watch" if watch else "list", resource, ns)
                if watch:
                    self._serve_watch(req, resource, ns, query)
                else:
                    req.send_json(200, self._list(resource, ns, query))
                return
            if method == "POST" and ns is not None:
                self._check_access("create", resource, ns)
                doc = self._decode(body)
                with self._lock:
                    out = copy.deepcopy(self._create(resource, ns, doc))
                req.send_json(201, out)
                return
            raise _ApiFailure(405, "MethodNotAllowed", f"{method} is not allowed here")
        if ns is None:
            raise _ApiFailure(404, "NotFound", "the server could not find the requested resource")
        if sub == "log":
            if method != "GET":
                raise _ApiFailure(405, "MethodNotAllowed", f"{method} is not allowed here")
            self._check_access("get", "pods/log", ns)
            self._serve_log(req, ns, name, query)
            return
        if method == "GET":
            self._check_access("get", resource, ns)
            with self._lock:
                out = copy.deepcopy(self._get(resource, ns, name))
            req.send_json(200, out)
        elif method == "DELETE":
            self._check_access("delete", resource, ns)
            options = self._decode(body) if body else {}
            grace_raw = query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
            grace = int(grace_raw) if grace_raw is not None else None
            propagation = query.get("propagationPolicy", options.get("propagationPolicy"))
            with self._lock:
                out = copy.deepcopy(
                    self._delete(resource, ns, name, grace, propagation or "Background")
                )
            req.send_json(200, out)
        elif method == "PATCH":
            self._check_access("patch", resource, ns)
            content_type = (req.headers.get("Content-Type") or "").split(";")[0].strip()
            patch = self._decode(body)
            with self._lock:
                out = copy.deepcopy(self._patch(resource, ns, name, patch, content_type))
            req.send_json(200, out)
        else:
            raise _ApiFailure(405, "MethodNotAllowed", f"{method} is not allowed here")

    @staticmethod
    def _decode(body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError:
            raise _ApiFailure(400, "BadRequest", "the request body is not JSON") from None

    def _matcher(self, query: Mapping[str, str]) -> Callable[[JSON], bool]:
        label_tests = _parse_selector(query.get("labelSelector", ""), fields=False)
        field_tests = _parse_selector(query.get("fieldSelector", ""), fields=True)

        def match(obj: JSON) -> bool:
            labels = obj["metadata"].get("labels") or {}
            fields = _field_view(obj)
            return all(t(labels) for t in label_tests) and all(t(fields) for t in field_tests)

        return match

    def _list(self, resource: str, ns: str | None, query: Mapping[str, str]) -> JSON:
        match = self._matcher(query)
        with self._lock:
            items = [
                copy.deepcopy(obj)
                for (res, obj_ns, _), obj in sorted(self._objects.items())
                if res == resource and (ns is None or obj_ns == ns) and match(obj)
            ]
            return {
                "kind": f"{_KINDS[resource]}List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    def _serve_watch(
        self, req: Handler, resource: str, ns: str | None, query: Mapping[str, str]
    ) -> None:
        match = self._matcher(query)
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        since = query.get("resourceVersion")
        with self._lock:
            initial: list[JSON] = []
            if since in (None, "", "0"):
                for (res, obj_ns, _), obj in sorted(self._objects.items()):
                    if res == resource and (ns is None or obj_ns == ns) and match(obj):
                        initial.append({"type": "ADDED", "object": copy.deepcopy(obj)})
                cursor = self._rv
            else:
                try:
                    cursor = int(str(since))
                except ValueError:
                    raise _ApiFailure(400, "BadRequest", "invalid resourceVersion") from None
            position = len(self._events)
            while position > 0 and self._events[position - 1][0] > cursor:
                position -= 1
        req.start_stream()

        def lines(events: Iterable[JSON]) -> Iterator[bytes]:
            for e in events:
                yield json.dumps(e).encode() + b"\n"

        try:
            for line in lines(initial):
                req.send_chunk(line)
            while True:
                with self._lock:
                    while position >= len(self._events) and not self._closing:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._changed.wait(min(remaining, 1.0))
                    if self._closing or time.monotonic() >= deadline:
                        break
                    batch = self._events[position:]
                    position = len(self._events)
                out = [
                    {"type": etype, "object": obj}
                    for _, res, etype, obj in batch
                    if res == resource
                    and (ns is None or obj["metadata"]["namespace"] == ns)
                    and match(obj)
                ]
                for line in lines(out):
                    req.send_chunk(line)
            req.end_stream()
        except OSError:
            req.close_connection = True

    def _serve_log(self, req: Handler, ns: str, name: str, query: Mapping[str, str]) -> None:
        with self._lock:
            pod = self._get("pods", ns, name)
            path = self._log_path(pod["metadata"]["uid"])
            if path is None:
                first = pod["spec"]["containers"][0]["name"]
                raise _ApiFailure(
                    400,
                    "BadRequest",
                    f'container "{first}" in pod "{name}" is waiting to start: ContainerCreating',
                )
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        tail = query.get("tailLines")
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail) :]) if int(tail) > 0 else ""
        req.send_text(200, text)


class _KubeletView:
    """The emulator as its stand-in kubelet sees it (:class:`flame.testing._kubelet.PodStore`)."""

    def __init__(self, emulator: KubernetesAPIEmulator) -> None:
        self._emu = emulator

    @property
    def lock(self) -> threading.RLock:
        return self._emu._lock

    @property
    def changed(self) -> threading.Condition:
        return self._emu._changed

    @property
    def python(self) -> str:
        return self._emu.python

    @property
    def cwd(self) -> str | None:
        return self._emu.cwd

    @property
    def image_env(self) -> dict[str, str]:
        return self._emu.image_env

    @property
    def pod_ip(self) -> str:
        return self._emu.pod_ip

    def live_pod(self, ns: str, name: str, uid: str) -> JSON | None:
        return self._emu._live(ns, name, uid)

    def touch_pod(self, pod: JSON) -> None:
        self._emu._touch("pods", pod, "MODIFIED")

    def finish_deletion(self, ns: str, name: str) -> None:
        obj = self._emu._objects.get(("pods", ns, name))
        uid = obj["metadata"]["uid"] if obj else ""
        self._emu._remove("pods", ns, name, self._emu._propagation.get(uid, "Background"))

    def secret(self, ns: str, name: str) -> JSON | None:
        return self._emu._objects.get(("secrets", ns, name))

    def take_failure(self, action: str, match: Callable[[Any], bool]) -> _Rule | None:
        return self._emu._take_rule(action, match)
