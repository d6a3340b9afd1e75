"""KubernetesBackend, on the emulator and on a real Kubernetes control plane.

In order: the runner Pod and Secret manifests (pure, no server); options, addresses and
outcome rules; what the API server accepts and rejects (one table of requests, each with
the answer of a real v1.20 API server); the emulator's own features; the backend driven
directly (``boot``/``wait``/``stop``) with failures at each step (a crashing runner, a Pod
that cannot start, a refused request, lost and late answers, a deleted parent, leftovers
to sweep); and last, whole pools, whose calls are computed in runner processes started as
Pods.

Tests that take a ``plane`` run on the emulator by default, and on the real control plane
(``tests/platforms/kubernetes.py``) with ``FLAME_TEST_BACKENDS=kubernetes-real``, which is
what ``.ci/tier-kubernetes`` runs: the same assertions hold on both.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

import flame
from flame._errors import BootError
from flame.backends import kubernetes as k8s_backend
from flame.backends._base import RunnerLaunch
from flame.backends.kubernetes import (
    ANNOTATION_PARENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_PARENT_UID,
    LABEL_POOL,
    LABEL_RUNNER,
    KubernetesBackend,
    PodHandle,
    pod_outcome,
    runner_names,
)
from flame.testing.kubernetes import KubernetesAPIEmulator
from platforms.kubernetes import (
    FLAME,
    IMAGE_ENV,
    POD_NAME_ENV,
    Plane,
    open_plane,
    selected_planes,
)

T = TypeVar("T")
pytestmark = pytest.mark.timeout(45)

TOKEN = "k8s-test-token-9d2e7f41"
SECRET = "c2VjcmV0LXJ1bm5lci1ibG9i"  # stands for FLAME_PARENT
PARENT = "web-0"
SLEEP = ("python", "-c", "import time; time.sleep(60)")
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "backends" / "kubernetes.md"
#: a pod_template that no node can satisfy, on either plane
NO_NODE = {"flame-tests/no-such-node": "true"}


def run(coro: Awaitable[T], timeout: float = 40.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def launch(argv: tuple[str, ...] = SLEEP, runner_id: str = "thumbs-0-a1b2c3") -> RunnerLaunch:
    return RunnerLaunch(runner_id=runner_id, pool="thumbs", env={"FLAME_PARENT": SECRET}, argv=argv)


RUNNER = RunnerLaunch(runner_id="thumbs-0-a1b2c3", pool="thumbs", env={"FLAME_PARENT": SECRET})


@pytest.fixture(params=selected_planes())
def plane(request: pytest.FixtureRequest, session_stack: contextlib.ExitStack) -> Iterator[Plane]:
    """A fresh namespace with a Running parent Pod, on the emulator or the real plane."""
    with open_plane(str(request.param), session_stack) as p:
        yield p


@pytest.fixture
def k8s(monkeypatch: pytest.MonkeyPatch) -> Iterator[KubernetesAPIEmulator]:
    """The emulator alone, for what only it does (its own features, failure injection)."""
    with KubernetesAPIEmulator(token=TOKEN, env=IMAGE_ENV) as emu:
        emu.add_parent_pod(
            PARENT,
            env=[POD_NAME_ENV, {"name": "DATABASE_URL", "value": "pg://db"}],
        )
        for name, value in emu.downward_env(PARENT).items():
            monkeypatch.setenv(name, value)
        yield emu


def make_backend(emulator: KubernetesAPIEmulator, **options: Any) -> KubernetesBackend:
    options.setdefault("listen_host", "127.0.0.1")
    return KubernetesBackend(kubeconfig=emulator.kubeconfig, **options)


@asynccontextmanager
async def opened(backend: KubernetesBackend) -> AsyncIterator[KubernetesBackend]:
    try:
        yield backend
    finally:
        await backend.aclose()


def runner_objects(emulator: KubernetesAPIEmulator) -> list[str]:
    """Names of every runner Pod and Secret still in the emulator."""
    return [o["metadata"]["name"] for o in emulator.pods(labels=FLAME)] + [
        o["metadata"]["name"] for o in emulator.secrets(labels=FLAME)
    ]


def nothing_left(emulator: KubernetesAPIEmulator, timeout: float = 10.0) -> None:
    emulator.wait_until(
        lambda: not runner_objects(emulator) and not emulator.processes(), timeout=timeout
    )


def docs_role() -> dict[str, set[str]]:
    """The verbs per resource granted by the Role in docs/backends/kubernetes.md."""
    for _indent, block in re.findall(r"^( *)```yaml\n(.*?)^\1```", DOCS.read_text(), re.S | re.M):
        for doc in yaml.safe_load_all(textwrap.dedent(block)):
            if isinstance(doc, dict) and doc.get("kind") == "Role":
                role: dict[str, set[str]] = {}
                for rule in doc["rules"]:
                    for resource in rule["resources"]:
                        role.setdefault(resource, set()).update(rule["verbs"])
                return role
    raise AssertionError("no Role in the docs")


def phase(plane: Plane, name: str) -> str | None:
    return ((plane.get_pod(name) or {}).get("status") or {}).get("phase")


# -- manifests (no server) -------------------------------------------------------------------


def parent_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-7d9c8f6b5-x2k4q",
            "namespace": "shop",
            "uid": "0b5c1d8e-uid",
            "labels": {"app": "web", "pod-template-hash": "7d9c8f6b5"},
        },
        "spec": {
            "serviceAccountName": "web",
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"kubernetes.io/arch": "arm64"},
            "nodeName": "node-1",
            "initContainers": [
                {"name": "migrate", "image": "registry.example/web:1.2"},
                {"name": "mesh", "image": "mesh/proxy:2", "restartPolicy": "Always"},
            ],
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/web:1.2",
                    "command": ["gunicorn", "web:app"],
                    "ports": [{"containerPort": 8000}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8000}},
                    "env": [
                        POD_NAME_ENV,
                        {"name": "DB", "value": "pg://db"},
                        {"name": "FLAME_PARENT", "value": "stale"},
                    ],
                    "envFrom": [{"configMapRef": {"name": "web-config"}}],
                    "workingDir": "/srv",
                    "resources": {"requests": {"cpu": "500m"}},
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/web"},
                        {"name": "data", "mountPath": "/data"},
                        {"name": "kube-api-access-abcde", "mountPath": SA_MOUNT},
                    ],
                },
                {
                    "name": "envoy",
                    "image": "envoyproxy/envoy:v1.30",
                    "volumeMounts": [{"name": "envoy-config", "mountPath": "/etc/envoy"}],
                },
            ],
            "volumes": [
                {"name": "config", "configMap": {"name": "web-config"}},
                {"name": "envoy-config", "configMap": {"name": "envoy"}},
                {"name": "unused", "secret": {"secretName": "other"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "kube-api-access-abcde", "projected": {"sources": []}},
            ],
        },
        "status": {"phase": "Running", "podIP": "10.1.2.3"},
    }


NAME = re.compile(r"^web-7d9c8f6b5-x2k4q-flame-[a-z0-9]{8}$")


def test_runner_pod_is_a_trimmed_clone_owned_by_the_parent() -> None:
    pod = KubernetesBackend().runner_pod_manifest(parent_pod(), RUNNER, secret_name="s-1")
    meta, spec = pod["metadata"], pod["spec"]
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    # a name the backend picked (no generateName): what a lost answer is resolved by
    assert NAME.match(meta["name"]) and "generateName" not in meta
    assert meta["namespace"] == "shop"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "web-7d9c8f6b5-x2k4q",
            "uid": "0b5c1d8e-uid",
            "controller": True,
        }
    ]
    # flame's labels, and none of the parent's (its Service/ReplicaSet must not select runners)
    assert meta["labels"][LABEL_MANAGED_BY] == "flame"
    assert meta["labels"][LABEL_POOL] == "thumbs"
    assert meta["labels"][LABEL_RUNNER] == "thumbs-0-a1b2c3"
    assert "app" not in meta["labels"]
    # who booted it, even after its owner reference is gone (what the sweep goes by)
    assert meta["labels"][LABEL_PARENT_UID] == "0b5c1d8e-uid"
    assert re.fullmatch(r"[0-9a-f]{12}", meta["labels"][LABEL_INSTANCE])
    assert meta["annotations"][ANNOTATION_PARENT] == "web-7d9c8f6b5-x2k4q"
    assert spec["restartPolicy"] == "Never"
    # pod-level fields that make it "the same app": identity, pulls, placement
    assert spec["serviceAccountName"] == "web"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    for dropped in ("nodeName", "initContainers"):
        assert dropped not in spec
    # one container: the app's, running the runner command (no sidecar: see below)
    [c] = spec["containers"]
    assert c["name"] == "app"
    assert c["image"] == "registry.example/web:1.2"
    assert c["command"] == ["python", "-m", "flame", "runner"]
    assert "args" not in c
    assert c["envFrom"] == [{"configMapRef": {"name": "web-config"}}]
    assert c["workingDir"] == "/srv"
    assert c["resources"] == {"requests": {"cpu": "500m"}}
    for dropped in ("ports", "readinessProbe"):
        assert dropped not in c
    # config-like volumes it mounts; not claims, not the service account token, not unused
    assert c["volumeMounts"] == [{"name": "config", "mountPath": "/etc/web"}]
    assert spec["volumes"] == [{"name": "config", "configMap": {"name": "web-config"}}]


def test_the_runner_secret_is_referenced_never_written_into_the_pod() -> None:
    backend = KubernetesBackend()
    secret = backend.runner_secret_manifest(parent_pod(), RUNNER)
    assert secret["kind"] == "Secret"
    assert secret["immutable"] is True
    assert secret["metadata"]["namespace"] == "shop"
    assert re.fullmatch(r"web-7d9c8f6b5-x2k4q-flame-secret-[a-z0-9]{8}", secret["metadata"]["name"])
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "0b5c1d8e-uid"
    assert secret["metadata"]["labels"][LABEL_RUNNER] == "thumbs-0-a1b2c3"
    assert base64.b64decode(secret["data"]["FLAME_PARENT"]).decode() == SECRET

    pod = backend.runner_pod_manifest(parent_pod(), RUNNER, secret_name="s-1")
    assert SECRET not in json.dumps(pod)
    env = pod["spec"]["containers"][0]["env"]
    assert env == [
        POD_NAME_ENV,  # downward API entries are inherited: they name the runner's own Pod
        {"name": "DB", "value": "pg://db"},
        {
            "name": "FLAME_PARENT",
            "valueFrom": {"secretKeyRef": {"name": "s-1", "key": "FLAME_PARENT"}},
        },
    ]


def test_runner_names_are_fresh_valid_host_names_and_pair_pod_with_secret() -> None:
    names = {runner_names("web-0") for _ in range(200)}
    assert len(names) == 200
    for pod, secret in names:
        assert re.fullmatch(r"web-0-flame-([a-z0-9]{8})", pod)
        assert secret == pod.replace("-flame-", "-flame-secret-")
    pod, _ = runner_names("A" * 80)
    assert len(pod) <= 63 and pod.startswith("a" * 48 + "-flame-")


def test_options_override_image_command_resources_and_env() -> None:
    backend = KubernetesBackend(
        image="registry.example/web-gpu:1.2",
        command=["/app/.venv/bin/python", "-m", "flame", "runner"],
        resources={"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"nvidia.com/gpu": 1}},
        env={"DB": "pg://replica", "PHX_SERVER": "false"},
        labels={"team": "media"},
    )
    pod = backend.runner_pod_manifest(parent_pod(), RUNNER, secret_name="s-1")
    [c] = pod["spec"]["containers"]
    assert c["image"] == "registry.example/web-gpu:1.2"
    assert c["command"] == ["/app/.venv/bin/python", "-m", "flame", "runner"]
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"nvidia.com/gpu": "1"},
    }
    names = [e["name"] for e in c["env"]]
    assert names == ["POD_NAME", "DB", "PHX_SERVER", "FLAME_PARENT"]
    assert {"name": "DB", "value": "pg://replica"} in c["env"]
    assert pod["metadata"]["labels"]["team"] == "media"


def test_container_option_picks_the_app_container() -> None:
    pod = KubernetesBackend(container="envoy").runner_pod_manifest(
        parent_pod(), RUNNER, secret_name="s-1"
    )
    assert pod["spec"]["containers"][0]["image"] == "envoyproxy/envoy:v1.30"
    with pytest.raises(BootError, match=r"container='nope' is not in the parent Pod.*'app'"):
        KubernetesBackend(container="nope").runner_pod_manifest(
            parent_pod(), RUNNER, secret_name="s-1"
        )


def test_sidecars_are_left_out_unless_kept() -> None:
    # a service mesh proxy or log shipper in a runner Pod would keep it running after the
    # runner ends: by default only the app container is cloned
    default = KubernetesBackend().runner_pod_manifest(parent_pod(), RUNNER, secret_name="s")
    assert [c["name"] for c in default["spec"]["containers"]] == ["app"]
    kept = KubernetesBackend(keep_containers=["envoy", "mesh"]).runner_pod_manifest(
        parent_pod(), RUNNER, secret_name="s"
    )
    spec = kept["spec"]
    assert [c["name"] for c in spec["containers"]] == ["app", "envoy"]
    assert spec["containers"][1] == parent_pod()["spec"]["containers"][1]  # as it is
    assert spec["initContainers"] == [
        {"name": "mesh", "image": "mesh/proxy:2", "restartPolicy": "Always"}
    ]  # a sidecar declared the 1.28 way; "migrate" is not copied
    assert {"name": "envoy-config", "configMap": {"name": "envoy"}} in spec["volumes"]
    # the runner's secret goes to the app container only
    assert "env" not in spec["containers"][1]
    with pytest.raises(BootError, match=r"keep_containers: 'istio-proxy' is not a container.*"):
        KubernetesBackend(keep_containers=["istio-proxy"]).runner_pod_manifest(
            parent_pod(), RUNNER, secret_name="s"
        )


def test_what_real_parents_set_for_scheduling_and_security_passes_to_runners() -> None:
    parent = parent_pod()
    spec = parent["spec"]
    spec["securityContext"] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    spec["tolerations"] = [{"key": "dedicated", "operator": "Equal", "value": "web"}]
    spec["priorityClassName"] = "web-high"
    spec["containers"][0]["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    pod = KubernetesBackend().runner_pod_manifest(parent, RUNNER, secret_name="s")
    out = pod["spec"]
    for field in ("securityContext", "tolerations", "priorityClassName", "imagePullSecrets"):
        assert out[field] == spec[field], field
    assert out["nodeSelector"] == spec["nodeSelector"]
    assert out["containers"][0]["securityContext"] == spec["containers"][0]["securityContext"]


def test_pod_template_edits_in_place_or_returns_a_new_manifest() -> None:
    def gpu(pod: dict[str, Any]) -> None:
        pod["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists"}]
        pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}

    pod = KubernetesBackend(pod_template=gpu).runner_pod_manifest(
        parent_pod(), RUNNER, secret_name="s-1"
    )
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}

    seen: list[dict[str, Any]] = []

    def careless(pod: dict[str, Any]) -> dict[str, Any]:
        seen.append(pod)
        # a template that forgets everything the backend relies on
        return {
            "metadata": {"namespace": "elsewhere", "labels": {"x": "y"}, "generateName": "z-"},
            "spec": {
                "restartPolicy": "Always",
                "containers": [{"name": "app", "image": "other:1", "command": ["run"]}],
            },
        }

    pod = KubernetesBackend(pod_template=careless).runner_pod_manifest(
        parent_pod(), RUNNER, secret_name="s-1", name="web-flame-abcdefgh"
    )
    assert seen[0]["spec"]["containers"][0]["name"] == "app"  # it saw the full manifest
    assert seen[0]["metadata"]["name"] == "web-flame-abcdefgh"
    assert pod["metadata"]["namespace"] == "shop"
    assert pod["metadata"]["name"] == "web-flame-abcdefgh"  # the name cleanup relies on
    assert "generateName" not in pod["metadata"]
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "0b5c1d8e-uid"
    assert pod["metadata"]["labels"][LABEL_MANAGED_BY] == "flame"
    assert pod["metadata"]["labels"]["x"] == "y"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["containers"][0]["command"] == ["run"]  # the template may change this
    assert pod["spec"]["containers"][0]["env"][-1]["valueFrom"]["secretKeyRef"]["name"] == "s-1"

    with pytest.raises(BootError, match="not a manifest"):
        KubernetesBackend(pod_template=lambda pod: ["nope"]).runner_pod_manifest(  # type: ignore[arg-type,return-value]
            parent_pod(), RUNNER, secret_name="s-1"
        )


def test_names_and_labels_are_made_valid_for_kubernetes() -> None:
    parent = parent_pod()
    parent["metadata"]["name"] = "A" * 80
    odd = RunnerLaunch(runner_id="-" + "r" * 70, pool="My Pool!/ünï", env={"FLAME_PARENT": "x"})
    pod = KubernetesBackend().runner_pod_manifest(parent, odd, secret_name="s")
    assert re.fullmatch("a" * 48 + r"-flame-[a-z0-9]{8}", pod["metadata"]["name"])  # <= 63
    labels = pod["metadata"]["labels"]
    assert labels[LABEL_POOL] == "My-Pool---n"
    assert labels[LABEL_RUNNER] == "r" * 63
    assert pod["metadata"]["annotations"][LABEL_POOL] == "My Pool!/ünï"  # the exact name
    assert pod["metadata"]["annotations"][ANNOTATION_PARENT] == "A" * 80


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"namespace": ""}, "namespace"),
        ({"context": "prod"}, "context"),
        ({"command": "python -m flame runner"}, "command"),
        ({"command": []}, "command"),
        ({"resources": {"cpu": "1"}}, "resources"),
        ({"resources": {"limits": "1"}}, "resources"),
        ({"env": {"A": 1}}, "env"),
        ({"env": {"A=B": "1"}}, "env"),
        ({"labels": {"bad key!": "x"}}, "labels"),
        ({"pod_template": "spec"}, "pod_template"),
        ({"stop_grace_period": -1}, "stop_grace_period"),
        ({"stop_grace_period": 1.5}, "stop_grace_period"),
        ({"keep_containers": "envoy"}, "keep_containers"),
        ({"keep_containers": [""]}, "keep_containers"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"request_timeout": "10"}, "request_timeout"),
    ],
)
def test_invalid_options_fail_at_construction(options: dict[str, Any], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        KubernetesBackend(**options)


def test_without_lightkube_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightkube", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'flame-py[kubernetes]'")):
        KubernetesBackend()


def test_addresses_come_from_the_downward_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    monkeypatch.delenv("POD_IPS", raising=False)
    backend = KubernetesBackend()
    assert backend.name == "kubernetes"
    assert (backend.listen_host(), list(backend.advertise_hosts())) == ("0.0.0.0", ["10.1.2.3"])
    monkeypatch.setenv("POD_IPS", "fd00::7,10.1.2.3")
    assert (backend.listen_host(), list(backend.advertise_hosts())) == (
        "::",
        ["fd00::7", "10.1.2.3"],
    )
    pinned = KubernetesBackend(advertise_host="parent.shop.svc", listen_host="10.1.2.3")
    assert (pinned.listen_host(), list(pinned.advertise_hosts())) == (
        "10.1.2.3",
        ["parent.shop.svc"],
    )
    assert KubernetesBackend().runner_app() is None
    assert KubernetesBackend(app="web.jobs").runner_app() == {"module": "web.jobs"}
    assert KubernetesBackend(app="/srv/jobs.py").runner_app() == {"path": "/srv/jobs.py"}


def _pod(phase: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "ns"}, "status": {"phase": phase, **status}}


def _waiting(reason: str, name: str = "app") -> dict[str, Any]:
    return {"name": name, "state": {"waiting": {"reason": reason, "message": "m"}}}


def _terminated(code: int, reason: str = "Error", name: str = "app") -> dict[str, Any]:
    return {"name": name, "state": {"terminated": {"exitCode": code, "reason": reason}}}


RUNNING_SIDECAR = {"name": "envoy", "state": {"running": {"startedAt": "t"}}}
UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/3 nodes are available",
}


@pytest.mark.parametrize(
    ("pod", "outcome"),
    [
        (_pod("Pending"), None),
        (_pod("Pending", containerStatuses=[_waiting("ContainerCreating")]), None),
        (_pod("Running"), None),
        (
            _pod("Pending", containerStatuses=[_waiting("ErrImagePull")]),
            "could not start its container app: ErrImagePull: m",
        ),
        (
            _pod("Pending", containerStatuses=[_waiting("CreateContainerConfigError")]),
            "could not start its container app: CreateContainerConfigError: m",
        ),
        (
            _pod("Pending", conditions=[UNSCHEDULABLE]),
            "could not be scheduled (Unschedulable): 0/3 nodes are available",
        ),
        (
            _pod("Failed", containerStatuses=[_terminated(137, "OOMKilled")]),
            "exited with code 137 (OOMKilled)",
        ),
        (
            _pod("Failed", containerStatuses=[_terminated(137)]),
            "exited with code 137 (killed by SIGKILL)",
        ),
        (
            _pod("Failed", containerStatuses=[_terminated(209)]),
            "exited with code 209 (importing the application raised)",
        ),
        (
            _pod("Failed", reason="Evicted", message="The node was low on memory."),
            "failed: Evicted: The node was low on memory.",
        ),
        # a runner that ended while a sidecar keeps its Pod Running is over
        (
            _pod("Running", containerStatuses=[_terminated(203), RUNNING_SIDECAR]),
            "exited with code 203 (idle shutdown)",
        ),
        # a sidecar that cannot start does not end a runner that runs
        (
            _pod(
                "Pending",
                containerStatuses=[
                    {"name": "app", "state": {"running": {}}},
                    _waiting("ImagePullBackOff", "envoy"),
                ],
            ),
            None,
        ),
    ],
)
def test_pod_outcome(pod: dict[str, Any], outcome: str | None) -> None:
    assert pod_outcome(pod, container="app") == outcome


def test_wait_for_capacity_keeps_waiting_on_unschedulable() -> None:
    pod = _pod("Pending", conditions=[UNSCHEDULABLE])
    assert pod_outcome(pod, wait_for_capacity=True) is None


# -- what the API server accepts and rejects -------------------------------------------------
# Each request below was sent to a real v1.20.2 API server; the expected answers are its
# answers. On the emulator they prove it is as strict as the real server (and answers with
# the same status codes); in the real tier they keep the table honest.

PODS = "/api/v1/namespaces/NS/pods"
SECRETS = "/api/v1/namespaces/NS/secrets"
REASONS = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "AlreadyExists",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "",
}


def a_pod(
    env: list[Any] | None = None,
    *,
    meta: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    **container: Any,
) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "c", "image": "i", "command": ["true"]}
    if env is not None:
        c["env"] = env
    c.update(container)
    pod_spec: dict[str, Any] = {"containers": [c], "restartPolicy": "Never", **(spec or {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p1", **(meta or {})},
        "spec": pod_spec,
    }


def an_env(**source: Any) -> list[Any]:
    return [{"name": "A", "valueFrom": source}]


def owner(uid: str, *, controller: bool = True, without: str = "") -> dict[str, Any]:
    ref = {"apiVersion": "v1", "kind": "Pod", "name": "x", "uid": uid, "controller": controller}
    return {k: v for k, v in ref.items() if k != without}


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: Any
    code: int
    says: str = ""  # a part of the error message both servers give
    content_type: str = "application/json"
    check: Callable[[dict[str, Any]], bool] | None = None


GENERATED = {"generateName": "a" * 70}
CASES = [
    *(
        Case(
            f"env name {n!r}",
            "POST",
            PODS,
            a_pod([{"name": n, "value": "1"}]),
            422,
            "a valid environment variable name must consist of",
        )
        for n in ("A=B", "1ABC", "MY VAR")
    ),
    Case(
        "env name ''",
        "POST",
        PODS,
        a_pod([{"name": "", "value": "1"}]),
        422,
        "env[0].name: Required value",
    ),
    Case("env name a.b-c_D", "POST", PODS, a_pod([{"name": "a.b-c_D", "value": "1"}]), 201),
    Case(
        "value and valueFrom",
        "POST",
        PODS,
        a_pod(
            [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
        ),
        422,
        "may not be specified when `value` is not empty",
    ),
    Case(
        "empty value and valueFrom",
        "POST",
        PODS,
        a_pod(
            [{"name": "A", "value": "", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
        ),
        201,
    ),
    Case("valueFrom of nothing", "POST", PODS, a_pod(an_env()), 422, "must specify one of"),
    Case(
        "valueFrom of two",
        "POST",
        PODS,
        a_pod(
            an_env(fieldRef={"fieldPath": "metadata.name"}, secretKeyRef={"name": "s", "key": "k"})
        ),
        422,
        "may not have more than one field specified",
    ),
    Case(
        "secretKeyRef key a/b",
        "POST",
        PODS,
        a_pod(an_env(secretKeyRef={"name": "s", "key": "a/b"})),
        422,
        "a valid config key must consist of alphanumeric characters",
    ),
    Case(
        "secretKeyRef without key",
        "POST",
        PODS,
        a_pod(an_env(secretKeyRef={"name": "s", "key": ""})),
        422,
        "secretKeyRef.key: Required value",
    ),
    Case(
        "secretKeyRef without name",
        "POST",
        PODS,
        a_pod(an_env(secretKeyRef={"key": "k"})),
        422,
        "secretKeyRef.name: Invalid value",
    ),
    Case(
        "fieldRef spec.containers",
        "POST",
        PODS,
        a_pod(an_env(fieldRef={"fieldPath": "spec.containers"})),
        422,
        "field label not supported: spec.containers",
    ),
    Case(
        "fieldRef status.hostIPs",
        "POST",
        PODS,
        a_pod(an_env(fieldRef={"fieldPath": "status.hostIPs"})),
        422,
        "field label not supported: status.hostIPs",
    ),
    Case(
        "fieldRef metadata.labels",
        "POST",
        PODS,
        a_pod(an_env(fieldRef={"fieldPath": "metadata.labels"})),
        422,
        'Unsupported value: "metadata.labels"',
    ),
    Case(
        "fieldRef apiVersion v2",
        "POST",
        PODS,
        a_pod(an_env(fieldRef={"apiVersion": "v2", "fieldPath": "metadata.name"})),
        422,
        "unsupported pod version: v2",
    ),
    Case(
        "fieldRef of a label",
        "POST",
        PODS,
        a_pod(an_env(fieldRef={"fieldPath": "metadata.labels['a']"})),
        201,
    ),
    Case(
        "fieldRef status.podIPs",
        "POST",
        PODS,
        a_pod(an_env(fieldRef={"fieldPath": "status.podIPs"})),
        201,
    ),
    Case(
        "two controllers",
        "POST",
        PODS,
        a_pod(meta={"ownerReferences": [owner("u1"), owner("u2")]}),
        422,
        "Only one reference can have Controller set to true",
    ),
    Case(
        "two owners, one uid",
        "POST",
        PODS,
        a_pod(
            meta={"ownerReferences": [owner("u1", controller=False), owner("u1", controller=False)]}
        ),
        201,
    ),
    *(
        Case(
            f"owner without {f}",
            "POST",
            PODS,
            a_pod(meta={"ownerReferences": [owner("u", without=f)]}),
            422,
            f"{what} must not be empty",
        )
        for f, what in (
            ("uid", "uid"),
            ("apiVersion", "version"),
            ("kind", "kind"),
            ("name", "name"),
        )
    ),
    Case(
        "generateName of 70",
        "POST",
        PODS,
        {**a_pod(), "metadata": GENERATED},
        201,
        check=lambda d: re.fullmatch("a" * 58 + "[a-z0-9]{5}", d["metadata"]["name"]) is not None,
    ),
    Case(
        "generateName of 300",
        "POST",
        PODS,
        {**a_pod(), "metadata": {"generateName": "a" * 300}},
        422,
        "must be no more than 253 characters",
    ),
    Case(
        "generateName Abc-",
        "POST",
        PODS,
        {**a_pod(), "metadata": {"generateName": "Abc-"}},
        422,
        "metadata.generateName: Invalid value",
    ),
    Case(
        "no name",
        "POST",
        PODS,
        {**a_pod(), "metadata": {}},
        422,
        "name or generateName is required",
    ),
    Case(
        "name Not_A_Name",
        "POST",
        PODS,
        a_pod(meta={"name": "Not_A_Name"}),
        422,
        "a lowercase RFC 1123 subdomain",
    ),
    Case(
        "name of 254",
        "POST",
        PODS,
        a_pod(meta={"name": "a" * 254}),
        422,
        "must be no more than 253 characters",
    ),
    Case(
        "label value of 64",
        "POST",
        PODS,
        a_pod(meta={"labels": {"a": "b" * 64}}),
        422,
        "must be no more than 63 characters",
    ),
    Case(
        "label key 'bad key'",
        "POST",
        PODS,
        a_pod(meta={"labels": {"bad key": "b"}}),
        422,
        "name part must consist of alphanumeric characters",
    ),
    Case(
        "label prefix Bad_Prefix/",
        "POST",
        PODS,
        a_pod(meta={"labels": {"Bad_Prefix/k": "b"}}),
        422,
        "prefix part a lowercase RFC 1123 subdomain",
    ),
    Case(
        "label value 1",
        "POST",
        PODS,
        a_pod(meta={"labels": {"a": 1}}),
        400,
        'Pod in version "v1" cannot be handled as a Pod',
    ),
    Case(
        "annotation value 1",
        "POST",
        PODS,
        a_pod(meta={"annotations": {"a": 1}}),
        400,
        'Pod in version "v1" cannot be handled as a Pod',
    ),
    Case(
        "restartPolicy Sometimes",
        "POST",
        PODS,
        a_pod(spec={"restartPolicy": "Sometimes"}),
        422,
        'Unsupported value: "Sometimes"',
    ),
    Case(
        "no containers",
        "POST",
        PODS,
        a_pod(spec={"containers": []}),
        422,
        "spec.containers: Required value",
    ),
    Case("no image", "POST", PODS, a_pod(image=""), 422, "image: Required value"),
    Case(
        "container Bad_Name",
        "POST",
        PODS,
        a_pod(name="Bad_Name"),
        422,
        "a lowercase RFC 1123 label must consist of",
    ),
    Case(
        "two containers c",
        "POST",
        PODS,
        a_pod(spec={"containers": [{"name": "c", "image": "i"}, {"name": "c", "image": "i"}]}),
        422,
        'Duplicate value: "c"',
    ),
    Case(
        "mount of no volume",
        "POST",
        PODS,
        a_pod(volumeMounts=[{"name": "v", "mountPath": "/v"}]),
        422,
        'volumeMounts[0].name: Not found: "v"',
    ),
    Case(
        "quantity abc",
        "POST",
        PODS,
        a_pod(resources={"limits": {"cpu": "abc"}}),
        400,
        "quantities must match the regular expression",
    ),
    Case("quantity 1", "POST", PODS, a_pod(resources={"limits": {"cpu": 1}}), 201),
    Case(
        "command 'true'",
        "POST",
        PODS,
        a_pod(command="true"),
        400,
        'Pod in version "v1" cannot be handled as a Pod',
    ),
    Case(
        "command ['a', 1]",
        "POST",
        PODS,
        a_pod(command=["a", 1]),
        400,
        'Pod in version "v1" cannot be handled as a Pod',
    ),
    Case("an unknown field", "POST", PODS, {**a_pod(), "bogus": 1}, 201),
    Case(
        "kind Secret",
        "POST",
        PODS,
        {**a_pod(), "kind": "Secret"},
        400,
        "cannot be handled as a Pod",
    ),
    Case(
        "another namespace",
        "POST",
        PODS,
        a_pod(meta={"namespace": "other"}),
        400,
        "does not match the namespace",
    ),
    Case("not JSON", "POST", PODS, "{nope", 400, "json parse error"),
    Case(
        "no such namespace",
        "POST",
        "/api/v1/namespaces/no-such-ns/secrets",
        {"metadata": {"name": "s1"}},
        404,
        'namespaces "no-such-ns" not found',
    ),
    Case("get nothing", "GET", PODS + "/nope", None, 404, 'pods "nope" not found'),
    Case("delete nothing", "DELETE", PODS + "/nope", None, 404, 'pods "nope" not found'),
    Case(
        "patch nothing",
        "PATCH",
        PODS + "/nope",
        {"metadata": {}},
        404,
        'pods "nope" not found',
        "application/merge-patch+json",
    ),
    Case("patch as JSON", "PATCH", PODS + "/nope", {"metadata": {}}, 415, "Unsupported Media Type"),
    Case("PUT a collection", "PUT", PODS, a_pod(), 405, "does not allow this method"),
    Case(
        "fieldSelector nope",
        "GET",
        PODS + "?fieldSelector=nope",
        None,
        400,
        "invalid selector: 'nope'",
    ),
    Case(
        "fieldSelector spec.image",
        "GET",
        PODS + "?fieldSelector=spec.image%3Dx",
        None,
        400,
        "field label not supported: spec.image",
    ),
    Case(
        "labelSelector 'a b c'",
        "GET",
        PODS + "?labelSelector=a%20b%20c",
        None,
        400,
        "unable to parse requirement",
    ),
    Case(
        "list at resourceVersion abc",
        "GET",
        PODS + "?resourceVersion=abc",
        None,
        500,
        'resourceVersion: Invalid value: "abc"',
    ),
    Case(
        "watch at resourceVersion abc",
        "GET",
        PODS + "?watch=1&resourceVersion=abc",
        None,
        500,
        'resourceVersion: Invalid value: "abc"',
    ),
    Case(
        "delete with propagation Sometimes",
        "DELETE",
        SECRETS + "/x?propagationPolicy=Sometimes",
        None,
        422,
        'propagationPolicy: Unsupported value: "Sometimes"',
    ),
    Case(
        "Secret data not base64",
        "POST",
        SECRETS,
        {"metadata": {"name": "s1"}, "data": {"k": "not base64!"}},
        400,
        "illegal base64 data",
    ),
    Case(
        "Secret data 1",
        "POST",
        SECRETS,
        {"metadata": {"name": "s1"}, "data": {"k": 1}},
        400,
        'Secret in version "v1" cannot be handled as a Secret',
    ),
    Case(
        "Secret key a/b",
        "POST",
        SECRETS,
        {"metadata": {"name": "s1"}, "data": {"a/b": "eA=="}},
        422,
        "a valid config key must consist of",
    ),
    Case(
        "Secret stringData key a/b",
        "POST",
        SECRETS,
        {"metadata": {"name": "s1"}, "stringData": {"a/b": "x"}},
        422,
        "data[a/b]: Invalid value",
    ),
    Case(
        "Secret key of 254",
        "POST",
        SECRETS,
        {"metadata": {"name": "s1"}, "data": {"k" * 254: "eA=="}},
        422,
        "must be no more than 253 characters",
    ),
    Case(
        "Secret name S_1",
        "POST",
        SECRETS,
        {"metadata": {"name": "S_1"}, "data": {}},
        422,
        "a lowercase RFC 1123 subdomain",
    ),
    Case(
        "Secret with two controllers",
        "POST",
        SECRETS,
        {"metadata": {"name": "s1", "ownerReferences": [owner("u1"), owner("u2")]}},
        422,
        "Only one reference can have Controller set to true",
    ),
    Case(
        "Secret of stringData",
        "POST",
        SECRETS,
        {"metadata": {"name": "s1"}, "stringData": {"k": "v"}},
        201,
        check=lambda d: d["data"] == {"k": "dg=="} and d["type"] == "Opaque",
    ),
]
MERGE = "application/merge-patch+json"
#: requests in order, on objects the earlier ones made
SEQUENCE = [
    Case(
        "a Pod no node can take",
        "POST",
        PODS,
        a_pod(spec={"nodeSelector": NO_NODE}, meta={"name": "pend"}, command=["sleep", "60"]),
        201,
    ),
    Case("its log", "GET", PODS + "/pend/log", None, 204),
    Case(
        "a change of its spec",
        "PATCH",
        PODS + "/pend",
        {"spec": {"containers": [{"name": "c", "image": "j"}]}},
        422,
        "pod updates may not change fields other than",
        MERGE,
    ),
    Case(
        "a change of its labels",
        "PATCH",
        PODS + "/pend",
        {"metadata": {"labels": {"a": "b"}}},
        200,
        content_type=MERGE,
    ),
    Case("its deletion", "DELETE", PODS + "/pend?gracePeriodSeconds=0", None, 200),
    Case(
        "an immutable Secret",
        "POST",
        SECRETS,
        {"metadata": {"name": "imm"}, "immutable": True, "data": {"k": "eA=="}},
        201,
    ),
    Case(
        "a change of its data",
        "PATCH",
        SECRETS + "/imm",
        {"data": {"k": "eQ=="}},
        422,
        "data: Forbidden: field is immutable when `immutable` is set",
        MERGE,
    ),
    Case(
        "a new key",
        "PATCH",
        SECRETS + "/imm",
        {"stringData": {"k2": "z"}},
        422,
        "data: Forbidden: field is immutable",
        MERGE,
    ),
    Case(
        "making it mutable",
        "PATCH",
        SECRETS + "/imm",
        {"immutable": False},
        422,
        "immutable: Forbidden: field is immutable",
        MERGE,
    ),
    Case(
        "two controllers for it",
        "PATCH",
        SECRETS + "/imm",
        {"metadata": {"ownerReferences": [owner("u1"), owner("u2")]}},
        422,
        "Only one reference can have Controller set to true",
        MERGE,
    ),
    Case(
        "a new owner for it",
        "PATCH",
        SECRETS + "/imm",
        "OWNED BY THE PARENT",
        200,
        content_type=MERGE,
    ),
    Case(
        "its deletion",
        "DELETE",
        SECRETS + "/imm",
        None,
        200,
        check=lambda d: d["kind"] == "Status" and d["status"] == "Success",
    ),
    Case("its deletion again", "DELETE", SECRETS + "/imm", None, 404, 'secrets "imm" not found'),
    Case("a Secret", "POST", SECRETS, {"metadata": {"name": "dup"}}, 201),
    Case(
        "a Secret of the same name",
        "POST",
        SECRETS,
        {"metadata": {"name": "dup"}},
        409,
        'secrets "dup" already exists',
    ),
]


def _send(plane: Plane, case: Case) -> str | None:
    """What is wrong with the plane's answer to ``case`` (None: it is the expected one)."""
    body = case.body
    if body == "OWNED BY THE PARENT":  # (the live parent's uid, so no collector interferes)
        uid = (plane.get_pod(plane.parent) or {})["metadata"]["uid"]
        ref = {"apiVersion": "v1", "kind": "Pod", "name": plane.parent, "uid": uid}
        body = {"metadata": {"ownerReferences": [ref]}}
    r = plane.request(case.method, case.path, body, content_type=case.content_type)
    try:
        doc = r.json() if r.content else {}
    except ValueError:
        doc = {"text": r.text}
    got = f"{r.status_code} {doc.get('reason', '')}: {doc.get('message', '')}"[:400]
    if r.status_code != case.code:
        return f"{case.id}: expected {case.code}, got {got}"
    if case.code >= 400:
        if (doc.get("reason") or "") != REASONS[case.code] or case.says not in doc["message"]:
            return f"{case.id}: expected {REASONS[case.code]} saying {case.says!r}, got {got}"
    if case.check is not None and not case.check(doc):
        return f"{case.id}: unexpected answer {json.dumps(doc)[:400]}"
    if case.method == "POST" and r.status_code == 201 and case not in SEQUENCE:
        kind = "pods" if "/pods" in case.path else "secrets"
        name = doc["metadata"]["name"]
        plane.request("DELETE", f"/api/v1/namespaces/NS/{kind}/{name}?gracePeriodSeconds=0")
    return None


