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
  ``Unschedulable``), images that cannot be pulled (``ErrImagePull``), ``403 Forbidden``
  for chosen verbs, requests carried out whose answer is lost (or comes too late), and
  requests dropped before they are carried out.
* the validation of the real v1.20 API server (``flame.testing._validation``), with its
  status codes: 400 for what it cannot decode, 422 for what it will not store.

A "parent Pod" standing for the test process itself is added with
:meth:`KubernetesAPIEmulator.add_parent_pod`: it is reported ``Running`` but runs nothing.

What it is not: a scheduler, a container runtime or a full API server. Images are never
pulled (the local interpreter and ``PYTHONPATH`` stand for them), only the first container of
a Pod runs, strategic merge patches are treated as JSON merge patches, and nothing persists.
"""

from __future__ import annotations

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

from . import _validation
from ._http import EmulatorServer, Handler
from ._kubelet import NODE_NAME, StandInKubelet, container_status
from ._kubelet import now as _now
from ._validation import ApiFailure as _ApiFailure
from ._validation import status as _status

__all__ = ["KubernetesAPIEmulator"]

JSON = dict[str, Any]

_KINDS = {"pods": "Pod", "secrets": "Secret"}
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet Kubernetes uses for generateName
_NOT_ALLOWED = "the server does not allow this method on the requested resource"


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
            raise _ApiFailure(
                400, "BadRequest", f"invalid selector: '{part}'; can't understand '{part}'"
            )
        if part.startswith("!"):
            tests.append(_Requirement("!exists", part[1:]))
        elif re.fullmatch(r"[^\s()=!,]+", part):
            tests.append(_Requirement("exists", part))
        else:
            raise _ApiFailure(400, "BadRequest", f"unable to parse requirement: '{part}'")
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


class _Dropped(Exception):
    """An injected failure: the connection is dropped before the request is carried out."""


@dataclass
class _Rule:
    """One injected failure; ``remaining`` is how many more times it fires (None: always)."""

    action: str  # "schedule" | "image" | "forbid" | "lose" | "drop"
    remaining: int | None
    message: str = ""
    reason: str = ""
    image: str | None = None
    verb: str = ""
    resource: str = ""
    delay: float = 0.0

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
        self._namespaces = {namespace, "default", "kube-system", "kube-public", "kube-node-lease"}
        self._events: list[tuple[int, str, str, JSON]] = []  # (rv, resource, type, object)
        self._external: set[str] = set()  # uids of Pods that stand for this process
        self._propagation: dict[str, str] = {}  # pod uid -> propagation of its pending delete
        self._rules: list[_Rule] = []
        self._kubelet: StandInKubelet | None = None
        self._closing = False
        self._closed = threading.Event()  # wakes answers held back by an injected delay
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
            self._closed.set()
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
        ``imagePullSecrets``...). Its namespace is created if needed.
        """
        ns = namespace or self.namespace
        self.add_namespace(ns)
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

    def add_namespace(self, name: str) -> None:
        """Create a namespace (the emulator starts with its own, ``default`` and the
        ``kube-*`` ones; creating an object in any other is a 404, as on a cluster)."""
        with self._lock:
            self._namespaces.add(name)

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
        self,
        name: str,
        namespace: str | None = None,
        *,
        grace_period: int | None = None,
        propagation: str = "Background",
    ) -> None:
        """Delete a Pod as ``kubectl delete pod`` would; its dependents are collected
        (``propagation="Orphan"``, as ``--cascade=orphan``: they are kept, without the
        owner reference)."""
        _validation.check_propagation(propagation)
        with self._lock:
            key = ("pods", namespace or self.namespace, name)
            if key not in self._objects:
                raise KeyError(f"no pod {key[1]}/{name}")
            self._delete("pods", key[1], name, grace_period, propagation)

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

    def lose_answer(
        self, verb: str, resource: str, *, times: int | None = 1, delay: float = 0.0
    ) -> None:
        """Carry out the next ``times`` requests ``verb`` on ``resource`` (e.g. ``"create"``,
        ``"pods"``) but never answer them: after ``delay`` seconds the connection is dropped,
        as when an answer is lost on the way or a client times out first."""
        with self._lock:
            self._rules.append(_Rule("lose", times, verb=verb, resource=resource, delay=delay))

    def drop_request(self, verb: str, resource: str, *, times: int | None = 1) -> None:
        """Drop the connection of the next ``times`` requests ``verb`` on ``resource``
        before carrying them out (the request was lost, not the answer)."""
        with self._lock:
            self._rules.append(_Rule("drop", times, verb=verb, resource=resource))

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
        kind = _KINDS[resource]
        _validation.check_decodable(kind, body)
        if ns not in self._namespaces:
            raise _ApiFailure(
                404, "NotFound", f'namespaces "{ns}" not found', name=ns, kind="namespaces"
            )
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = "v1", kind
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace") not in (None, ns):
            raise _ApiFailure(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        name = str(meta.get("name") or "")
        prefix = str(meta.get("generateName") or "")
        if not name and prefix:
            for _ in range(100):
                suffix = "".join(self._random.choice(_NAME_CHARS) for _ in range(5))
                name = _validation.generated_name(prefix, suffix)
                if (resource, ns, name) not in self._objects:
                    break
        _validation.validate_name(kind, name, meta)
        _validation.validate_meta(kind, name, meta)
        if resource == "pods":
            _validation.validate_pod(name, obj)
        else:
            _validation.normalise_secret(name, obj)
        if (resource, ns, name) in self._objects:
            raise _ApiFailure(
                409,
                "AlreadyExists",
                f'{resource} "{name}" already exists',
                name=name,
                kind=resource,
            )
        meta.update(
            name=name,
            namespace=ns,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
        )
        if resource == "pods":
            spec = obj["spec"]
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("serviceAccountName", "default")
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        self._objects[(resource, ns, name)] = obj
        self._touch(resource, obj, "ADDED")
        if resource == "pods":
            if run:
                assert self._kubelet is not None
                self._kubelet.start(obj)
            else:
                self._external.add(meta["uid"])
        self._collect_garbage()
        return obj

    def _patch(self, resource: str, ns: str, name: str, body: JSON, content_type: str) -> JSON:
        if content_type not in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            raise _ApiFailure(
                415,
                "UnsupportedMediaType",
                f"415: Unsupported Media Type (the emulator applies merge patches, not "
                f"{content_type!r})",
            )
        obj = self._get(resource, ns, name)
        patched = _merge_patch(obj, body)
        patched["metadata"].update(
            {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "creationTimestamp")}
        )
        patched["apiVersion"], patched["kind"] = obj["apiVersion"], obj["kind"]
        _validation.check_decodable(obj["kind"], patched)
        _validation.validate_meta(obj["kind"], name, patched["metadata"])
        if resource == "secrets":
            _validation.normalise_secret(name, patched)
            _validation.validate_secret_update(name, obj, patched)
        else:
            _validation.validate_pod_update(name, obj, patched)
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
    def _check_access(self, verb: str, resource: str, ns: str | None, ctx: JSON) -> None:
        self.calls.append((verb, resource))

        def applies(rule: _Rule) -> bool:
            return rule.verb == verb and rule.resource == resource

        if self._take_rule("drop", applies) is not None:
            raise _Dropped
        ctx["lose"] = self._take_rule("lose", applies)
        denied = self.allow is not None and verb not in self.allow.get(resource, frozenset())
        if not denied:
            denied = self._take_rule("forbid", applies) is not None
        if denied:
            where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
            raise _ApiFailure(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "system:serviceaccount:{ns or "default"}:default" '
                f'cannot {verb} resource "{resource}" in API group ""{where}',
                kind=resource,
            )

    def _reply(self, req: Handler, ctx: JSON, code: int, doc: Any) -> None:
        """Answer, unless an injected failure loses the answer (after its delay)."""
        lose: _Rule | None = ctx.get("lose")
        if lose is None:
            req.send_json(code, doc)
            return
        if lose.delay > 0:
            self._closed.wait(lose.delay)
        req.hang_up()

    def _handle(self, req: Handler, method: str) -> None:
        ctx: JSON = {}
        try:
            url = urlsplit(req.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if req.headers.get("Authorization") != f"Bearer {self.token}":
                req.read_body()
                raise _ApiFailure(401, "Unauthorized", "Unauthorized")
            body = req.read_body()
            parts = [p for p in url.path.split("/") if p]
            self._route(req, method, parts, query, body, ctx)
        except _ApiFailure as exc:
            self._reply(req, ctx, exc.code, exc.status)
        except _Dropped:
            req.hang_up()
        except OSError:
            raise  # the client went away
        except Exception as exc:  # a request the emulator cannot make sense of
            if req.responded:
                raise
            message = f"emulator error: {type(exc).__name__}: {exc}"
            req.send_json(500, _status(500, "InternalError", message))

    def _route(
        self,
        req: Handler,
        method: str,
        parts: list[str],
        query: dict[str, str],
        body: bytes,
        ctx: JSON,
    ) -> None:
        if parts in (["api"], ["version"]):
            doc: JSON = (
                {"kind": "APIVersions", "versions": ["v1"]}
                if parts == ["api"]
                else {"major": "1", "minor": "20", "gitVersion": "v1.20.2-flame-emulator"}
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
                self._check_access("watch" if watch else "list", resource, ns, ctx)
                if watch:
                    self._serve_watch(req, resource, ns, query)
                else:
                    self._reply(req, ctx, 200, self._list(resource, ns, query))
                return
            if method == "POST" and ns is not None:
                self._check_access("create", resource, ns, ctx)
                doc = self._decode(body)
                with self._lock:
                    out = copy.deepcopy(self._create(resource, ns, doc))
                self._reply(req, ctx, 201, out)
                return
            raise _ApiFailure(405, "MethodNotAllowed", _NOT_ALLOWED)
        if ns is None:
            raise _ApiFailure(404, "NotFound", "the server could not find the requested resource")
        if sub == "log":
            if method != "GET":
                raise _ApiFailure(405, "MethodNotAllowed", _NOT_ALLOWED)
            self._check_access("get", "pods/log", ns, ctx)
            self._serve_log(req, ns, name, query)
            return
        if method == "GET":
            self._check_access("get", resource, ns, ctx)
            with self._lock:
                out = copy.deepcopy(self._get(resource, ns, name))
            self._reply(req, ctx, 200, out)
        elif method == "DELETE":
            self._check_access("delete", resource, ns, ctx)
            options = self._decode(body) if body else {}
            grace_raw = query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
            grace = int(grace_raw) if grace_raw is not None else None
            propagation = query.get("propagationPolicy", options.get("propagationPolicy"))
            _validation.check_propagation(propagation)
            with self._lock:
                out = copy.deepcopy(
                    self._delete(resource, ns, name, grace, propagation or "Background")
                )
            if resource == "secrets":  # deleted at once: the answer is a Status, not the object
                uid = out["metadata"]["uid"]
                out = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {"name": name, "kind": resource, "uid": uid},
                }
            self._reply(req, ctx, 200, out)
        elif method == "PATCH":
            self._check_access("patch", resource, ns, ctx)
            content_type = (req.headers.get("Content-Type") or "").split(";")[0].strip()
            patch = self._decode(body)
            with self._lock:
                out = copy.deepcopy(self._patch(resource, ns, name, patch, content_type))
            self._reply(req, ctx, 200, out)
        else:
            raise _ApiFailure(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )

    @staticmethod
    def _decode(body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError:
            raise _ApiFailure(
                400,
                "BadRequest",
                "the object provided is unrecognized: couldn't get version/kind; json parse error",
            ) from None

    def _matcher(self, resource: str, query: Mapping[str, str]) -> Callable[[JSON], bool]:
        label_tests = _parse_selector(query.get("labelSelector", ""), fields=False)
        field_tests = _parse_selector(query.get("fieldSelector", ""), fields=True)
        _validation.check_field_selector(resource, [t.key for t in field_tests])

        def match(obj: JSON) -> bool:
            labels = obj["metadata"].get("labels") or {}
            fields = _field_view(obj)
            return all(t(labels) for t in label_tests) and all(t(fields) for t in field_tests)

        return match

    @staticmethod
    def _resource_version(query: Mapping[str, str]) -> int | None:
        since = query.get("resourceVersion")
        if since in (None, ""):
            return None
        try:
            return int(str(since))
        except ValueError:
            raise _ApiFailure(
                500,
                "",
                f'resourceVersion: Invalid value: "{since}": strconv.ParseUint: parsing '
                f'"{since}": invalid syntax',
            ) from None

    def _list(self, resource: str, ns: str | None, query: Mapping[str, str]) -> JSON:
        match = self._matcher(resource, query)
        self._resource_version(query)
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
        match = self._matcher(resource, query)
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        since = self._resource_version(query)
        with self._lock:
            initial: list[JSON] = []
            if not since:
                for (res, obj_ns, _), obj in sorted(self._objects.items()):
                    if res == resource and (ns is None or obj_ns == ns) and match(obj):
                        initial.append({"type": "ADDED", "object": copy.deepcopy(obj)})
                cursor = self._rv
            else:
                cursor = since
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
            if path is None and not pod["spec"].get("nodeName"):
                req.send_body(204, b"", "text/plain")  # as v1.20 answers for a Pod on no node
                return
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
