"""The Kubernetes planes flame's tests run on: the emulator, and a real control plane.

* :class:`ControlPlane`: a real v1.20.2 control plane (etcd, kube-apiserver,
  kube-controller-manager with its garbage collector, kube-scheduler) whose one node is
  ``../shared/k8s/process_kubelet.py``, a stand-in kubelet that runs each bound Pod's first
  container as a local process (the image is ignored: a leading ``python`` runs this
  interpreter). It is started once per test session with ``../shared/k8s/up.sh`` on free
  ports and stopped with ``down.sh`` at the end, or, when ``FLAME_K8S_STATE`` names the
  state directory of a plane that ``.ci/tier-kubernetes`` started, attached to and left
  running. Without the binaries (``K8S_BIN``, default ``/tmp/k8sreal/bin``, as
  ``../shared/k8s/build.sh`` leaves them) the tests that need it skip, saying so.
* a *plane*: what a test sees of either, a namespace holding a Running parent Pod that
  stands for the test process, with the same helpers on both (:class:`EmulatorPlane`,
  :class:`RealPlane`): make a backend, read and delete Pods and Secrets, wait for a state,
  tell whether anything of flame's is left (objects and processes), lose or delay an answer
  or drop a request, and get credentials that hold only a given Role. On the real plane the
  backend talks to the API server through a :class:`FaultProxy` that injects those faults.
* :func:`kubernetes_real`: the factory behind ``FLAME_TEST_BACKENDS=kubernetes-real``,
  which runs the behavioural suite on the real plane; each module gets its own namespace,
  which must hold no runner Pod, Secret or process when the module ends.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

import flame
from flame.backends.kubernetes import LABEL_MANAGED_BY, KubernetesBackend
from flame.testing._http import EmulatorServer, Handler
from flame.testing.kubernetes import KubernetesAPIEmulator
from helpers import RUNNER_ROOTS

JSON = dict[str, Any]
logger = logging.getLogger("flame.tests.kubernetes")

SHARED_K8S = Path(
    os.environ.get("FLAME_K8S_SCRIPTS") or Path(__file__).resolve().parents[3] / "shared" / "k8s"
)
K8S_BIN = Path(os.environ.get("K8S_BIN") or "/tmp/k8sreal/bin")
PARENT = "flame-parent"
#: in the plane's state directory: processes of deleted Pods the stand-in kubelet left
NODE_LEFTOVERS = "flame-node-leftovers.txt"
FLAME = {LABEL_MANAGED_BY: "flame"}
#: what "the image" holds: runner Pods see this code through PYTHONPATH
IMAGE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
POD_NAME_ENV = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
_POLL = 0.05


def parent_container(**fields: Any) -> JSON:
    """The parent's app container on either plane: the test process's "image" and cwd."""
    env = [POD_NAME_ENV, *({"name": k, "value": v} for k, v in IMAGE_ENV.items())]
    container: JSON = {
        "name": "app",
        "image": "flame-tests:latest",
        "command": ["python", "-c", "pass"],
        "env": env,
        "workingDir": os.getcwd(),
    }
    extra = dict(fields)
    container["env"] = [*env, *extra.pop("env", [])]
    container.update(extra)
    return container


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(_POLL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(root: int) -> dict[int, str]:
    """``{pid: command line}`` of the live processes below ``root``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: dict[int, str] = {}
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[pid] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        stack.extend(children.get(pid, ()))
    return found