@pytest.mark.timeout(120)
def test_the_api_accepts_and_rejects_as_a_v1_20_server_does(plane: Plane) -> None:
    wrong = [w for case in [*CASES, *SEQUENCE] if (w := _send(plane, case)) is not None]
    assert not wrong, "\n".join(wrong)


# -- the emulator itself ---------------------------------------------------------------------


def test_emulator_auth_and_api_errors(k8s: KubernetesAPIEmulator) -> None:
    base = f"{k8s.url}/api/v1/namespaces/default/pods"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = http.get(base, headers=headers)
            assert r.status_code == 401
            assert r.headers["content-type"] == "application/json"
            assert r.json()["kind"] == "Status"
        r = http.get(base, headers=auth)
        assert r.status_code == 200
        assert [p["metadata"]["name"] for p in r.json()["items"]] == [PARENT]
        assert (
            http.get(f"{k8s.url}/version", headers=auth).json()["gitVersion"].startswith("v1.20.")
        )
    assert TOKEN not in repr(k8s)


def test_emulator_runs_pods_with_resolved_secret_refs() -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    script = "import os; print(os.environ['TOKEN'], os.environ['POD_NAME'], os.environ['IMG'])"
    pod = {
        "metadata": {"generateName": "job-"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "i",
                    "command": ["python3", "-c", script],
                    "env": [
                        POD_NAME_ENV,
                        {
                            "name": "TOKEN",
                            "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}},
                        },
                    ],
                }
            ],
        },
    }
    with KubernetesAPIEmulator(token=TOKEN, env={"IMG": "baked-in"}) as emu:
        base = f"{emu.url}/api/v1/namespaces/default"
        with httpx.Client(headers=auth) as http:
            created = http.post(f"{base}/pods", json=pod).json()
            name = created["metadata"]["name"]
            assert name.startswith("job-")
            assert created["status"]["phase"] == "Pending"

            def waiting_reason() -> str | None:
                p = emu.get_pod(name) or {}
                statuses = p.get("status", {}).get("containerStatuses") or [{}]
                reason = statuses[0].get("state", {}).get("waiting", {}).get("reason")
                return str(reason) if reason is not None else None

            emu.wait_until(lambda: waiting_reason() == "CreateContainerConfigError")
            secret = {"metadata": {"name": "creds"}, "stringData": {"token": "t0k"}}
            assert http.post(f"{base}/secrets", json=secret).status_code == 201
            emu.wait_until(lambda: (emu.get_pod(name) or {})["status"]["phase"] == "Succeeded")
            final = emu.get_pod(name) or {}
            assert final["status"]["podIP"] == "127.0.0.1"
            terminated = final["status"]["containerStatuses"][0]["state"]["terminated"]
            assert terminated["exitCode"] == 0
            assert emu.pod_log(name) == f"t0k {name} baked-in\n"
            log = http.get(f"{base}/pods/{name}/log", params={"tailLines": 1})
            assert log.text == f"t0k {name} baked-in\n"
            stored = http.get(f"{base}/secrets/creds").json()
            assert stored["data"] == {"token": base64.b64encode(b"t0k").decode()}


