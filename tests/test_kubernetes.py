"""KubernetesBackend against the Kubernetes API emulator: real HTTP, real runner processes.

In order: the runner Pod and Secret manifests (pure, no server); options, addresses and
outcome rules; the emulator's own API semantics (plain httpx and lightkube); the backend
driven directly (``boot``/``wait``/``stop``) with small commands instead of a runner, with
failures injected at each step; and last, whole pools on the emulator, where calls are
computed in runner processes the emulator started as Pods.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from flame._errors import BootError
from flame.backends._base import RunnerLaunch
from flame.backends.kubernetes import (
    LABEL_MANAGED_BY,
    LABEL_POOL,
    LABEL_RUNNER,
    KubernetesBackend,
    PodHandle,
    pod_outcome,
)
from flame.testing.kubernetes import KubernetesAPIEmulator

T = TypeVar("T")
pytestmark = pytest.mark.timeout(20)

TOKEN = "k8s-test-token-9d2e7f41"
SECRET = "c2VjcmV0LXJ1bm5lci1ibG9i"  # stands for FLAME_PARENT
PARENT = "web-0"
SLEEP = ("python", "-c", "import time; time.sleep(60)")
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "backends" / "kubernetes.md"

# Pod processes import flame (and, for the end-to-end tests, this module) the way a runner
# in the image would: the image holds this same code, so share sys.path with them.
IMAGE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
POD_NAME_ENV = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def launch(argv: tuple[str, ...] = SLEEP, runner_id: str = "thumbs-0-a1b2c3") -> RunnerLaunch:
    return RunnerLaunch(runner_id=runner_id, pool="thumbs", env={"FLAME_PARENT": SECRET}, argv=argv)


RUNNER = RunnerLaunch(runner_id="thumbs-0-a1b2c3", pool="thumbs", env={"FLAME_PARENT": SECRET})


@pytest.fixture
def k8s(monkeypatch: pytest.MonkeyPatch) -> Iterator[KubernetesAPIEmulator]:
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
    selector = {LABEL_MANAGED_BY: "flame"}
    return [o["metadata"]["name"] for o in emulator.pods(labels=selector)] + [
        o["metadata"]["name"] for o in emulator.secrets(labels=selector)
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
            "initContainers": [{"name": "migrate", "image": "registry.example/web:1.2"}],
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
                {"name": "envoy", "image": "envoyproxy/envoy:v1.30"},
            ],
            "volumes": [
                {"name": "config", "configMap": {"name": "web-config"}},
                {"name": "unused", "secret": {"secretName": "other"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "kube-api-access-abcde", "projected": {"sources": []}},
            ],
        },
        "status": {"phase": "Running", "podIP": "10.1.2.3"},
    }


def test_runner_pod_is_a_trimmed_clone_owned_by_the_parent() -> None:
    pod = KubernetesBackend().runner_pod_manifest(parent_pod(), RUNNER, secret_name="s-1")
    meta, spec = pod["metadata"], pod["spec"]
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    assert meta["generateName"] == "web-7d9c8f6b5-x2k4q-flame-"
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
    assert spec["restartPolicy"] == "Never"
    # pod-level fields that make it "the same app": identity, pulls, placement
    assert spec["serviceAccountName"] == "web"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    for dropped in ("nodeName", "initContainers"):
        assert dropped not in spec
    # one container: the app's, running the runner command
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
    assert secret["metadata"]["generateName"] == "web-7d9c8f6b5-x2k4q-flame-secret-"
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
            "metadata": {"namespace": "elsewhere", "labels": {"x": "y"}},
            "spec": {
                "restartPolicy": "Always",
                "containers": [{"name": "app", "image": "other:1", "command": ["run"]}],
            },
        }

    pod = KubernetesBackend(pod_template=careless).runner_pod_manifest(
        parent_pod(), RUNNER, secret_name="s-1"
    )
    assert seen[0]["spec"]["containers"][0]["name"] == "app"  # it saw the full manifest
    assert pod["metadata"]["namespace"] == "shop"
    assert pod["metadata"]["generateName"] == "web-7d9c8f6b5-x2k4q-flame-"
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
    assert pod["metadata"]["generateName"] == "a" * 50 + "-flame-"  # + 5 chars <= 63
    labels = pod["metadata"]["labels"]
    assert labels[LABEL_POOL] == "My-Pool---n"
    assert labels[LABEL_RUNNER] == "r" * 63
    assert pod["metadata"]["annotations"][LABEL_POOL] == "My Pool!/ünï"  # the exact name


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


def _waiting(reason: str) -> dict[str, Any]:
    return {"name": "app", "state": {"waiting": {"reason": reason, "message": "m"}}}


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
            _pod(
                "Failed",
                containerStatuses=[
                    {
                        "name": "app",
                        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                    }
                ],
            ),
            "exited with code 137 (OOMKilled)",
        ),
        (
            _pod(
                "Failed",
                containerStatuses=[
                    {"name": "app", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}
                ],
            ),
            "exited with code 137 (killed by SIGKILL)",
        ),
        (
            _pod(
                "Failed",
                containerStatuses=[
                    {"name": "app", "state": {"terminated": {"exitCode": 209, "reason": "Error"}}}
                ],
            ),
            "exited with code 209 (importing the application raised)",
        ),
        (
            _pod("Failed", reason="Evicted", message="The node was low on memory."),
            "failed: Evicted: The node was low on memory.",
        ),
    ],
)
def test_pod_outcome(pod: dict[str, Any], outcome: str | None) -> None:
    assert pod_outcome(pod) == outcome


def test_wait_for_capacity_keeps_waiting_on_unschedulable() -> None:
    pod = _pod("Pending", conditions=[UNSCHEDULABLE])
    assert pod_outcome(pod, wait_for_capacity=True) is None


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
        r = http.get(f"{base}/nope", headers=auth)
        assert (r.status_code, r.json()["reason"]) == (404, "NotFound")
        pod: dict[str, Any] = {
            "metadata": {"name": PARENT},
            "spec": {"containers": [{"name": "a", "image": "i"}]},
        }
        r = http.post(base, headers=auth, json=pod)
        assert (r.status_code, r.json()["reason"]) == (409, "AlreadyExists")
        pod["metadata"]["name"] = "Not_A_Name"
        r = http.post(base, headers=auth, json=pod)
        assert (r.status_code, r.json()["reason"]) == (422, "Invalid")
        r = http.post(base, headers=auth, json={"metadata": {"name": "x"}, "spec": {}})
        assert r.status_code == 422
        pod["metadata"]["name"] = "odd"
        pod["spec"]["volumes"] = ["not-an-object"]
        r = http.post(base, headers=auth, json=pod)  # answered, not a dropped connection
        assert (r.status_code, r.json()["reason"]) == (500, "InternalError")
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
    owner = [{"apiVersion": "v1", "kind": "Pod", "name": PARENT, "uid": parent_uid}]
    client = Client(KubeConfig.from_file(k8s.kubeconfig))
    try:
        child = client.create(
            Pod.from_dict(  # type: ignore[call-overload]
                {
                    "metadata": {"name": "child", "ownerReferences": owner},
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


# -- the backend on the emulator -------------------------------------------------------------


def test_boot_creates_a_secret_and_a_pod_and_stop_deletes_both(k8s: KubernetesAPIEmulator) -> None:
    argv = (
        "python",
        "-c",
        "import os, time; print(os.environ['FLAME_PARENT'], flush=True); time.sleep(60)",
    )

    async def scenario() -> PodHandle:
        async with opened(make_backend(k8s)) as backend:
            handle = await backend.boot(launch(argv))
            assert handle.pod_name and handle.secret_name
            pod = k8s.get_pod(handle.pod_name) or {}
            secret = k8s.get_secret(handle.secret_name) or {}
            # the Secret was handed over to the runner Pod
            assert [r["uid"] for r in secret["metadata"]["ownerReferences"]] == [
                pod["metadata"]["uid"]
            ]
            parent_uid = (k8s.get_pod(PARENT) or {})["metadata"]["uid"]
            assert pod["metadata"]["ownerReferences"][0]["uid"] == parent_uid
            assert SECRET not in json.dumps(pod)
            assert handle.id == handle.pod_name
            assert SECRET not in repr(handle) and TOKEN not in repr(backend)
            await asyncio.to_thread(k8s.wait_until, lambda: SECRET in k8s.pod_log(handle.id))
            await handle.stop()
            await handle.stop()  # idempotent
            return handle

    handle = run(scenario())
    nothing_left(k8s)
    assert k8s.get_pod(PARENT) is not None
    assert handle.pod_name is not None


def test_wait_reports_a_crash_with_the_runner_output(k8s: KubernetesAPIEmulator) -> None:
    argv = ("python", "-c", "import sys; print('ImportError: no module named app'); sys.exit(42)")

    async def scenario() -> None:
        async with opened(make_backend(k8s)) as backend:
            handle = await backend.boot(launch(argv))
            assert await handle.wait() == "exited with code 42 (Error)"
            assert await handle.wait() == "exited with code 42 (Error)"  # remembered
            assert "Failed" in handle.diagnostics()
            assert "ImportError: no module named app" in handle.diagnostics()
            await handle.stop()

    run(scenario())
    nothing_left(k8s)


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
    ids=["unschedulable", "err-image-pull", "image-pull-backoff"],
)
def test_a_pod_that_cannot_start_ends_wait_with_its_reason(
    k8s: KubernetesAPIEmulator, inject: Any, expected: str
) -> None:
    inject(k8s)

    async def scenario() -> None:
        async with opened(make_backend(k8s)) as backend:
            handle = await backend.boot(launch())
            assert (await handle.wait()).startswith(expected)
            assert handle.pod_name is not None and handle.pod_name in handle.diagnostics()
            await handle.stop()

    run(scenario())
    nothing_left(k8s)


def test_wait_resolves_when_someone_deletes_the_pod(k8s: KubernetesAPIEmulator) -> None:
    async def scenario() -> None:
        async with opened(make_backend(k8s)) as backend:
            handle = await backend.boot(launch())
            waiter = asyncio.ensure_future(handle.wait())
            assert handle.pod_name is not None
            await asyncio.to_thread(k8s.wait_until, lambda: handle.id in k8s.processes())
            await asyncio.to_thread(k8s.delete_pod, handle.pod_name, grace_period=0)
            assert await waiter == "was deleted (its Pod is gone)"
            await handle.stop()

    run(scenario())
    nothing_left(k8s)


@pytest.mark.parametrize("resource", ["pods", "secrets"])
def test_a_forbidden_create_is_a_boot_error_that_leaves_nothing(
    k8s: KubernetesAPIEmulator, resource: str
) -> None:
    k8s.forbid("create", resource)

    async def scenario() -> None:
        async with opened(make_backend(k8s)) as backend:
            with pytest.raises(BootError) as info:
                await backend.boot(launch())
            text = str(info.value)
            assert "403 Forbidden" in text
            assert f'cannot create resource "{resource}"' in text
            assert "docs/backends/kubernetes.md" in text
            assert TOKEN not in text and SECRET not in text

    run(scenario())
    nothing_left(k8s)
    assert ("delete", "secrets") in k8s.calls or resource == "secrets"


def test_a_refused_secret_handover_only_warns(
    k8s: KubernetesAPIEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    k8s.forbid("patch", "secrets")

    async def scenario() -> None:
        async with opened(make_backend(k8s)) as backend:
            handle = await backend.boot(launch())
            assert handle.secret_name is not None
            secret = k8s.get_secret(handle.secret_name) or {}
            assert secret["metadata"]["ownerReferences"][0]["name"] == PARENT
            await handle.stop()

    with caplog.at_level(logging.WARNING, logger="flame"):
        run(scenario())
    assert "stays owned by the parent Pod" in caplog.text
    assert TOKEN not in caplog.text and SECRET not in caplog.text
    nothing_left(k8s)


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


def test_cancelled_boots_leave_nothing_behind(k8s: KubernetesAPIEmulator) -> None:
    async def scenario() -> None:
        async with opened(make_backend(k8s)) as backend:
            await backend.parent_pod()  # so that cancellations land in the creates
            for steps in range(0, 48, 6):
                task = asyncio.ensure_future(backend.boot(launch(runner_id=f"r{steps}")))
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

    run(scenario())
    nothing_left(k8s)
    assert ("create", "pods") in k8s.calls  # some cancellations did land after a create


def test_stop_finishes_even_if_its_caller_is_cancelled(k8s: KubernetesAPIEmulator) -> None:
    async def scenario() -> PodHandle:
        async with opened(make_backend(k8s)) as backend:
            handle = await backend.boot(launch())
            stopper = asyncio.ensure_future(handle.stop())
            await asyncio.sleep(0)  # stop() has started its deletions
            stopper.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stopper
        return handle  # aclose waited for the deletions

    handle = run(scenario())
    assert handle.secret_name is not None and handle.pod_name is not None
    assert k8s.get_secret(handle.secret_name) is None
    pod = k8s.get_pod(handle.pod_name)
    assert pod is None or pod["metadata"].get("deletionTimestamp")
    nothing_left(k8s)


def test_stop_after_aclose_uses_a_short_lived_client(k8s: KubernetesAPIEmulator) -> None:
    backend = make_backend(k8s)

    async def boot() -> PodHandle:
        handle = await backend.boot(launch())
        await backend.aclose()
        return handle

    handle = run(boot())
    run(handle.stop())  # another event loop, the backend's client closed
    nothing_left(k8s)
    run(opened(backend).__aenter__())  # reopening works too
    handle = run(boot())
    run(handle.stop())
    nothing_left(k8s)


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

    run(scenario())
    used: dict[str, set[str]] = {}
    for verb, resource in k8s.calls:
        used.setdefault(resource, set()).add(verb)
    for resource, verbs in used.items():
        assert verbs <= role.get(resource, set()), (resource, verbs - role.get(resource, set()))
    assert "get" not in role["secrets"] and "list" not in role["secrets"]


# -- whole pools on the emulator -------------------------------------------------------------

flame: Any
try:
    import flame

    HAVE_CORE = hasattr(flame, "Pool") and hasattr(flame, "call")
except ImportError:  # the core is not there yet
    HAVE_CORE = False

needs_core = pytest.mark.skipif(not HAVE_CORE, reason="flame core (Pool, call) not available")


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


@needs_core
@pytest.mark.timeout(30)
def test_calls_run_in_runner_pods(k8s: KubernetesAPIEmulator) -> None:
    with flame.Pool("k8s-e2e", max=2, max_concurrency=2, backend=make_backend(k8s)) as pool:
        pid, pod_name, runner_id, backend = flame.call(pool, where_am_i)
        assert pid != os.getpid()
        assert pod_name is not None and pod_name.startswith(f"{PARENT}-flame-")
        assert backend == "kubernetes"
        pod = k8s.get_pod(pod_name) or {}
        assert pod["status"]["phase"] == "Running"
        assert pod["metadata"]["labels"][LABEL_POOL] == "k8s-e2e"
        assert pod["metadata"]["labels"][LABEL_RUNNER] == runner_id
        assert list(pool.map(square, range(6))) == [0, 1, 4, 9, 16, 25]
    nothing_left(k8s)


@needs_core
@pytest.mark.timeout(40)
def test_the_backend_passes_the_conformance_check(k8s: KubernetesAPIEmulator) -> None:
    from flame.testing import check_backend

    check_backend(make_backend(k8s), boot_timeout=20)
    nothing_left(k8s)


@needs_core
@pytest.mark.timeout(30)
def test_the_documented_role_is_enough_for_a_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    with KubernetesAPIEmulator(token=TOKEN, env=IMAGE_ENV, allow=docs_role()) as emu:
        emu.add_parent_pod(PARENT, env=[POD_NAME_ENV])
        for name, value in emu.downward_env(PARENT).items():
            monkeypatch.setenv(name, value)
        with flame.Pool("k8s-rbac", max=1, backend=make_backend(emu)) as pool:
            assert flame.call(pool, square, 7) == 49
        nothing_left(emu)


@needs_core
@pytest.mark.timeout(30)
def test_a_runner_pod_that_cannot_start_fails_the_call_fast(k8s: KubernetesAPIEmulator) -> None:
    k8s.fail_image_pull(message='Failed to pull image "registry.example/app:1.0": not found')
    with flame.Pool("k8s-pull", max=1, backend=make_backend(k8s), boot_timeout=20) as pool:
        started = time.monotonic()
        with pytest.raises(flame.BootError, match="ErrImagePull: Failed to pull image"):
            flame.call(pool, square, 2)
        assert time.monotonic() - started < 10  # not the 20 s boot timeout
    nothing_left(k8s)


@needs_core
@pytest.mark.timeout(30)
def test_an_idle_runner_shuts_down_and_its_pod_is_deleted(k8s: KubernetesAPIEmulator) -> None:
    backend = make_backend(k8s)
    with flame.Pool("k8s-idle", max=1, backend=backend, idle_shutdown_after=0.5) as pool:
        _pid, pod_name, _secret, _backend = flame.call(pool, where_am_i)
        assert pod_name is not None
        k8s.wait_until(lambda: k8s.get_pod(pod_name) is None, timeout=15)
        nothing_left(k8s)
        # the pool notices and boots another Pod on demand
        _pid, again, _secret, _backend = flame.call(pool, where_am_i)
        assert again not in (None, pod_name)
    nothing_left(k8s)


@needs_core
@pytest.mark.timeout(30)
def test_deleting_the_parent_pod_collects_its_runner_pods(k8s: KubernetesAPIEmulator) -> None:
    with flame.Pool("k8s-gc", max=2, max_concurrency=1, backend=make_backend(k8s)) as pool:
        pods = {flame.call(pool, where_am_i)[1] for _ in range(1)}
        assert len(pods) == 1 and pods != {None}
        assert len(k8s.pods(labels={LABEL_MANAGED_BY: "flame"})) == 1
        k8s.delete_pod(PARENT)  # as if the parent's Deployment rolled it away
        nothing_left(k8s)
        assert k8s.pods() == []
