"""What the emulated Kubernetes API server rejects, and with which status: v1.20's rules.

What this module owns: the checks :class:`~flame.testing.kubernetes.KubernetesAPIEmulator`
applies to the objects it stores (Pods, Secrets, their metadata, delete options and
selectors), in the two stages of the real API server and with its status codes:

* **decoding** (400 BadRequest, "Pod in version "v1" cannot be handled as a Pod: ..."): a
  body that is not an object of the kind, a field of the wrong JSON type (a label value that
  is not a string, a command that is not a list of strings), a resource quantity that does
  not parse, Secret ``data`` that is not base64;
* **validation** (422 Invalid, "Pod "x" is invalid: <field>: <why>"): names and
  ``generateName``, labels, owner references (one controller at most), containers, volumes,
  environment variables (names, ``value`` with ``valueFrom``, key and field references),
  Secret keys and immutability, what an update of a Pod may change.

Every rule here was compared with a real v1.20.2 API server: ``tests/test_kubernetes.py``
sends one table of requests to both and expects the same answers. Where the emulator
knowingly differs: it keeps unknown fields (the real server drops them silently), it
reports only the first problem it finds (the real server lists them all), and it checks
only the resources and fields the emulator serves. Newer servers relax some of these rules
(environment variable names in 1.30) and can reject unknown fields (``fieldValidation``,
1.27).
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from typing import Any

JSON = dict[str, Any]

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")

#: ``generateName`` is cut to this length before the 5 random characters are added
MAX_GENERATED_PREFIX = 58
_MAX_NAME = 253
_MAX_SECRET_BYTES = 1024 * 1024

_SUBDOMAIN_RULE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character"
)
_ENV_RULE = (
    "a valid environment variable name must consist of alphabetic characters, digits, '_', "
    "'-', or '.', and must not start with a digit"
)
_KEY_RULE = "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
_IMMUTABLE = "Forbidden: field is immutable when `immutable` is set"

#: fieldRef paths an environment variable may use (v1.20)
_ENV_FIELD_PATHS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.podIP",
    "status.podIPs",
)
#: paths the Pod field conversion knows, but an environment variable may not use
_ENV_UNSUPPORTED = ("metadata.labels", "metadata.annotations")
_FIELD_SELECTORS = {
    "pods": frozenset(
        {
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        }
    ),
    "secrets": frozenset({"metadata.name", "metadata.namespace", "type"}),
}
_PROPAGATION = ("Foreground", "Background", "Orphan")
_VALUE_SOURCES = ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef")


def status(code: int, reason: str, message: str, **details: Any) -> JSON:
    """A ``Status`` object, as the API server answers an error."""
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


class ApiFailure(Exception):
    """Raised inside the emulator to answer a request with a ``Status`` error."""

    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status(code, reason, message, **details)
        self.code = code


def invalid(kind: str, name: str, cause: str) -> ApiFailure:
    """422 Invalid: ``Pod "name" is invalid: cause``."""
    return ApiFailure(422, "Invalid", f'{kind} "{name}" is invalid: {cause}', name=name, kind=kind)


def _undecodable(kind: str, detail: str) -> ApiFailure:
    return ApiFailure(
        400, "BadRequest", f'{kind} in version "v1" cannot be handled as a {kind}: {detail}'
    )


# -- decoding (400) ----------------------------------------------------------------------------
def _string_map(kind: str, where: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _undecodable(kind, f'{where}: ReadString: expects " or n')


def _string_list(kind: str, where: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise _undecodable(kind, f"{where}: []string: decode slice: expect [ or n")
    if not all(isinstance(v, str) for v in value):
        raise _undecodable(kind, f'{where}: []string: ReadString: expects " or n')


def _objects(kind: str, where: str, value: Any) -> list[JSON]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _undecodable(kind, f"{where}: decode slice: expect [ or n")
    return value


def check_decodable(kind: str, obj: Any) -> None:
    """Raise 400 for a body the real server could not even decode as a ``kind``."""
    if not isinstance(obj, dict):
        raise ApiFailure(
            400,
            "BadRequest",
            f"the object provided is unrecognized (must be of type {kind}): couldn't get "
            "version/kind; json parse error",
        )
    if obj.get("kind") not in (None, kind):
        raise _undecodable(
            kind, f"converting (v1.{obj['kind']}) to (core.{kind}): unknown conversion"
        )
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise _undecodable(kind, "v1.ObjectMeta: readObjectStart: expect { or n")
    meta = meta or {}
    _string_map(kind, "v1.ObjectMeta.Labels", meta.get("labels"))
    _string_map(kind, "v1.ObjectMeta.Annotations", meta.get("annotations"))
    _objects(kind, "v1.ObjectMeta.OwnerReferences", meta.get("ownerReferences"))
    if kind == "Pod":
        _check_pod_decodable(obj.get("spec"))
    elif kind == "Secret":
        _check_secret_decodable(obj)


def _check_pod_decodable(spec: Any) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise _undecodable("Pod", "v1.Pod.Spec: readObjectStart: expect { or n")
    _objects("Pod", "v1.PodSpec.Volumes", spec.get("volumes"))
    for group in ("containers", "initContainers"):
        for c in _objects("Pod", f"v1.PodSpec.{group}", spec.get(group)):
            where = "v1.Container"
            for key in ("command", "args"):
                _string_list("Pod", f"{where}.{key.title()}", c.get(key))
            for e in _objects("Pod", f"{where}.Env", c.get("env")):
                if not isinstance(e.get("value", ""), str):
                    raise _undecodable("Pod", f"{where}.Env: v1.EnvVar.Value: ReadString")
            resources = c.get("resources") or {}
            for section in ("limits", "requests"):
                for value in (resources.get(section) or {}).values():
                    ok = isinstance(value, int | float) and not isinstance(value, bool)
                    if not ok and not (isinstance(value, str) and _QUANTITY.match(value)):
                        raise _undecodable(
                            "Pod",
                            f"{where}.Resources: unmarshalerDecoder: quantities must match the "
                            f"regular expression '{_QUANTITY.pattern}'",
                        )


def _check_secret_decodable(secret: JSON) -> None:
    data = secret.get("data")
    if data is not None and not isinstance(data, dict):
        raise _undecodable("Secret", "v1.Secret.Data: readObjectStart: expect { or n")
    for value in (data or {}).values():
        if not isinstance(value, str):
            raise _undecodable("Secret", "v1.Secret.Data: base64Codec: invalid input")
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _undecodable(
                "Secret", "v1.Secret.Data: decode base64: illegal base64 data"
            ) from None
    _string_map("Secret", "v1.Secret.StringData", secret.get("stringData"))


# -- validation (422) --------------------------------------------------------------------------
def generated_name(prefix: str, suffix: str) -> str:
    """The name the server makes of ``generateName``: cut to 58 characters, then 5 more."""
    return prefix[:MAX_GENERATED_PREFIX] + suffix


def validate_name(kind: str, name: str, meta: JSON) -> None:
    """``metadata.name`` (and ``generateName``) of a new object."""
    prefix = meta.get("generateName")
    if prefix:
        _subdomain(kind, name, "metadata.generateName", str(prefix).rstrip("-") or "a")
    if not name:
        raise invalid(kind, "", "metadata.name: Required value: name or generateName is required")
    _subdomain(kind, name, "metadata.name", name)


def _matches(
    kind: str, name: str, where: str, value: str, pattern: re.Pattern[str], rule: str
) -> None:
    """``value`` (of ``where``) is at most 253 characters and matches ``pattern``."""
    if len(value) > _MAX_NAME:
        raise invalid(
            kind, name, f'{where}: Invalid value: "{value}": must be no more than 253 characters'
        )
    if not pattern.match(value):
        raise invalid(kind, name, f'{where}: Invalid value: "{value}": {rule}')


def _subdomain(kind: str, name: str, where: str, value: str) -> None:
    _matches(kind, name, where, value, DNS_SUBDOMAIN, _SUBDOMAIN_RULE)


def _qualified_key(kind: str, name: str, where: str, key: str) -> None:
    prefix, _, bare = key.rpartition("/")
    if prefix and (len(prefix) > _MAX_NAME or not DNS_SUBDOMAIN.match(prefix)):
        raise invalid(kind, name, f'{where}: Invalid value: "{key}": prefix part {_SUBDOMAIN_RULE}')
    if not bare or len(bare) > 63 or not _QUALIFIED_NAME.match(bare):
        raise invalid(
            kind,
            name,
            f'{where}: Invalid value: "{key}": name part must consist of alphanumeric '
            "characters, '-', '_' or '.', and must start and end with an alphanumeric "
            "character (at most 63)",
        )


def validate_meta(kind: str, name: str, meta: JSON) -> None:
    """Labels, annotation keys and owner references."""
    for key, value in (meta.get("labels") or {}).items():
        _qualified_key(kind, name, "metadata.labels", key)
        if len(value) > 63:
            raise invalid(
                kind,
                name,
                f'metadata.labels: Invalid value: "{value}": must be no more than 63 characters',
            )
        if not _LABEL_VALUE.match(value):
            raise invalid(
                kind,
                name,
                f'metadata.labels: Invalid value: "{value}": a valid label must be an empty '
                "string or consist of alphanumeric characters, '-', '_' or '.', and must start "
                "and end with an alphanumeric character",
            )
    for key in meta.get("annotations") or {}:
        _qualified_key(kind, name, "metadata.annotations", key)
    controllers = []
    for ref in meta.get("ownerReferences") or []:
        for field, what in (
            ("apiVersion", "version"),
            ("kind", "kind"),
            ("name", "name"),
            ("uid", "uid"),
        ):
            if not ref.get(field):
                raise invalid(
                    kind,
                    name,
                    f'metadata.ownerReferences.{field}: Invalid value: "": {what} must not be '
                    "empty",
                )
        if ref.get("controller") is True:
            controllers.append(str(ref["name"]))
    if len(controllers) > 1:
        raise invalid(
            kind,
            name,
            "metadata.ownerReferences: Invalid value: Only one reference can have Controller "
            f'set to true. Found "true" in references for {" and ".join(controllers)}',
        )


def validate_pod(name: str, pod: JSON) -> None:
    """A new Pod's spec (after :func:`check_decodable`)."""
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        raise invalid("Pod", name, "spec.containers: Required value")
    policy = spec.get("restartPolicy", "Always")
    if policy not in ("Always", "OnFailure", "Never"):
        raise invalid(
            "Pod",
            name,
            f'spec.restartPolicy: Unsupported value: "{policy}": supported values: "Always", '
            '"OnFailure", "Never"',
        )
    volumes: set[str] = set()
    for i, v in enumerate(spec.get("volumes") or []):
        vname = str(v.get("name") or "")
        if not DNS_LABEL.match(vname) or vname in volumes:
            raise invalid("Pod", name, f'spec.volumes[{i}].name: Invalid value: "{vname}"')
        volumes.add(vname)
    seen: set[str] = set()
    for group in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(group) or []):
            where = f"spec.{group}[{i}]"
            cname = str(c.get("name") or "")
            if not cname:
                raise invalid("Pod", name, f"{where}.name: Required value")
            if not DNS_LABEL.match(cname) or len(cname) > 63:
                raise invalid(
                    "Pod",
                    name,
                    f'{where}.name: Invalid value: "{cname}": a lowercase RFC 1123 label must '
                    "consist of lower case alphanumeric characters or '-'",
                )
            if cname in seen:
                raise invalid("Pod", name, f'{where}.name: Duplicate value: "{cname}"')
            seen.add(cname)
            if not c.get("image"):
                raise invalid("Pod", name, f"{where}.image: Required value")
            for j, e in enumerate(c.get("env") or []):
                _validate_env(name, f"{where}.env[{j}]", e)
            for j, m in enumerate(c.get("volumeMounts") or []):
                if m.get("name") not in volumes:
                    raise invalid(
                        "Pod",
                        name,
                        f'{where}.volumeMounts[{j}].name: Not found: "{m.get("name")}"',
                    )