def test_emulator_watch_and_garbage_collection(k8s: KubernetesAPIEmulator) -> None:
    from lightkube import Client, KubeConfig
    from lightkube.resources.core_v1 import Pod

    parent_uid = (k8s.get_pod(PARENT) or {})["metadata"]["uid"]
    owner_ref = [{"apiVersion": "v1", "kind": "Pod", "name": PARENT, "uid": parent_uid}]
    client = Client(KubeConfig.from_file(k8s.kubeconfig))
    try:
        child = client.create(
            Pod.from_dict(  # type: ignore[call-overload]
                {
                    "metadata": {"name": "child", "ownerReferences": owner_ref},
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "i", "command": list(SLEEP)}],
                    },
                }
            )
        )
        k8s.wait_until(lambda: "child" in k8s.processes())
        pid = k8s.processes()["child"]
        events = []
        deleted = False
        for kind, obj in client.watch(
            Pod,
            fields={"metadata.name": "child"},
            resource_version=child.metadata.resourceVersion,
        ):
            events.append((kind, obj.status.phase if obj.status else None))
            if not deleted and obj.status and obj.status.phase == "Running":
                k8s.delete_pod(PARENT)  # the owner goes: its dependent is collected
                deleted = True
            if kind == "DELETED":
                break
    finally:
        client.close()
    assert events[-1][0] == "DELETED"
    assert ("MODIFIED", "Running") in events
    assert k8s.pods() == []
    k8s.wait_until(lambda: not k8s.processes())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_emulator_injects_failures_a_given_number_of_times(k8s: KubernetesAPIEmulator) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    base = f"{k8s.url}/api/v1/namespaces/default/pods"
    pod = {
        "metadata": {"generateName": "p-"},
        "spec": {"containers": [{"name": "c", "image": "img:1", "command": list(SLEEP)}]},
    }
    k8s.fail_scheduling("0/2 nodes are available: 2 Insufficient memory.", times=1)
    k8s.fail_image_pull(image="img:1", times=1)
    k8s.forbid("create", "pods", times=1)
    with httpx.Client(headers=auth) as http:
        denied = http.post(base, json=pod)
        assert (denied.status_code, denied.json()["reason"]) == (403, "Forbidden")
        assert 'cannot create resource "pods"' in denied.json()["message"]
        names = [http.post(base, json=pod).json()["metadata"]["name"] for _ in range(3)]

    def state(name: str) -> dict[str, Any]:
        status: dict[str, Any] = (k8s.get_pod(name) or {}).get("status", {})
        return status

    k8s.wait_until(lambda: state(names[0]).get("conditions") and state(names[1]).get("phase"))
    k8s.wait_until(lambda: state(names[2]).get("phase") == "Running")
    assert state(names[0])["conditions"][0]["reason"] == "Unschedulable"
    k8s.wait_until(lambda: "containerStatuses" in state(names[1]))
    waiting = state(names[1])["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ErrImagePull"
    assert state(names[0])["phase"] == state(names[1])["phase"] == "Pending"


def test_emulator_loses_answers_and_drops_requests(k8s: KubernetesAPIEmulator) -> None:
    base = f"{k8s.url}/api/v1/namespaces/default/secrets"
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        k8s.lose_answer("create", "secrets")
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(base, json={"metadata": {"name": "kept"}})
        assert k8s.get_secret("kept") is not None  # carried out, answer lost
        k8s.drop_request("create", "secrets")
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(base, json={"metadata": {"name": "dropped"}})
        assert k8s.get_secret("dropped") is None  # never carried out
        assert http.post(base, json={"metadata": {"name": "dropped"}}).status_code == 201


def test_emulator_keeps_a_pod_with_sidecars_running_after_its_first_container(
    k8s: KubernetesAPIEmulator,
) -> None:
    pod = {
        "metadata": {"name": "meshed"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "app", "image": "i", "command": ["python", "-c", "exit(3)"]},
                {"name": "istio-proxy", "image": "istio/proxyv2"},
            ],
        },
    }
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        assert http.post(f"{k8s.url}/api/v1/namespaces/default/pods", json=pod).status_code == 201

    def statuses() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = ((k8s.get_pod("meshed") or {}).get("status") or {}).get(
            "containerStatuses"
        ) or []
        return found

    k8s.wait_until(lambda: "terminated" in (statuses() or [{}])[0].get("state", {}))
    app, proxy = statuses()
    assert app["state"]["terminated"]["exitCode"] == 3
    assert "running" in proxy["state"]
    assert (k8s.get_pod("meshed") or {})["status"]["phase"] == "Running"
    assert pod_outcome(k8s.get_pod("meshed") or {}, container="app") == "exited with code 3 (Error)"


