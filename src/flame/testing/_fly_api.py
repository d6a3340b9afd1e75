"""What Fly's published Machines API accepts and answers, as data the emulator checks against.

This module owns flame's own transcription of the parts of Fly's Machines API document (the
OpenAPI 3 document served at ``docs.machines.dev/spec/openapi3.json``) that the emulator
serves: the request and answer schemas it uses, the query parameters of each route, and the
sizing rules the server enforces beyond the schema (from the Go types that ``flyctl`` uses,
``superfly/fly-go``: ``MachinePresets`` and the memory-per-CPU bounds). It holds types,
enums and field names only; no prose of the document.

:func:`problems` checks a JSON value against one of :data:`SCHEMAS` (a small subset of JSON
Schema: ``type``, ``properties``, ``additionalProperties``, ``items``, ``enum``, ``$ref`` to
another entry) and returns what is wrong, each problem with its path (``config.guest.cpus:
expected integer, got '2'``). Objects whose fields the document lists are *closed*: a field
the document does not name is reported, since the real API would at best ignore it. Named
types the document does not spell out (``fly.MachineService``, ``fly.File``...) are left open
objects. Tests validate the same traffic against the published document itself (with
``jsonschema``), so a slip in this transcription shows up there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CPU_COUNTS",
    "ERROR_STATUSES",
    "MEMORY_PER_CPU",
    "MEMORY_STEP",
    "QUERY",
    "SCHEMAS",
    "STOP_SIGNALS",
    "WAIT_STATES",
    "guest_problem",
    "problems",
    "query_problems",
    "truthy",
    "values",
]

Schema = dict[str, Any]

_S: Schema = {"type": "string"}
_I: Schema = {"type": "integer"}
_B: Schema = {"type": "boolean"}
_OPEN: Schema = {"type": "object"}  # a named type the document does not spell out


def _closed(**properties: Schema) -> Schema:
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def _map(values: Schema) -> Schema:
    return {"type": "object", "additionalProperties": values}


def _enum(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


def _ref(name: str) -> Schema:
    return {"$ref": name}


#: Signals ``StopRequest`` and ``fly.StopConfig`` accept.
STOP_SIGNALS = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM")

#: States ``GET .../wait`` can wait for.
WAIT_STATES = ("started", "stopped", "suspended", "destroyed", "failed", "settled")

#: ``ErrorResponse.status`` values (``main.statusCode``).
ERROR_STATUSES = ("unknown", "insufficient_capacity", "volume_placement_capacity", "name_taken")

SCHEMAS: dict[str, Schema] = {
    "fly.MachineGuest": _closed(
        cpu_kind=_S,
        cpus=_I,
        gpu_kind=_S,
        gpus=_I,
        host_dedication_id=_S,
        kernel_args=_array(_S),
        max_memory_mb=_I,
        memory_mb=_I,
        persist_rootfs=_enum("never", "always", "restart"),
        required_host_features=_array(_S),
    ),
    "fly.MachineInit": _closed(
        cmd=_array(_S),
        entrypoint=_array(_S),
        exec=_array(_S),
        kernel_args=_array(_S),
        swap_size_mb=_I,
        tty=_B,
    ),
    "fly.MachineRestart": _closed(max_retries=_I, policy=_enum("no", "always", "on-failure")),
    "fly.StopConfig": _closed(signal=_enum(*STOP_SIGNALS), timeout=_S),
    "fly.MachineConfig": _closed(
        auto_destroy=_B,
        cache_drive=_OPEN,
        checks=_map(_OPEN),
        containers=_array(_OPEN),
        disable_machine_autostart=_B,
        dns=_OPEN,
        env=_map(_S),
        files=_array(_OPEN),
        guest=_ref("fly.MachineGuest"),
        image=_S,
        init=_ref("fly.MachineInit"),
        metadata=_map(_S),
        metrics=_OPEN,
        mounts=_array(_OPEN),
        processes=_array(_OPEN),
        restart=_ref("fly.MachineRestart"),
        rootfs=_OPEN,
        schedule=_S,
        services=_array(_OPEN),
        size=_S,
        spot=_OPEN,
        standbys=_array(_S),
        statics=_array(_OPEN),
        stop_config=_ref("fly.StopConfig"),
    ),
    "CreateMachineRequest": _closed(
        config=_ref("fly.MachineConfig"),
        lease_ttl=_I,
        min_secrets_version=_I,
        name=_S,
        region=_S,
        skip_launch=_B,
        skip_secrets=_B,
        skip_service_registration=_B,
    ),
    "StopRequest": _closed(signal=_enum(*STOP_SIGNALS), timeout=_S),
    "MachineEvent": _closed(id=_S, request=_OPEN, source=_S, status=_S, timestamp=_I, type=_S),
    "Machine": _closed(
        checks=_array(_OPEN),
        config=_ref("fly.MachineConfig"),
        cordoned=_B,
        created_at=_S,
        events=_array(_ref("MachineEvent")),
        host_features=_array(_S),
        host_status=_enum("ok", "unknown", "unreachable"),
        id=_S,
        image_ref=_OPEN,
        incomplete_config=_ref("fly.MachineConfig"),
        instance_id=_S,
        lease=_OPEN,
        name=_S,
        nonce=_S,
        private_ip=_S,
        region=_S,
        state=_S,
        updated_at=_S,
        version=_S,
    ),
    "WaitMachineResponse": _closed(event_id=_S, ok=_B, state=_S, version=_S),
    "ErrorResponse": _closed(details=_OPEN, error=_S, status=_enum(*ERROR_STATUSES)),
}

#: Query parameters of each emulated action: name -> kind. Kinds: ``"boolean"``,
#: ``"integer"``, ``"string"``, or a tuple of allowed values (several may be given, repeated
#: or comma-separated). ``metadata.*`` stands for every ``metadata.<key>`` filter.
QUERY: dict[str, dict[str, Any]] = {
    "list": {
        "include_deleted": "boolean",
        "include_leases": "boolean",
        "region": "string",
        "state": ("created", "started", "stopped", "suspended"),
        "summary": "boolean",
        "metadata.*": "string",
        "cursor": "string",
        "limit": "integer",
    },
    "create": {},
    "get": {"version": "string", "include_leases": "boolean"},
    # ``kill`` is not in the document, but flyctl sends it for a forced destroy
    "delete": {"force": "boolean", "kill": "boolean"},
    "wait": {
        "version": "string",
        "instance_id": "string",
        "from_event_id": "string",
        "timeout": "integer",
        "state": WAIT_STATES,
    },
    "stop": {},
}

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_BOOLEAN = _TRUE | {"0", "f", "F", "FALSE", "false", "False"}
_INTEGER = re.compile(r"^[+-]?\d+$")

# -- sizing (beyond the schema) -----------------------------------------------------------------

#: CPU counts each ``cpu_kind`` comes in.
CPU_COUNTS: dict[str, tuple[int, ...]] = {
    "shared": (1, 2, 4, 6, 8),
    "performance": (1, 2, 4, 8, 16),
}
#: Memory bounds per CPU in MiB, inclusive, for each ``cpu_kind``.
MEMORY_PER_CPU: dict[str, tuple[int, int]] = {
    "shared": (256, 2048),
    "performance": (2048, 8192),
}
#: Memory comes in multiples of this many MiB.
MEMORY_STEP = 256


def guest_problem(guest: Mapping[str, Any]) -> str | None:
    """Why Fly would refuse this ``config.guest`` size, or ``None``.

    Absent fields take Fly's defaults (``shared``, 1 CPU, 256 MiB, the smallest preset).
    """
    kind = guest.get("cpu_kind", "shared")
    cpus = guest.get("cpus", 1)
    if kind not in CPU_COUNTS:
        return f"invalid config.guest.cpu_kind {kind!r}: expected one of {sorted(CPU_COUNTS)}"
    if cpus not in CPU_COUNTS[kind]:
        counts = ", ".join(map(str, CPU_COUNTS[kind]))
        return f"invalid config.guest.cpus {cpus!r} for {kind} CPUs: expected one of {counts}"
    low, high = MEMORY_PER_CPU[kind]
    memory = guest.get("memory_mb", low * cpus)
    if memory % MEMORY_STEP:
        return f"invalid config.guest.memory_mb {memory}: must be a multiple of {MEMORY_STEP}"
    if memory < low * cpus:
        return (
            f"invalid config.guest.memory_mb, minimum required {low * cpus} MiB for "
            f"{cpus} {kind} CPUs"
        )
    if memory > high * cpus:
        return (
            f"invalid config.guest.memory_mb, maximum allowed {high * cpus} MiB for "
            f"{cpus} {kind} CPUs"
        )
    return None


# -- checking --------------------------------------------------------------------------------


def problems(value: Any, schema: str | Schema, where: str = "", *, limit: int = 5) -> list[str]:
    """What is wrong with ``value`` as an instance of ``schema`` (a name in :data:`SCHEMAS`
    or a schema); empty when nothing is. At most ``limit`` problems are reported."""
    found: list[str] = []
    _check(value, SCHEMAS[schema] if isinstance(schema, str) else schema, where, found, limit)
    return found


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for name in ("integer", "number", "string", "array", "object"):
        if isinstance(value, _JSON_TYPES[name]):
            return name
    return type(value).__name__


def _check(value: Any, schema: Schema, where: str, found: list[str], limit: int) -> None:
    if len(found) >= limit:
        return
    ref = schema.get("$ref")
    if ref is not None:
        _check(value, SCHEMAS[ref], where, found, limit)
        return
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _JSON_TYPES[kind]) and (
            kind == "boolean" or not isinstance(value, bool)
        )
        if not ok:
            found.append(f"{where or 'body'}: expected {kind}, got {_type_name(value)}")
            return
    enum = schema.get("enum")
    if enum is not None and value not in enum:
        found.append(f"{where or 'body'}: {value!r} is not one of {', '.join(enum)}")
        return
    if isinstance(value, dict):
        properties: Mapping[str, Schema] = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if key in properties:
                _check(item, properties[key], path, found, limit)
            elif extra is False:
                found.append(f"{path}: not a field of this object in Fly's published API")
            elif isinstance(extra, dict):
                _check(item, extra, path, found, limit)
            if len(found) >= limit:
                return
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{index}]", found, limit)


def query_problems(action: str, pairs: Iterable[tuple[str, str]]) -> list[str]:
    """What is wrong with the query parameters of a request of ``action``."""
    spec = QUERY.get(action, {})
    found: list[str] = []
    for name, value in pairs:
        kind = spec.get(name)
        if kind is None and name.startswith("metadata.") and len(name) > len("metadata."):
            kind = spec.get("metadata.*")
        if kind is None:
            allowed = ", ".join(sorted(spec)) or "none"
            found.append(f"unknown query parameter {name!r} (this endpoint takes: {allowed})")
        elif kind == "boolean" and value not in _BOOLEAN:
            found.append(f"query parameter {name}={value!r}: expected a boolean")
        elif kind == "integer" and not _INTEGER.match(value):
            found.append(f"query parameter {name}={value!r}: expected an integer")
        elif isinstance(kind, tuple):
            for part in value.split(","):
                if part not in kind:
                    found.append(
                        f"query parameter {name}={part!r}: expected one of {', '.join(kind)}"
                    )
    return found


def truthy(value: str | None) -> bool:
    """A query boolean as Go's ``strconv.ParseBool`` reads it (absent: false)."""
    return value in _TRUE


def values(pairs: Sequence[tuple[str, str]], name: str) -> list[str]:
    """Every value of a repeated or comma-separated query parameter."""
    out: list[str] = []
    for key, value in pairs:
        if key == name:
            out.extend(part for part in value.split(",") if part)
    return out