def _validate_env(pod: str, where: str, e: JSON) -> None:
    var = str(e.get("name") or "")
    if not var:
        raise invalid("Pod", pod, f"{where}.name: Required value")
    if not _ENV_NAME.match(var):
        raise invalid("Pod", pod, f'{where}.name: Invalid value: "{var}": {_ENV_RULE}')
    source = e.get("valueFrom")
    if source is None:
        return
    if not isinstance(source, dict):
        raise invalid("Pod", pod, f"{where}.valueFrom: Invalid value")
    if e.get("value"):
        raise invalid(
            "Pod",
            pod,
            f'{where}.valueFrom: Invalid value: "": may not be specified when `value` is not empty',
        )
    given = [k for k in _VALUE_SOURCES if source.get(k) is not None]
    if not given:
        raise invalid(
            "Pod",
            pod,
            f'{where}.valueFrom: Invalid value: "": must specify one of: `fieldRef`, '
            "`resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`",
        )
    if len(given) > 1:
        raise invalid(
            "Pod",
            pod,
            f'{where}.valueFrom: Invalid value: "": may not have more than one field specified '
            "at a time",
        )
    kind = given[0]
    ref = source[kind]
    at = f"{where}.valueFrom.{kind}"
    if kind in ("secretKeyRef", "configMapKeyRef"):
        _subdomain("Pod", pod, f"{at}.name", str(ref.get("name") or ""))
        key = str(ref.get("key") or "")
        if not key:
            raise invalid("Pod", pod, f"{at}.key: Required value")
        _config_key("Pod", pod, f"{at}.key", key)
    elif kind == "fieldRef":
        _validate_field_ref(pod, at, ref)