def test_emulator_enforces_a_role_and_close_kills_its_processes() -> None:
    with KubernetesAPIEmulator(token=TOKEN, allow={"pods": {"create"}}) as emu:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        base = f"{emu.url}/api/v1/namespaces/default"
        pod = {
            "metadata": {"name": "s"},
            "spec": {"containers": [{"name": "c", "image": "i", "command": list(SLEEP)}]},
        }
        with httpx.Client(headers=auth) as http:
            assert http.post(f"{base}/pods", json=pod).status_code == 201
            assert http.get(f"{base}/pods/s").status_code == 403
            assert http.post(f"{base}/secrets", json={"metadata": {"name": "x"}}).status_code == 403
        emu.wait_until(lambda: "s" in emu.processes())
        pid = emu.processes()["s"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- the backend, driven directly ------------------------------------------------------------
PRINT_AND_SLEEP = (
    "python",
    "-c",
    "import os, time; print(os.environ['FLAME_PARENT'], flush=True); time.sleep(60)",
)


async def until(plane: Plane, predicate: Callable[[], object], timeout: float = 15.0) -> None:
    await asyncio.to_thread(plane.wait_until, predicate, timeout)


def flame_objects(plane: Plane) -> tuple[list[str], list[str]]:
    return (
        sorted(p["metadata"]["name"] for p in plane.pods(FLAME)),
        sorted(s["metadata"]["name"] for s in plane.secrets(FLAME)),
    )


def test_boot_creates_a_secret_and_a_pod_and_stop_deletes_both(plane: Plane) -> None:
    async def scenario() -> PodHandle:
        async with opened(plane.backend()) as backend:
            handle = await backend.boot(launch(PRINT_AND_SLEEP))
            assert handle.pod_name and handle.secret_name
            pod = plane.get_pod(handle.pod_name) or {}
            secret = plane.get_secret(handle.secret_name) or {}
            # the Secret was handed over to the runner Pod
            assert [r["uid"] for r in secret["metadata"]["ownerReferences"]] == [
                pod["metadata"]["uid"]
            ]
            parent_uid = (plane.get_pod(plane.parent) or {})["metadata"]["uid"]
            assert pod["metadata"]["ownerReferences"][0]["uid"] == parent_uid
            assert SECRET not in json.dumps(pod)
            assert handle.id == handle.pod_name
            assert SECRET not in repr(handle) and TOKEN not in repr(backend)
            # the runner got its secret from the Secret, through the kubelet
            await until(plane, lambda: SECRET in plane.pod_log(handle.id))
            await handle.stop()
            await handle.stop()  # idempotent
            return handle

    handle = run(scenario())
    plane.nothing_left()
    assert plane.get_pod(plane.parent) is not None
    assert handle.pod_name is not None


def test_wait_reports_a_crash_with_the_runner_output(plane: Plane) -> None:
    argv = ("python", "-c", "import sys; print('ImportError: no module named app'); sys.exit(42)")

    async def scenario() -> None:
        async with opened(plane.backend()) as backend:
            handle = await backend.boot(launch(argv))
            assert await handle.wait() == "exited with code 42 (Error)"
            assert await handle.wait() == "exited with code 42 (Error)"  # remembered
            assert "Failed" in handle.diagnostics()
            assert "ImportError: no module named app" in handle.diagnostics()  # pods/log
            await handle.stop()

    run(scenario())
    plane.nothing_left()


def _no_node(pod: dict[str, Any]) -> None:
    pod["spec"]["nodeSelector"] = NO_NODE


def _missing_secret(pod: dict[str, Any]) -> None:
    ref = {"secretKeyRef": {"name": "no-such-secret", "key": "k"}}
    pod["spec"]["containers"][0]["env"].append({"name": "NEEDED", "valueFrom": ref})


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            _no_node,
            "could not be scheduled (Unschedulable): 0/1 nodes are available: 1 node(s) "
            "didn't match Pod's node affinity.",  # (v1.20's words, for a nodeSelector too)
        ),
        (
            _missing_secret,
            'could not start its container app: CreateContainerConfigError: secret "no-such-secret"'
            " not found",
        ),
    ],
    ids=["unschedulable", "missing-secret"],
)
def test_a_pod_that_cannot_start_ends_wait_with_its_reason(
    plane: Plane, template: Callable[[dict[str, Any]], None], expected: str
) -> None:
    async def scenario() -> None:
        async with opened(plane.backend(pod_template=template)) as backend:
            handle = await backend.boot(launch())
            assert await handle.wait() == expected
            assert handle.pod_name is not None and handle.pod_name in handle.diagnostics()
            await handle.stop()

    run(scenario())
    plane.nothing_left()


