"""The stand-in kubelet of :class:`~flame.testing.kubernetes.KubernetesAPIEmulator`.

What this module owns: the node side of the emulator. For each Pod the emulated API server
stores, it does what the scheduler and a kubelet would do for a cluster of one node, and
reports every step back into the store as the Pod's ``status``:

1. bind the Pod to the node (``spec.nodeName``), or leave it Pending with
   ``PodScheduled=False / Unschedulable`` when its ``nodeSelector`` does not match the
   node's labels (:data:`NODE_LABELS`) or a scheduling failure is injected;
2. "pull the image", or report an injected pull failure (``waiting: ErrImagePull``...);
3. resolve the first container's environment (plain values, ``fieldRef``, ``secretKeyRef``
   and ``envFrom.secretRef`` from the stored Secrets): a missing Secret or key gives
   ``waiting: CreateContainerConfigError`` and is retried whenever the store changes, as a
   kubelet retries;
4. run ``command + args`` as a local process in its own session, output to a log file
   (``pods/log``), and report Running (``podIP``), then Succeeded or Failed with the exit code
   (128 + n for a process killed by signal n, as a container runtime reports it);
5. on a graceful deletion, SIGTERM the process group, SIGKILL it after the grace period, and
   finish the deletion once the process is gone.

It is a stand-in, not a kubelet: the image is never pulled (a leading ``python`` in the
command runs the emulator's interpreter, and the emulator's image env stands for what the
image holds), only the first container runs, and there are no volumes, probes, init
containers or restarts. The other containers of a Pod (sidecars) are reported running, with
nothing behind them, until the Pod is deleted: so a Pod whose first container has ended stays
Running while it has others, as on a cluster. The API side is reached only through
:class:`PodStore`, and every change of a Pod is made under the store's lock.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

JSON = dict[str, Any]

NODE_NAME = "emulator-node"
#: the labels of the one emulated node, which a Pod's ``nodeSelector`` must match
NODE_LABELS = {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux"}
_NO_NODE_MATCHES = "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity."
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")


def now() -> str:
    """The current time as the API writes timestamps."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def container_status(c: JSON, state: JSON, *, ready: bool = False) -> JSON:
    """A ``containerStatuses`` entry for container ``c`` in ``state``."""
    return {
        "name": c["name"],
        "image": c.get("image", ""),
        "imageID": "",
        "ready": ready,
        "restartCount": 0,
        "started": "running" in state,
        "state": state,
    }


class Failure(Protocol):
    """An injected failure as the store keeps it."""

    message: str
    reason: str
    image: str | None


class PodStore(Protocol):
    """What the kubelet needs of the API side."""

    @property
    def lock(self) -> threading.RLock:
        """Guards the store; held for every change of a Pod."""

    @property
    def changed(self) -> threading.Condition:
        """Notified (under :attr:`lock`) on every change of the store."""

    @property
    def python(self) -> str:
        """The interpreter a container command's leading ``python`` stands for."""

    @property
    def cwd(self) -> str | None:
        """The working directory of containers that set no ``workingDir``."""

    @property
    def image_env(self) -> dict[str, str]:
        """What "the image" puts in every container's environment."""

    @property
    def pod_ip(self) -> str:
        """The address reported as every Pod's IP."""

    def live_pod(self, ns: str, name: str, uid: str) -> JSON | None:
        """The stored Pod while it exists with this uid (and the store is open), else None."""

    def touch_pod(self, pod: JSON) -> None:
        """Record a change of ``pod`` (a new resourceVersion, a MODIFIED event)."""

    def finish_deletion(self, ns: str, name: str) -> None:
        """Remove a Pod whose graceful deletion the kubelet has carried out."""

    def secret(self, ns: str, name: str) -> JSON | None:
        """The stored Secret, or None."""

    def take_failure(self, action: str, match: Callable[[Any], bool]) -> Failure | None:
        """An injected failure for ``action`` ("schedule", "image") that applies, if any."""


class _EnvError(Exception):
    """A container's environment cannot be resolved yet (``CreateContainerConfigError``)."""