def _validate_field_ref(pod: str, at: str, ref: JSON) -> None:
    path = str(ref.get("fieldPath") or "")
    if not path:
        raise invalid("Pod", pod, f"{at}.fieldPath: Required value")
    version = ref.get("apiVersion") or "v1"
    if version != "v1":
        raise invalid(
            "Pod",
            pod,
            f'{at}.fieldPath: Invalid value: "{path}": error converting fieldPath: unsupported '
            f"pod version: {version}",
        )
    if _SUBSCRIPT.match(path) or path in _ENV_FIELD_PATHS:
        return
    if path in _ENV_UNSUPPORTED:
        allowed = ", ".join(f'"{p}"' for p in _ENV_FIELD_PATHS)
        raise invalid(
            "Pod",
            pod,
            f'{at}.fieldPath: Unsupported value: "{path}": supported values: {allowed}',
        )
    raise invalid(
        "Pod",
        pod,
        f'{at}.fieldPath: Invalid value: "{path}": error converting fieldPath: field label '
        f"not supported: {path}",
    )


def _config_key(kind: str, name: str, where: str, key: str) -> None:
    _matches(kind, name, where, key, _CONFIG_KEY, _KEY_RULE)


def normalise_secret(name: str, secret: JSON) -> None:
    """Fold ``stringData`` into ``data`` (base64), default the type, then validate."""
    data = dict(secret.get("data") or {})
    for key, value in (secret.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(value.encode()).decode()
    size = 0
    for key, value in data.items():
        _config_key("Secret", name, f"data[{key}]", key)
        size += len(base64.b64decode(value))
    if size > _MAX_SECRET_BYTES:
        raise invalid("Secret", name, "data: Too long: must have at most 1048576 bytes")
    secret["data"] = data
    secret.setdefault("type", "Opaque")


def validate_secret_update(name: str, old: JSON, new: JSON) -> None:
    """What may change in an update of a Secret (after :func:`normalise_secret`)."""
    if old.get("immutable"):
        if new.get("data") != old.get("data"):
            raise invalid("Secret", name, f"data: {_IMMUTABLE}")
        if not new.get("immutable"):
            raise invalid("Secret", name, f"immutable: {_IMMUTABLE}")


def validate_pod_update(name: str, old: JSON, new: JSON) -> None:
    """An update of a Pod may change only images, ``activeDeadlineSeconds`` and add tolerations."""

    def comparable(spec: JSON) -> JSON:
        spec = copy.deepcopy(spec)
        for group in ("containers", "initContainers"):
            for c in spec.get(group) or []:
                c.pop("image", None)
        spec.pop("activeDeadlineSeconds", None)
        spec.pop("tolerations", None)
        return spec

    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    old_tolerations = old_spec.get("tolerations") or []
    new_tolerations = new_spec.get("tolerations") or []
    if comparable(old_spec) != comparable(new_spec) or (
        new_tolerations[: len(old_tolerations)] != old_tolerations
    ):
        raise invalid(
            "Pod",
            name,
            "spec: Forbidden: pod updates may not change fields other than "
            "`spec.containers[*].image`, `spec.initContainers[*].image`, "
            "`spec.activeDeadlineSeconds` or `spec.tolerations` (only additions to existing "
            "tolerations)",
        )


def check_field_selector(resource: str, keys: list[str]) -> None:
    """400 for a field selector on a field the server cannot select by."""
    for key in keys:
        if key not in _FIELD_SELECTORS[resource]:
            raise ApiFailure(400, "BadRequest", f"field label not supported: {key}")


def check_propagation(policy: str | None) -> None:
    """422 for a ``propagationPolicy`` the server does not know."""
    if policy is not None and policy not in _PROPAGATION:
        raise ApiFailure(
            422,
            "Invalid",
            f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: '
            f'"{policy}": supported values: "Foreground", "Background", "Orphan", "nil"',
        )