@pytest.mark.parametrize(
    ("inject", "expected"),
    [
        (
            lambda k: k.fail_scheduling("0/3 nodes are available: 3 Insufficient cpu."),
            "could not be scheduled (Unschedulable): 0/3 nodes are available: 3 Insufficient cpu.",
        ),
        (lambda k: k.fail_image_pull(), "could not start its container app: ErrImagePull: "),
        (
            lambda k: k.fail_image_pull(reason="ImagePullBackOff", message="Back-off pulling"),
            "could not start its container app: ImagePullBackOff: Back-off pulling",
        ),
    ],
    ids=["injected-unschedulable", "err-image-pull", "image-pull-backoff"],
)
def test_an_injected_failure_to_start_ends_wait_with_its_reason(
    k8s: KubernetesAPIEmulator, inject: Any, expected: str
) -> None:
    inject(k8s)  # (no image is ever pulled on the real plane: the emulator stands in)

    async def scenario() -> None:
        async with opened(make_backend(k8s)) as backend:
            handle = await backend.boot(launch())
            assert (await handle.wait()).startswith(expected)
            await handle.stop()

    run(scenario())
    nothing_left(k8s)


def test_wait_resolves_when_someone_deletes_the_pod(plane: Plane) -> None:
    async def scenario() -> None:
        async with opened(plane.backend()) as backend:
            handle = await backend.boot(launch())
            waiter = asyncio.ensure_future(handle.wait())
            assert handle.pod_name is not None
            name = handle.pod_name
            await until(plane, lambda: phase(plane, name) == "Running")
            await asyncio.to_thread(plane.delete_pod, name, grace_period=0)
            assert await waiter == "was deleted (its Pod is gone)"
            await handle.stop()

    run(scenario())
    plane.nothing_left()