# -- the real control plane ---------------------------------------------------------------------
class ControlPlane:
    """A real control plane started by ``up.sh`` (or attached to), reached as its admin."""

    _session: ClassVar[ControlPlane | None] = None
    _failed: ClassVar[str | None] = None  # why it could not start (not tried again)

    def __init__(self, state: Path) -> None:
        self.state = state
        self.kubeconfig = str(state / "admin.kubeconfig")
        with open(self.kubeconfig) as f:
            server = re.search(r"server:\s*(\S+)", f.read())
        if server is None:
            raise RuntimeError(f"no server in {self.kubeconfig}")
        self.server = server.group(1)
        pki = state / "pki"
        self.ca = str(pki / "ca.crt")
        self.admin = ssl.create_default_context(cafile=self.ca)
        self.admin.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.http = httpx.Client(base_url=self.server, verify=self.admin, timeout=30)

    @classmethod
    def get(cls, session: contextlib.ExitStack) -> ControlPlane:
        """The session's control plane: attached, started, or a skip saying why not."""
        if cls._session is not None:
            return cls._session
        if cls._failed is not None:
            raise RuntimeError(cls._failed)
        attached = os.environ.get("FLAME_K8S_STATE")
        try:
            plane = cls(Path(attached)) if attached else cls._start(session)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            cls._failed = f"the real control plane could not start: {exc}"
            session.callback(setattr, cls, "_failed", None)
            raise
        session.callback(plane.http.close)
        cls._session = plane
        session.callback(setattr, cls, "_session", None)
        # its runners count as ours in the suite's leak checks (helpers.runner_pids)
        kubelet = plane.kubelet_pid()
        RUNNER_ROOTS.add(kubelet)
        session.callback(RUNNER_ROOTS.discard, kubelet)
        return plane

    @classmethod
    def _start(cls, session: contextlib.ExitStack) -> ControlPlane:
        missing = [
            b
            for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd")
            if not (K8S_BIN / b).is_file()
        ]
        if missing or not (SHARED_K8S / "up.sh").is_file():
            pytest.skip(
                f"no real Kubernetes control plane here: {', '.join(missing) or 'up.sh'} "
                f"missing (K8S_BIN={K8S_BIN}, scripts in {SHARED_K8S}); build the binaries "
                f"with {SHARED_K8S}/build.sh or run .ci/tier-kubernetes"
            )
        state = Path(tempfile.mkdtemp(prefix="flame-k8s-plane-"))
        env = {
            **os.environ,
            "K8S_BIN": str(K8S_BIN),
            "PROCESS_KUBELET": "1",
            "POD_PYTHON": sys.executable,
            "ETCD_PORT": str(_free_port()),
            "ETCD_PEER_PORT": str(_free_port()),
            "APISERVER_PORT": str(_free_port()),
        }
        # whatever happens next, stop what up.sh started (by its pid files) and clean up
        session.callback(shutil.rmtree, state, True)
        session.callback(
            subprocess.run,
            ["bash", str(SHARED_K8S / "down.sh"), str(state)],
            capture_output=True,
            timeout=60,
        )
        done = subprocess.run(
            ["bash", str(SHARED_K8S / "up.sh"), str(state)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if done.returncode != 0:
            raise RuntimeError(f"up.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return cls(state)

    def kubelet_pid(self) -> int:
        return int((self.state / "process-kubelet.pid").read_text().strip())

    def processes(self) -> dict[int, tuple[str, str, str]]:
        """``{pid: (namespace, pod name, pod uid)}`` of the processes the stand-in kubelet
        runs for Pods (told by the log file it gave each: ``NS_NAME_UID.log``)."""
        found: dict[int, tuple[str, str, str]] = {}
        for pid in _descendants(self.kubelet_pid()):
            with contextlib.suppress(OSError):
                log = os.path.basename(os.readlink(f"/proc/{pid}/fd/1"))
                parts = log.removesuffix(".log").split("_")
                if log.endswith(".log") and len(parts) == 3:
                    found[pid] = (parts[0], parts[1], parts[2])
        return found

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        raw: bytes | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        content = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": content_type} if content is not None else {}
        return self.http.request(method, path, content=content, headers=headers, params=params)

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> JSON:
        r = self.api(method, path, body, **kw)
        if r.status_code >= 400:
            raise AssertionError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        doc: JSON = r.json()
        return doc


# -- a proxy that loses answers ---------------------------------------------------------------
_PATHS = {
    "pods": r"/api/v1/namespaces/[^/]+/pods",
    "secrets": r"/api/v1/namespaces/[^/]+/secrets",
}


def request_matcher(verb: str, resource: str) -> Callable[[str, str], bool]:
    """Whether an HTTP request (method, path) is ``verb`` on ``resource``, as RBAC names them."""
    base = _PATHS[resource]
    one = base + r"/[^/?]+(\?.*)?$"
    every = base + r"(\?.*)?$"
    shapes = {
        "create": ("POST", every),
        "list": ("GET", every),
        "get": ("GET", one),
        "patch": ("PATCH", one),
        "delete": ("DELETE", one),
    }
    method, pattern = shapes[verb]

    def match(m: str, path: str) -> bool:
        if m != method or not re.match(pattern, path):
            return False
        return verb != "list" or "watch=" not in path

    return match


@dataclass
class _Fault:
    kind: str  # "lose" (carried out, answer lost), "drop" (never carried out)
    match: Callable[[str, str], bool]
    remaining: int
    delay: float = 0.0


class FaultProxy:
    """A plain-HTTP proxy on 127.0.0.1 in front of the API server, which loses answers.

    It forwards every request over TLS: with the client's bearer token when it sends one,
    else as the plane's admin. A rule may carry out a request and drop the connection
    instead of answering (after a delay, to outlast the client's timeout), or drop the
    connection before forwarding. Watches and logs are streamed through.
    """

    def __init__(self, control: ControlPlane) -> None:
        self._control = control
        self._anonymous = ssl.create_default_context(cafile=control.ca)
        self._upstream = re.match(r"https://([^:/]+):(\d+)", control.server)
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._live: set[http.client.HTTPSConnection] = set()
        self._closed = threading.Event()
        self.seen: list[tuple[str, str]] = []
        self._server = EmulatorServer(self._serve, "k8s-fault-proxy").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            live = list(self._live)
        for conn in live:
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self._server.close()

    def add(self, kind: str, verb: str, resource: str, times: int, delay: float = 0.0) -> None:
        with self._lock:
            self._faults.append(_Fault(kind, request_matcher(verb, resource), times, delay))

    def _take(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.match(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    def _serve(self, req: Handler, method: str) -> None:
        body = req.read_body()
        self.seen.append((method, req.path))
        fault = self._take(method, req.path)
        if fault is not None and fault.kind == "drop":
            req.hang_up()
            return
        headers = {
            k: v for k in ("Content-Type", "Accept", "Authorization") if (v := req.headers.get(k))
        }
        assert self._upstream is not None
        ctx = self._anonymous if "Authorization" in headers else self._control.admin
        conn = http.client.HTTPSConnection(
            self._upstream.group(1), int(self._upstream.group(2)), context=ctx, timeout=120
        )
        with self._lock:
            self._live.add(conn)
        try:
            conn.request(method, req.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            content_type = resp.getheader("Content-Type") or "application/json"
            if fault is not None:  # carried out: now lose the answer
                resp.read()
                if fault.delay:
                    self._closed.wait(fault.delay)
                req.hang_up()
            elif resp.chunked:
                req.start_stream(content_type)
                while line := resp.readline():
                    req.send_chunk(line)
                req.end_stream()
            else:
                req.send_body(resp.status, resp.read(), content_type)
        except OSError:
            req.hang_up()
        finally:
            with self._lock:
                self._live.discard(conn)
            conn.close()

    def kubeconfig(self, directory: str, namespace: str) -> str:
        """A kubeconfig that reaches the API server through this proxy, as the admin."""
        path = os.path.join(directory, "proxy.kubeconfig")
        _write_kubeconfig(path, self.url, namespace, {})  # the proxy is the admin
        return path


def _write_kubeconfig(path: str, server: str, namespace: str, user: JSON, ca: str = "") -> None:
    cluster: JSON = {"server": server}
    if ca:
        cluster["certificate-authority"] = ca
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [
            {"name": "c", "context": {"cluster": "c", "user": "u", "namespace": namespace}}
        ],
        "current-context": "c",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)


# -- planes -----------------------------------------------------------------------------------
class _Plane:
    """What both planes share: the parent, a backend for it, and leak checks."""

    kind: str
    namespace: str
    parent: str
    kubeconfig: str

    def backend(self, **options: Any) -> KubernetesBackend:
        """A backend of the parent Pod (addresses on loopback: runners are local processes)."""
        options.setdefault("kubeconfig", self.kubeconfig)
        options.setdefault("namespace", self.namespace)
        options.setdefault("pod_name", self.parent)
        options.setdefault("listen_host", "127.0.0.1")
        options.setdefault("advertise_host", "127.0.0.1")
        return KubernetesBackend(**options)

    def pods(self, labels: Mapping[str, str] | None = None) -> list[JSON]:
        raise NotImplementedError

    def secrets(self, labels: Mapping[str, str] | None = None) -> list[JSON]:
        raise NotImplementedError

    def processes(self) -> dict[Any, Any]:
        raise NotImplementedError

    def wait_until(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        _wait(predicate, timeout, f"{self.kind} plane")

    def runner_objects(self) -> list[str]:
        """``Pod/name`` and ``Secret/name`` of every object of flame's in the namespace."""
        return [f"Pod/{o['metadata']['name']}" for o in self.pods(FLAME)] + [
            f"Secret/{o['metadata']['name']}" for o in self.secrets(FLAME)
        ]

    def nothing_left(self, timeout: float = 15.0) -> None:
        """Wait until no runner Pod, Secret or process is left; fail naming what is."""
        try:
            self.wait_until(lambda: not self.runner_objects() and not self.processes(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"left behind after {timeout:g} s: {self.runner_objects()} processes "
                f"{self.processes()}"
            ) from None


class EmulatorPlane(_Plane):
    """The emulator as a plane (a fresh one per test)."""

    kind = "emulator"

    def __init__(self, token: str = "emulator-plane-token") -> None:
        self.emulator = KubernetesAPIEmulator(token=token, env=IMAGE_ENV).start()
        self.namespace = self.emulator.namespace
        self.kubeconfig = self.emulator.kubeconfig
        self.parent = self.add_parent(PARENT)
        self._http = httpx.Client(
            base_url=self.emulator.url, headers={"Authorization": f"Bearer {token}"}
        )

    def close(self) -> None:
        self._http.close()
        self.emulator.close()

    def add_parent(self, name: str, *, spec: JSON | None = None, **container: Any) -> str:
        c = parent_container(**container)
        extra = dict(spec or {})
        others = extra.pop("containers", [])
        self.emulator.add_parent_pod(
            name,
            image=c.pop("image"),
            env=c.pop("env"),
            container_fields=c,
            spec={**extra, **({"containers": others} if others else {})},
        )
        return name

    def ensure_priority_class(self, name: str) -> None:
        """(The emulator does not check priority classes.)"""

    def get_pod(self, name: str) -> JSON | None:
        return self.emulator.get_pod(name)

    def get_secret(self, name: str) -> JSON | None:
        return self.emulator.get_secret(name)

    def pod_log(self, name: str) -> str:
        return self.emulator.pod_log(name)

    def pods(self, labels: Mapping[str, str] | None = None) -> list[JSON]:
        return self.emulator.pods(labels=labels)

    def secrets(self, labels: Mapping[str, str] | None = None) -> list[JSON]:
        return self.emulator.secrets(labels=labels)

    def delete_pod(
        self, name: str, *, grace_period: int | None = None, propagation: str = "Background"
    ) -> None:
        self.emulator.delete_pod(name, grace_period=grace_period, propagation=propagation)

    def processes(self) -> dict[Any, Any]:
        return self.emulator.processes()

    def wait_until(self, predicate: Callable[[], object], timeout: float = 10.0) -> None:
        try:
            self.emulator.wait_until(predicate, timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"emulator plane: {exc}") from None

    def lose_answer(self, verb: str, resource: str, *, times: int = 1, delay: float = 0.0) -> None:
        self.emulator.lose_answer(verb, resource, times=times, delay=delay)

    def drop_request(self, verb: str, resource: str, *, times: int = 1) -> None:
        self.emulator.drop_request(verb, resource, times=times)

    def with_role(self, rules: Mapping[str, set[str]]) -> str:
        """A kubeconfig whose user holds only ``rules`` (resource -> verbs) here."""
        self.emulator.allow = {r: frozenset(v) for r, v in rules.items()}
        return self.kubeconfig

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> httpx.Response:
        content = None if body is None else json.dumps(body).encode()
        if isinstance(body, str):
            content = body.encode()
        headers = {"Content-Type": content_type} if content is not None else {}
        return self._http.request(
            method, path.replace("NS", self.namespace), content=content, headers=headers
        )


class RealPlane(_Plane):
    """A fresh namespace of the real control plane, holding a Running parent Pod.

    With ``proxy=True`` the backends it makes reach the API server through a
    :class:`FaultProxy` (so answers can be lost); its own helpers talk to the API server
    directly, as the admin.
    """

    kind = "real"

    def __init__(self, control: ControlPlane, *, proxy: bool = True) -> None:
        self.control = control
        self.namespace = f"flame-{uuid.uuid4().hex[:10]}"
        self._dir = tempfile.mkdtemp(prefix="flame-k8s-plane-ns-")
        self._proxy = FaultProxy(control) if proxy else None
        self.kubeconfig = (
            self._proxy.kubeconfig(self._dir, self.namespace) if self._proxy else control.kubeconfig
        )
        self._ns_path = f"/api/v1/namespaces/{self.namespace}"
        #: processes the stand-in kubelet kept running for Pods already deleted (reaped)
        self.node_leftovers: list[str] = []
        control.ok("POST", "/api/v1/namespaces", {"metadata": {"name": self.namespace}})
        # v1.20 admission wants the service account's token Secret before a Pod may use it
        self.wait_until(lambda: self._token_secret("default") is not None, 30)
        self.parent = self.add_parent(PARENT)

    def close(self, *, check: bool = True) -> None:
        """Check that nothing of flame's is left (``check``), then delete the namespace."""
        try:
            if check:
                self.nothing_left(30)
        finally:
            if self._proxy is not None:
                self._proxy.close()
            self.control.api("DELETE", self._ns_path)
            self.reap(15)  # (the namespace's Pods are deleted with it)
            shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def proxy(self) -> FaultProxy:
        assert self._proxy is not None
        return self._proxy

    def _token_secret(self, account: str) -> JSON | None:
        r = self.control.api("GET", f"{self._ns_path}/serviceaccounts/{account}")
        if r.status_code != 200:
            return None
        for ref in r.json().get("secrets") or []:
            s = self.control.api("GET", f"{self._ns_path}/secrets/{ref['name']}")
            if s.status_code == 200 and (s.json().get("data") or {}).get("token"):
                doc: JSON = s.json()
                return doc
        return None

    def create_pod(self, pod: JSON) -> JSON:
        """Create a Pod as the admin, retrying what the API server says while its caches
        catch up: v1.20's "No API token found" (500) for a new ServiceAccount, and "no
        PriorityClass" (403) from the admission plugin for one just created."""
        for _ in range(20):
            r = self.control.api("POST", f"{self._ns_path}/pods", pod)
            if r.status_code != 500 and "no PriorityClass with name" not in r.text:
                break
            time.sleep(0.5)
        if r.status_code != 201:
            raise AssertionError(f"creating pod: {r.status_code} {r.text[:500]}")
        doc: JSON = r.json()
        return doc

    def add_parent(self, name: str, *, spec: JSON | None = None, **container: Any) -> str:
        """Create a parent Pod (the stand-in kubelet runs nothing for it) and wait until it
        is Running."""
        extra = dict(spec or {})
        others = extra.pop("containers", [])
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {"app": "flame-parent"},
                "annotations": {"process-kubelet/run": "false"},
            },
            "spec": {
                "containers": [parent_container(**container), *others],
                "terminationGracePeriodSeconds": 5,
                **extra,
            },
        }
        self.create_pod(pod)
        self.wait_until(
            lambda: ((self.get_pod(name) or {}).get("status") or {}).get("phase") == "Running", 30
        )
        return name

    def ensure_priority_class(self, name: str) -> None:
        r = self.control.api(
            "POST",
            "/apis/scheduling.k8s.io/v1/priorityclasses",
            {"apiVersion": "scheduling.k8s.io/v1", "metadata": {"name": name}, "value": 1000},
        )
        assert r.status_code in (201, 409), r.text

    def _get(self, kind: str, name: str) -> JSON | None:
        r = self.control.api("GET", f"{self._ns_path}/{kind}/{name}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        doc: JSON = r.json()
        return doc

    def _list(self, kind: str, labels: Mapping[str, str] | None) -> list[JSON]:
        params = (
            {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else {}
        )
        r = self.control.api("GET", f"{self._ns_path}/{kind}", params=params)
        r.raise_for_status()
        items: list[JSON] = r.json().get("items") or []
        return items

    def get_pod(self, name: str) -> JSON | None:
        return self._get("pods", name)

    def get_secret(self, name: str) -> JSON | None:
        return self._get("secrets", name)

    def pod_log(self, name: str) -> str:
        r = self.control.api("GET", f"{self._ns_path}/pods/{name}/log")
        return r.text if r.status_code == 200 else ""

    def pods(self, labels: Mapping[str, str] | None = None) -> list[JSON]:
        return self._list("pods", labels)

    def secrets(self, labels: Mapping[str, str] | None = None) -> list[JSON]:
        return self._list("secrets", labels)

    def delete_pod(
        self, name: str, *, grace_period: int | None = None, propagation: str = "Background"
    ) -> None:
        options: JSON = {"kind": "DeleteOptions", "apiVersion": "v1"}
        options["propagationPolicy"] = propagation
        if grace_period is not None:
            options["gracePeriodSeconds"] = grace_period
        r = self.control.api("DELETE", f"{self._ns_path}/pods/{name}", options)
        assert r.status_code == 200, r.text

    def processes(self) -> dict[Any, Any]:
        """``{pid: pod name}`` of the processes run for Pods of this namespace."""
        return {
            pid: name
            for pid, (ns, name, _) in self.control.processes().items()
            if ns == self.namespace
        }

    def _pods_of(self, live: set[str]) -> dict[int, str]:
        return {
            pid: name
            for pid, (ns, name, uid) in self.control.processes().items()
            if ns == self.namespace and uid in live
        }

    def nothing_left(self, timeout: float = 15.0) -> None:
        """As on the emulator: no runner Pod, Secret, or process of a Pod is left, once
        what the stand-in kubelet itself failed to stop is reaped (:meth:`reap`)."""

        def gone() -> bool:
            self._reap(self._stuck())
            return not self.runner_objects()

        try:
            self.wait_until(gone, timeout)
        except TimeoutError:
            raise AssertionError(
                f"left behind after {timeout:g} s: {self.runner_objects()}"
            ) from None
        live = {p["metadata"]["uid"] for p in self.pods()}
        try:
            self.wait_until(lambda: not self._pods_of(live), timeout)
        except TimeoutError:
            raise AssertionError(
                f"processes of Pods left after {timeout:g} s: {self._pods_of(live)}"
            ) from None
        self.reap(3.0)  # the Pods are gone: their processes end at once, or never

    def _stuck(self) -> dict[int, str]:
        """Processes of Pods whose deletion began longer ago than their grace period (and
        a margin): the stand-in kubelet no longer stops them."""
        pods = {p["metadata"]["uid"]: p for p in self.pods()}
        now = time.time()
        stuck = {}
        for pid, (ns, name, uid) in self.control.processes().items():
            meta = (pods.get(uid) or {}).get("metadata") or {}
            since = meta.get("deletionTimestamp")
            if ns != self.namespace or not since:
                continue
            began = datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            if now - began.timestamp() > float(meta.get("deletionGracePeriodSeconds") or 0) + 3:
                stuck[pid] = name
        return stuck

    def reap(self, timeout: float) -> None:
        """Wait (``timeout``) for the processes run for this namespace's deleted Pods to end,
        then kill those the stand-in kubelet failed to stop, recording them in
        :attr:`node_leftovers`.

        ``process_kubelet.py`` checks for a Pod's deletion only before it starts the Pod's
        process, and its later stops return early: a Pod deleted just as its process starts
        (a cancelled boot) keeps that process running, and stays Terminating until the
        process ends (the stand-in completes a deletion only then). A real kubelet stops the
        containers of a Pod being deleted; flame's part, deleting the Pod, was done.
        """
        with contextlib.suppress(TimeoutError):
            self.wait_until(lambda: not self.processes(), timeout)
        self._reap(self.processes())

    def _reap(self, processes: Mapping[int, str]) -> None:
        reaped = [f"{pid} (pod {name}, deleted)" for pid, name in processes.items()]
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if reaped:
            self.node_leftovers += reaped
            logger.warning("the stand-in kubelet left processes of deleted Pods: %s", reaped)
            # (.ci/tier-kubernetes reports them at the end)
            with open(self.control.state / NODE_LEFTOVERS, "a") as f:
                f.writelines(f"{self.namespace}: {item}\n" for item in reaped)

    def lose_answer(self, verb: str, resource: str, *, times: int = 1, delay: float = 0.0) -> None:
        self.proxy.add("lose", verb, resource, times, delay)

    def drop_request(self, verb: str, resource: str, *, times: int = 1) -> None:
        self.proxy.add("drop", verb, resource, times)

    def with_role(self, rules: Mapping[str, set[str]]) -> str:
        """A kubeconfig for a new service account bound to a Role granting ``rules``."""
        account = f"flame-{secrets.token_hex(3)}"
        self.control.ok("POST", f"{self._ns_path}/serviceaccounts", {"metadata": {"name": account}})
        rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.namespace}"
        self.control.ok(
            "POST",
            f"{rbac}/roles",
            {
                "metadata": {"name": account},
                "rules": [
                    {"apiGroups": [""], "resources": [r], "verbs": sorted(v)}
                    for r, v in rules.items()
                ],
            },
        )
        self.control.ok(
            "POST",
            f"{rbac}/rolebindings",
            {
                "metadata": {"name": account},
                "subjects": [{"kind": "ServiceAccount", "name": account}],
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": account,
                },
            },
        )
        found: list[JSON] = []

        def token_ready() -> bool:
            secret = self._token_secret(account)
            found[:] = [secret] if secret is not None else []
            return bool(found)

        self.wait_until(token_ready, 30)
        token = base64.b64decode(found[0]["data"]["token"]).decode()
        path = os.path.join(self._dir, f"{account}.kubeconfig")
        _write_kubeconfig(
            path, self.control.server, self.namespace, {"token": token}, self.control.ca
        )
        return path

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> httpx.Response:
        raw = body.encode() if isinstance(body, str) else None
        return self.control.api(
            method,
            path.replace("NS", self.namespace),
            None if raw is not None else body,
            raw=raw,
            content_type=content_type,
        )


Plane = EmulatorPlane | RealPlane


def selected_planes() -> list[str]:
    """The planes ``FLAME_TEST_BACKENDS`` selects: ``kubernetes`` is the emulator,
    ``kubernetes-real`` the real plane; the emulator when it names neither."""
    chosen = {b.strip() for b in os.environ.get("FLAME_TEST_BACKENDS", "").split(",")}
    planes = [
        p for b, p in (("kubernetes", "emulator"), ("kubernetes-real", "real")) if b in chosen
    ]
    return planes or ["emulator"]


@contextlib.contextmanager
def open_plane(kind: str, session: contextlib.ExitStack) -> Iterator[Plane]:
    """A fresh plane of ``kind`` for one test (the real one skips when it cannot start)."""
    if kind == "emulator":
        emulated = EmulatorPlane()
        try:
            yield emulated
        finally:
            emulated.close()
        return
    real = RealPlane(ControlPlane.get(session))
    try:
        yield real
    finally:
        real.close(check=False)


# -- the behavioural suite on the real plane ---------------------------------------------------
def kubernetes_real(stacks: Any) -> Callable[[], flame.Backend]:
    """Backends on the real control plane; the module's namespace is checked for leftovers
    (runner Pods, Secrets, processes) and deleted when the module ends."""
    control = ControlPlane.get(stacks.session)
    plane = RealPlane(control, proxy=False)
    stacks.module.callback(plane.close)
    return plane.backend