@dataclass
class _Container:
    """The local process standing for a Pod's container."""

    pod_name: str
    proc: subprocess.Popen[bytes]
    log_path: str
    kill_timer: threading.Timer | None = None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class StandInKubelet:
    """Runs the Pods of ``store`` as local processes; log files go to ``log_dir``."""

    def __init__(self, store: PodStore, log_dir: str) -> None:
        self._store = store
        self._log_dir = log_dir
        self._containers: dict[str, _Container] = {}  # pod uid -> process
        self._threads: list[threading.Thread] = []

    # -- what the API side asks ------------------------------------------------------------
    def start(self, pod: JSON) -> None:
        """Take a newly created Pod in hand (store lock held), in a thread of its own.

        Whether it can be scheduled and its image pulled is decided here, in the order the
        Pods were created, so that an injected failure "for the next N Pods" means those.
        """
        store = self._store
        meta = pod["metadata"]
        selector = pod["spec"].get("nodeSelector") or {}
        unschedulable: str | None = None
        pull: Failure | None = None
        if any(NODE_LABELS.get(k) != v for k, v in selector.items()):
            unschedulable = _NO_NODE_MATCHES
        elif (failure := store.take_failure("schedule", lambda r: True)) is not None:
            unschedulable = failure.message
        else:
            image = str(pod["spec"]["containers"][0].get("image"))
            pull = store.take_failure("image", lambda r: r.image in (None, image))
        t = threading.Thread(
            target=self._run,
            args=(meta["namespace"], meta["name"], meta["uid"], unschedulable, pull),
            name=f"k8s-emulator-kubelet-{meta['name']}",
            daemon=True,
        )
        self._threads.append(t)
        t.start()

    def terminate(self, uid: str, grace: int) -> bool:
        """A deletion of the Pod ``uid`` (store lock held): stop its process.

        Returns True when a process got SIGTERM and ``grace`` seconds before SIGKILL: the
        kubelet then finishes the deletion once the process has exited. False when nothing
        runs (or ``grace`` is 0, and the process was killed): the store removes it now.
        """
        c = self._containers.get(uid)
        if c is None or not c.alive:
            return False
        if grace <= 0:
            c.signal(signal.SIGKILL)
            return False
        if c.kill_timer is None:
            c.signal(signal.SIGTERM)
            c.kill_timer = threading.Timer(grace, c.signal, args=(signal.SIGKILL,))
            c.kill_timer.daemon = True
            c.kill_timer.start()
        return True

    def close(self) -> None:
        """Kill every process and wait for them and for the kubelet's threads."""
        with self._store.lock:
            containers = list(self._containers.values())
        for c in containers:
            if c.kill_timer is not None:
                c.kill_timer.cancel()
            c.signal(signal.SIGKILL)
        for c in containers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=5)
        for t in list(self._threads):
            t.join(timeout=5)

    def processes(self) -> dict[str, int]:
        """``{pod name: pid}`` of the container processes still running."""
        with self._store.lock:
            return {c.pod_name: c.proc.pid for c in self._containers.values() if c.alive}

    def log_path(self, uid: str) -> str | None:
        """The log file of the Pod ``uid``'s container, once it has started."""
        with self._store.lock:
            c = self._containers.get(uid)
            return c.log_path if c is not None else None

    # -- the life of one Pod ---------------------------------------------------------------
    def _run(
        self, ns: str, name: str, uid: str, unschedulable: str | None, pull: Failure | None
    ) -> None:
        store = self._store
        try:
            self._run_pod(ns, name, uid, unschedulable, pull)
        except Exception as exc:  # never let a thread die with a traceback in a test run
            with store.lock:
                pod = store.live_pod(ns, name, uid)
                if pod is not None:
                    pod["status"].update(
                        phase="Failed",
                        reason="EmulatorError",
                        message=f"{type(exc).__name__}: {exc}",
                    )
                    store.touch_pod(pod)

    def _bind(
        self, ns: str, name: str, uid: str, unschedulable: str | None, pull: Failure | None
    ) -> bool:
        """Schedule and "pull": False if the Pod will not start (or is gone)."""
        store = self._store
        with store.lock:
            pod = store.live_pod(ns, name, uid)
            if pod is None:
                return False
            status = pod["status"]
            if unschedulable is not None:
                status["conditions"] = [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": unschedulable,
                        "lastTransitionTime": now(),
                    }
                ]
                store.touch_pod(pod)
                return False
            pod["spec"]["nodeName"] = NODE_NAME
            status["conditions"] = [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}
            ]
            status["hostIP"] = "127.0.0.1"
            container = pod["spec"]["containers"][0]
            if pull is not None:
                image = str(container.get("image"))
                message = pull.message or (
                    f'Failed to pull image "{image}": rpc error: code = NotFound desc = '
                    f"failed to resolve reference {image!r}: not found"
                )
                status["containerStatuses"] = [
                    container_status(
                        container, {"waiting": {"reason": pull.reason, "message": message}}
                    )
                ]
                store.touch_pod(pod)
                return False
            store.touch_pod(pod)
            return True

    def _environment(self, ns: str, name: str, uid: str) -> dict[str, str] | None:
        """The container's environment, waiting for missing Secrets; None if the Pod went."""
        store = self._store
        with store.lock:
            while True:
                pod = store.live_pod(ns, name, uid)
                if pod is None:
                    return None
                if pod["metadata"].get("deletionTimestamp"):
                    store.finish_deletion(ns, name)
                    return None
                container = pod["spec"]["containers"][0]
                try:
                    return self._resolve_env(pod, container)
                except _EnvError as exc:
                    state = {
                        "waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}
                    }
                    if pod["status"].get("containerStatuses", [{}])[0].get("state") != state:
                        pod["status"]["containerStatuses"] = [container_status(container, state)]
                        store.touch_pod(pod)
                    store.changed.wait(0.5)  # releases the lock until the store changes

    def _run_pod(
        self, ns: str, name: str, uid: str, unschedulable: str | None, pull: Failure | None
    ) -> None:
        store = self._store
        if not self._bind(ns, name, uid, unschedulable, pull):
            return
        env = self._environment(ns, name, uid)
        if env is None:
            return
        with store.lock:
            pod = store.live_pod(ns, name, uid)
            if pod is None:
                return
            container = pod["spec"]["containers"][0]
            started = now()
            try:
                proc, log_path = self._spawn(container, env, uid)
            except (OSError, ValueError) as exc:
                pod["status"].update(phase="Failed")
                pod["status"]["containerStatuses"] = [
                    container_status(
                        container,
                        {
                            "terminated": {
                                "exitCode": 128,
                                "reason": "StartError",
                                "message": f"{type(exc).__name__}: {exc}",
                                "startedAt": started,
                                "finishedAt": now(),
                            }
                        },
                    )
                ]
                store.touch_pod(pod)
                return
            self._containers[uid] = _Container(name, proc, log_path)
            pod["status"].update(
                phase="Running",
                podIP=store.pod_ip,
                podIPs=[{"ip": store.pod_ip}],
                startTime=started,
            )
            pod["status"]["conditions"] = [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True"},
            ]
            pod["status"]["containerStatuses"] = [
                container_status(c, {"running": {"startedAt": started}}, ready=True)
                for c in pod["spec"]["containers"]
            ]
            store.touch_pod(pod)

        code = proc.wait()

        with store.lock:
            c = self._containers.get(uid)
            if c is not None and c.kill_timer is not None:
                c.kill_timer.cancel()
            pod = store.live_pod(ns, name, uid)
            if pod is None:
                return
            # killed by a signal: 128 + signal number, as a container runtime reports it
            exit_code = code if code >= 0 else 128 - code
            others = pod["status"]["containerStatuses"][1:]
            if not others:  # (the stand-ins for other containers "run" until deletion)
                pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            pod["status"]["conditions"] = [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "PodCompleted"},
            ]
            pod["status"]["containerStatuses"] = [
                container_status(
                    container,
                    {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Completed" if code == 0 else "Error",
                            "startedAt": started,
                            "finishedAt": now(),
                        }
                    },
                ),
                *others,
            ]
            store.touch_pod(pod)
            if pod["metadata"].get("deletionTimestamp"):
                store.finish_deletion(ns, name)

    def _spawn(
        self, container: JSON, env: dict[str, str], uid: str
    ) -> tuple[subprocess.Popen[bytes], str]:
        argv = [*container.get("command", []), *container.get("args", [])]
        if not argv:
            raise ValueError(
                "the emulator cannot run an image's default entrypoint: give the container a "
                "command"
            )
        if _PYTHON.match(os.path.basename(argv[0])):
            argv[0] = self._store.python
        cwd = container.get("workingDir")
        if not (cwd and os.path.isdir(cwd)):
            cwd = self._store.cwd
        log_path = os.path.join(self._log_dir, f"{uid}.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, log_path

    # -- the environment -------------------------------------------------------------------
    def _secret_data(self, ns: str, secret_name: str, optional: bool) -> dict[str, str] | None:
        secret = self._store.secret(ns, secret_name)
        if secret is None:
            if optional:
                return None
            raise _EnvError(f'secret "{secret_name}" not found')
        return {
            k: base64.b64decode(v).decode("utf-8", errors="replace")
            for k, v in (secret.get("data") or {}).items()
        }

    def _resolve_env(self, pod: JSON, container: JSON) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {"PATH": os.environ.get("PATH", os.defpath)}
        env.update(self._store.image_env)
        env["HOSTNAME"] = pod["metadata"]["name"]

        for source in container.get("envFrom") or []:
            if "secretRef" not in source:
                raise _EnvError("the emulator serves no ConfigMaps (envFrom.configMapRef)")
            ref = source["secretRef"]
            data = self._secret_data(ns, ref["name"], bool(ref.get("optional")))
            for key, value in (data or {}).items():
                env[source.get("prefix", "") + key] = value
        for entry in container.get("env") or []:
            var = entry["name"]
            if "value" in entry:
                env[var] = entry["value"]
                continue
            source = entry.get("valueFrom") or {}
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                optional = bool(ref.get("optional"))
                data = self._secret_data(ns, ref["name"], optional)
                if data is None:
                    continue
                if ref["key"] not in data:
                    if optional:
                        continue
                    raise _EnvError(f"couldn't find key {ref['key']} in Secret {ns}/{ref['name']}")
                env[var] = data[ref["key"]]
            elif "fieldRef" in source:
                env[var] = self._field_ref(pod, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[var] = "0"
            elif "configMapKeyRef" in source:
                raise _EnvError("the emulator serves no ConfigMaps (configMapKeyRef)")
            else:
                env[var] = ""
        return env

    def _field_ref(self, pod: JSON, path: str) -> str:
        meta = pod["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        ip = self._store.pod_ip
        values: dict[str, str] = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": NODE_NAME,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            "status.podIP": ip,
            "status.podIPs": ip,
            "status.hostIP": "127.0.0.1",
        }
        if path not in values:
            raise _EnvError(f"unsupported fieldRef {path!r}")
        return values[path]