@pytest.mark.parametrize("resource", ["pods", "secrets"])
def test_a_forbidden_create_is_a_boot_error_that_leaves_nothing(
    plane: Plane, resource: str
) -> None:
    role = docs_role()
    role[resource] = role[resource] - {"create"}
    kubeconfig = plane.with_role(role)

    async def scenario() -> None:
        async with opened(plane.backend(kubeconfig=kubeconfig)) as backend:
            with pytest.raises(BootError) as info:
                await backend.boot(launch())
            text = str(info.value)
            assert "403 Forbidden" in text
            assert f'cannot create resource "{resource}"' in text
            assert "docs/backends/kubernetes.md" in text
            assert TOKEN not in text and SECRET not in text

    run(scenario())
    plane.nothing_left()


def test_a_refused_secret_handover_only_warns(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    role = docs_role()
    role["secrets"] = role["secrets"] - {"patch"}
    kubeconfig = plane.with_role(role)

    async def scenario() -> None:
        async with opened(plane.backend(kubeconfig=kubeconfig)) as backend:
            handle = await backend.boot(launch())
            assert handle.secret_name is not None
            secret = plane.get_secret(handle.secret_name) or {}
            assert secret["metadata"]["ownerReferences"][0]["name"] == plane.parent
            await handle.stop()

    with caplog.at_level(logging.WARNING, logger="flame"):
        run(scenario())
    assert "stays owned by the parent Pod" in caplog.text
    assert TOKEN not in caplog.text and SECRET not in caplog.text
    plane.nothing_left()


def test_configuration_errors_are_boot_errors_without_the_token(
    k8s: KubernetesAPIEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = json.loads(Path(k8s.kubeconfig).read_text())
    config["users"][0]["user"]["token"] = "wrong-token-5e6f"
    wrong = tmp_path / "kubeconfig"
    wrong.write_text(json.dumps(config))

    async def boot_error(backend: KubernetesBackend) -> str:
        async with opened(backend):
            with pytest.raises(BootError) as info:
                await backend.boot(launch())
        return str(info.value)

    text = run(boot_error(KubernetesBackend(kubeconfig=wrong)))
    assert "401 Unauthorized" in text and "wrong-token" not in text
    text = run(boot_error(make_backend(k8s, pod_name="nope")))
    assert "read the parent's own Pod default/nope" in text and "404" in text
    text = run(boot_error(KubernetesBackend(kubeconfig=tmp_path / "missing")))
    assert "configuration" in text and "not found" in text
    monkeypatch.delenv("POD_NAME")
    text = run(boot_error(make_backend(k8s)))
    assert "POD_NAME" in text and "downward API" in text
    assert runner_objects(k8s) == []


def test_cancelled_boots_leave_nothing_behind(plane: Plane) -> None:
    async def scenario() -> int:
        cancelled = 0
        async with opened(plane.backend()) as backend:
            await backend.parent_pod()  # so that cancellations land in the creates
            # cancel later and later (in turns of the loop), until a boot is done first:
            # the cancellations land at every step of a boot, on any plane and any load
            steps = 0
            while True:
                task = asyncio.ensure_future(backend.boot(launch(runner_id=f"r{steps}")))
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    handle = await task
                except asyncio.CancelledError:
                    cancelled += 1
                    assert steps < 1 << 22, "no boot ever finished"
                    steps = steps * 3 // 2 + 1
                    continue
                await handle.stop()  # this one was done before its cancellation
                return cancelled

    assert run(scenario()) >= 5
    plane.nothing_left()


def test_stop_finishes_even_if_its_caller_is_cancelled(plane: Plane) -> None:
    async def scenario() -> PodHandle:
        async with opened(plane.backend()) as backend:
            handle = await backend.boot(launch())
            stopper = asyncio.ensure_future(handle.stop())
            await asyncio.sleep(0)  # stop() has started its deletions
            stopper.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stopper
        return handle  # aclose waited for the deletions

    handle = run(scenario())
    assert handle.secret_name is not None and handle.pod_name is not None
    assert plane.get_secret(handle.secret_name) is None
    pod = plane.get_pod(handle.pod_name)
    assert pod is None or pod["metadata"].get("deletionTimestamp")
    plane.nothing_left()


def test_stop_after_aclose_uses_a_short_lived_client(plane: Plane) -> None:
    backend = plane.backend()

    async def boot() -> PodHandle:
        handle = await backend.boot(launch())
        await backend.aclose()
        return handle

    handle = run(boot())
    run(handle.stop())  # another event loop, the backend's client closed
    plane.nothing_left()
    handle = run(boot())  # reopening works too
    run(handle.stop())
    plane.nothing_left()


def test_the_backend_uses_only_what_the_documented_role_grants(
    k8s: KubernetesAPIEmulator,
) -> None:
    role = docs_role()
    argv = ("python", "-c", "import sys; sys.exit(1)")

    async def scenario() -> None:
        async with opened(make_backend(k8s)) as backend:
            handle = await backend.boot(launch(argv))
            await handle.wait()  # reads the log of the failed Pod
            await handle.stop()
            handle = await backend.boot(launch())
            await handle.stop()
            await backend.sweep()

    run(scenario())
    used: dict[str, set[str]] = {}
    for verb, resource in k8s.calls:
        used.setdefault(resource, set()).add(verb)
    for resource, verbs in used.items():
        assert verbs <= role.get(resource, set()), (resource, verbs - role.get(resource, set()))
    assert "get" not in role["secrets"] and "list" not in role["secrets"]


# -- lost answers: each is resolved, and nothing is left ----------------------------------------
def boot_and_stop(plane: Plane, **options: Any) -> None:
    """Boot a runner, check that exactly its own Pod and Secret exist and that its Secret was
    handed to its Pod, stop it, and check that nothing is left."""

    async def scenario() -> None:
        async with opened(plane.backend(**options)) as backend:
            handle = await backend.boot(launch())
            assert flame_objects(plane) == ([handle.pod_name], [handle.secret_name])
            secret = plane.get_secret(str(handle.secret_name)) or {}
            assert secret["metadata"]["ownerReferences"][0]["name"] == handle.pod_name
            await handle.stop()

    run(scenario())
    plane.nothing_left()


@pytest.mark.parametrize(
    ("verb", "resource"),
    [
        ("create", "secrets"),
        ("create", "pods"),
        ("patch", "secrets"),
        ("delete", "pods"),
        ("delete", "secrets"),
    ],
)
def test_a_lost_answer_is_resolved_and_leaves_nothing(
    plane: Plane, verb: str, resource: str
) -> None:
    # the server carries the request out; the backend never hears back. A create is
    # repeated, found by its name (409 AlreadyExists); a patch or delete is just repeated.
    plane.lose_answer(verb, resource)
    boot_and_stop(plane)


def test_an_answer_that_comes_too_late_is_resolved_and_leaves_nothing(plane: Plane) -> None:
    # the Pod is created, but its answer comes after the client gave up waiting
    plane.lose_answer("create", "pods", delay=3.0)
    boot_and_stop(plane, request_timeout=1.0)


@pytest.mark.parametrize("resource", ["secrets", "pods"])
def test_when_every_answer_is_lost_the_boot_fails_and_leaves_nothing(
    plane: Plane, resource: str
) -> None:
    plane.lose_answer("create", resource, times=3)

    async def scenario() -> None:
        async with opened(plane.backend()) as backend:
            with pytest.raises(BootError, match="cannot reach the Kubernetes API to create"):
                await backend.boot(launch())

    run(scenario())
    plane.nothing_left()


def test_a_dropped_request_is_sent_again(plane: Plane) -> None:
    plane.drop_request("create", "pods")  # lost on its way: never carried out
    boot_and_stop(plane)


# -- parents that go away, and what they leave ------------------------------------------------
def test_a_deleted_parent_takes_its_runner_pod_and_secret_along(plane: Plane) -> None:
    async def scenario() -> None:
        async with opened(plane.backend()) as backend:
            handle = await backend.boot(launch())
            name = str(handle.pod_name)
            await until(plane, lambda: phase(plane, name) == "Running")
            # as if its Deployment rolled the parent away: the garbage collector does the rest
            await asyncio.to_thread(plane.delete_pod, plane.parent)
            await until(plane, lambda: not plane.runner_objects(), 30)
            await handle.stop()

    run(scenario())
    plane.nothing_left()


def _leave_an_orphan(plane: Plane) -> str:
    """A runner Pod (and its Secret) of a parent deleted with ``--cascade=orphan``: the
    collector drops their owner reference and leaves them."""
    other = plane.add_parent("gone-parent")

    async def boot() -> str:
        async with opened(plane.backend(pod_name=other)) as backend:
            handle = await backend.boot(launch())
            return str(handle.pod_name)

    name = run(boot())
    plane.delete_pod(other, propagation="Orphan")
    plane.wait_until(lambda: plane.get_pod(other) is None, 30)
    plane.wait_until(lambda: not (plane.get_pod(name) or {})["metadata"].get("ownerReferences"), 30)
    return name


def test_the_sweep_deletes_what_a_parent_that_is_gone_left(plane: Plane) -> None:
    orphan = _leave_an_orphan(plane)

    async def scenario() -> None:
        async with opened(plane.backend()) as backend:
            mine = await backend.boot(launch())  # a live runner: not for the sweep
            # (the first boot also started a sweep in the background: either gets it)
            assert await backend.sweep() in ([orphan], [])
            left = ([mine.pod_name], [mine.secret_name])
            await until(plane, lambda: flame_objects(plane) == left)
            assert await backend.sweep() == []
            await mine.stop()

    run(scenario())
    plane.nothing_left()


def test_the_sweep_deletes_finished_runners_of_an_earlier_process(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = ("python", "-c", "pass")

    async def earlier() -> str:
        # a parent process that died before it stopped its runner (the runner exited)
        monkeypatch.setattr(k8s_backend, "_instance", (os.getpid(), "earlier-process"))
        backend = plane.backend()
        handle = await backend.boot(launch(quick))
        await until(plane, lambda: phase(plane, str(handle.pod_name)) == "Succeeded")
        await backend.aclose()
        monkeypatch.setattr(k8s_backend, "_instance", None)  # a new process
        return str(handle.pod_name)

    async def scenario() -> None:
        finished = await earlier()
        async with opened(plane.backend()) as backend:
            ours = await backend.boot(launch(quick))  # finished, but ours: left to stop()
            await until(plane, lambda: phase(plane, str(ours.pod_name)) == "Succeeded")
            # (the first boot also started a sweep in the background: either gets it)
            assert await backend.sweep() in ([finished], [])
            await until(plane, lambda: plane.get_pod(finished) is None)
            assert await backend.sweep() == []
            assert phase(plane, str(ours.pod_name)) == "Succeeded"
            await ours.stop()

    run(scenario())
    plane.nothing_left()


# -- parents that real clusters have ----------------------------------------------------------
def test_a_parent_with_a_sidecar_boots_runners_without_it_unless_kept(plane: Plane) -> None:
    shipper = {"name": "log-shipper", "image": "fluent/fluent-bit:2", "command": ["sleep", "1h"]}
    parent = plane.add_parent("meshed-parent", spec={"containers": [shipper]})

    async def scenario() -> None:
        for keep, containers in (((), ["app"]), (("log-shipper",), ["app", "log-shipper"])):
            async with opened(plane.backend(pod_name=parent, keep_containers=keep)) as backend:
                handle = await backend.boot(launch())
                name = str(handle.pod_name)
                pod = plane.get_pod(name) or {}
                assert [c["name"] for c in pod["spec"]["containers"]] == containers
                await until(plane, lambda: phase(plane, name) == "Running")  # noqa: B023
                await handle.stop()

    run(scenario())
    plane.nothing_left()


def test_what_a_real_parent_sets_for_scheduling_and_security_reaches_its_runners(
    plane: Plane,
) -> None:
    plane.ensure_priority_class("flame-tests-high")
    spec = {
        "securityContext": {"runAsNonRoot": False, "seccompProfile": {"type": "RuntimeDefault"}},
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "web", "effect": "NoSchedule"}
        ],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "priorityClassName": "flame-tests-high",
    }
    context = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    parent = plane.add_parent("secure-parent", spec=spec, securityContext=context)

    async def scenario() -> None:
        async with opened(plane.backend(pod_name=parent)) as backend:
            handle = await backend.boot(launch())
            name = str(handle.pod_name)
            stored = (plane.get_pod(name) or {})["spec"]
            for field in ("securityContext", "imagePullSecrets", "nodeSelector"):
                assert stored[field] == spec[field], field
            assert spec["tolerations"][0] in stored["tolerations"]
            assert stored["priorityClassName"] == "flame-tests-high"
            assert stored["containers"][0]["securityContext"] == context
            await until(plane, lambda: phase(plane, name) == "Running")  # and it was scheduled
            await handle.stop()

    run(scenario())
    plane.nothing_left()


# -- whole pools ------------------------------------------------------------------------------


def where_am_i() -> tuple[int, str | None, str | None, str | None]:
    """Runs on a runner: its process, its Pod, its runner id and backend (from its secret)."""
    parent = flame.parent()
    return (
        os.getpid(),
        os.environ.get("POD_NAME"),
        parent.runner_id if parent else None,
        parent.backend if parent else None,
    )


def square(x: int) -> int:
    return x * x


def test_calls_run_in_runner_pods(plane: Plane) -> None:
    with flame.Pool("k8s-e2e", max=2, max_concurrency=2, backend=plane.backend()) as pool:
        pid, pod_name, runner_id, backend = flame.call(pool, where_am_i)
        assert pid != os.getpid()
        assert pod_name is not None and pod_name.startswith(f"{plane.parent}-flame-")
        assert backend == "kubernetes"
        pod = plane.get_pod(pod_name) or {}
        assert pod["status"]["phase"] == "Running"
        assert pod["metadata"]["labels"][LABEL_POOL] == "k8s-e2e"
        assert pod["metadata"]["labels"][LABEL_RUNNER] == runner_id
        assert list(pool.map(square, range(6))) == [0, 1, 4, 9, 16, 25]
    plane.nothing_left()


def test_the_backend_passes_the_conformance_check(plane: Plane) -> None:
    from flame.testing import check_backend

    check_backend(plane.backend(), boot_timeout=20)
    plane.nothing_left()


def test_the_documented_role_is_enough_for_a_pool(plane: Plane) -> None:
    backend = plane.backend(kubeconfig=plane.with_role(docs_role()))
    with flame.Pool("k8s-rbac", max=1, backend=backend) as pool:
        assert flame.call(pool, square, 7) == 49
    plane.nothing_left()


def test_a_runner_pod_that_cannot_start_fails_the_call_fast(plane: Plane) -> None:
    backend = plane.backend(pod_template=_no_node)
    with flame.Pool("k8s-nowhere", max=1, backend=backend, boot_timeout=30) as pool:
        started = time.monotonic()
        with pytest.raises(
            flame.BootError, match=r"Unschedulable.*didn't match Pod's node affinity"
        ):
            flame.call(pool, square, 2)
        assert time.monotonic() - started < 20  # at once, not after the 30 s boot timeout
    plane.nothing_left()


def test_an_app_that_crashes_at_start_fails_the_call_and_leaves_nothing(plane: Plane) -> None:
    backend = plane.backend(app="helpers.runner.bad_app")
    crash = pytest.raises(flame.BootError, match=r"exited with code 209 \(importing the app")
    with flame.Pool("k8s-crash", max=1, backend=backend, boot_timeout=30) as pool, crash:
        flame.call(pool, square, 2)
    plane.nothing_left()


def test_an_image_that_cannot_be_pulled_fails_the_call_fast(k8s: KubernetesAPIEmulator) -> None:
    k8s.fail_image_pull(message='Failed to pull image "registry.example/app:1.0": not found')
    with flame.Pool("k8s-pull", max=1, backend=make_backend(k8s), boot_timeout=20) as pool:
        started = time.monotonic()
        with pytest.raises(flame.BootError, match="ErrImagePull: Failed to pull image"):
            flame.call(pool, square, 2)
        assert time.monotonic() - started < 10  # not the 20 s boot timeout
    nothing_left(k8s)


def test_an_idle_runner_shuts_down_and_its_pod_is_deleted(plane: Plane) -> None:
    with flame.Pool("k8s-idle", max=1, backend=plane.backend(), idle_shutdown_after=0.5) as pool:
        _pid, pod_name, _secret, _backend = flame.call(pool, where_am_i)
        assert pod_name is not None
        plane.wait_until(lambda: plane.get_pod(pod_name) is None, 15)
        plane.nothing_left()
        # the pool notices and boots another Pod on demand
        _pid, again, _secret, _backend = flame.call(pool, where_am_i)
        assert again not in (None, pod_name)
    plane.nothing_left()


def test_a_runner_kept_running_by_a_sidecar_is_seen_to_end(plane: Plane) -> None:
    proxy = {"name": "mesh-proxy", "image": "mesh/proxy:2", "command": ["sleep", "1h"]}
    parent = plane.add_parent("mesh-parent", spec={"containers": [proxy]})
    backend = plane.backend(pod_name=parent, keep_containers=["mesh-proxy"])
    with flame.Pool("k8s-mesh", max=1, backend=backend, idle_shutdown_after=0.5) as pool:
        assert flame.call(pool, square, 3) == 9
        # the runner idles out; its Pod may stay Running for the proxy, but the backend
        # sees the runner's container end, and the Pod is deleted
        plane.wait_until(lambda: pool.stats().runners == 0 and not plane.runner_objects(), 20)
    plane.nothing_left()


def test_deleting_the_parent_pod_collects_its_runner_pods(plane: Plane) -> None:
    with flame.Pool("k8s-gc", max=2, max_concurrency=1, backend=plane.backend()) as pool:
        pods = {flame.call(pool, where_am_i)[1] for _ in range(1)}
        assert len(pods) == 1 and pods != {None}
        assert len(plane.pods(FLAME)) == 1
        plane.delete_pod(plane.parent)  # as if the parent's Deployment rolled it away
        plane.nothing_left(30)
        assert [p["metadata"]["name"] for p in plane.pods()] == []


def test_a_pools_start_sweeps_what_a_parent_that_is_gone_left(plane: Plane) -> None:
    orphan = _leave_an_orphan(plane)
    with flame.Pool("k8s-sweep", max=1, backend=plane.backend()) as pool:
        _pid, pod_name, _id, _backend = flame.call(pool, where_am_i)
        plane.wait_until(lambda: plane.get_pod(orphan) is None, 15)
        assert [p["metadata"]["name"] for p in plane.pods(FLAME)] == [pod_name]
    plane.nothing_left()
