"""Every request FlyBackend sends validates against Fly's published Machines API document.

The document is the excerpt of Fly's OpenAPI file kept beside the repository, at
``../shared/fly/machines-openapi.json``; it is read here with ``jsonschema``, independently
of the emulator's own transcription (``flame.testing._fly_api``). Checked, for each request:
the route and method, every query parameter (name, type, enum values), and the body against
the request schema, with every object the document spells out *closed* (a field it does not
name is an error: Fly would ignore it at best). The emulator's answers are checked against
the answer schemas too, so that the emulator cannot drift from the document either.

The traffic is that of the whole behavioural suite on the Fly backend (``tests/conftest.py``'s
``_fly`` factory keeps each emulator in ``helpers.parent.fly_traffic``; this module runs after every
other test), plus a scenario of its own that makes the backend send each kind of request it
has. A clone without ``../shared`` skips, saying so, unless ``CI`` is set: then it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from flame import RunnerLaunch
from flame.backends.fly import FlyBackend, FlyRateLimits
from flame.testing.fly import FlyMachinesEmulator, RecordedRequest
from helpers.parent import fly_traffic

jsonschema = pytest.importorskip("jsonschema")  # the dev extra has it

DOCUMENT = Path(__file__).resolve().parents[1].parent / "shared" / "fly" / "machines-openapi.json"
TOKEN = "conformance-token"
APP = "conform"
SLEEP = ("python", "-c", "import time; time.sleep(60)")
IMAGE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
FAST = FlyRateLimits().scaled(50)


@cache
def published() -> dict[str, Any]:
    if not DOCUMENT.is_file():
        message = (
            f"Fly's published OpenAPI excerpt is not at {DOCUMENT} (this checkout has no "
            "shared/ folder beside it), so the conformance of FlyBackend's requests cannot "
            "be checked"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must have it")
        pytest.skip(message)
    doc: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return doc


# -- the document as JSON Schema ----------------------------------------------------------------


def _as_json_schema(node: Any) -> Any:
    """An OpenAPI schema as JSON Schema: local references into ``$defs``, the named types
    the excerpt does not spell out as open objects, and every listed object closed."""
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        if ref.startswith("#/components/schemas/"):
            return {"$ref": "#/$defs/" + ref.rsplit("/", 1)[1]}
        return {"type": "object"}  # e.g. "fly.MachineService": a type left out
    out = {key: _as_json_schema(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@cache
def _definitions() -> dict[str, Any]:
    schemas = published()["components"]["schemas"]
    return {name: _as_json_schema(schema) for name, schema in schemas.items()}


def schema_problems(value: Any, name: str | None = None, *, array: bool = False) -> list[str]:
    """What jsonschema finds wrong with ``value`` as the document's schema ``name``."""
    schema: dict[str, Any] = {"$ref": f"#/$defs/{name}"} if name else {"type": "object"}
    if array:
        schema = {"type": "array", "items": schema}
    validator = jsonschema.Draft202012Validator({**schema, "$defs": _definitions()})
    return [
        f"{'.'.join(map(str, error.absolute_path)) or 'body'}: {error.message}"
        for error in validator.iter_errors(value)
    ]


@cache
def _routes() -> list[tuple[re.Pattern[str], str, dict[str, Any]]]:
    routes = []
    for template, item in published()["paths"].items():
        pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")
        for method, operation in item.items():
            routes.append((pattern, method.upper(), operation))
    return routes


def operation_of(method: str, path: str) -> dict[str, Any] | None:
    for pattern, verb, operation in _routes():
        if verb == method and pattern.match(path):
            return operation
    return None


def _value_problem(name: str, value: str, kind: str) -> str | None:
    head = kind.split(":", 1)[0].strip()
    if head == "boolean" and value not in ("true", "false", "1", "0"):
        return f"query {name}={value!r}: not a boolean"
    if head.startswith("integer") and not re.fullmatch(r"-?\d+", value):
        return f"query {name}={value!r}: not an integer"
    enum = re.search(r"enum \[([^\]]*)\]", kind)
    if enum:
        allowed = {v.strip() for v in enum.group(1).split(",")}
        wrong = [v for v in value.split(",") if v not in allowed]
        if wrong:
            return f"query {name}={value!r}: {wrong} not in {sorted(allowed)}"
    return None


def request_problems(request: RecordedRequest) -> list[str]:
    """Where ``request`` leaves Fly's published API: route, query parameters, body."""
    operation = operation_of(request.method, request.path)
    if operation is None:
        return [f"{request.method} {request.path}: no such operation in the document"]
    found = []
    parameters: dict[str, str] = operation.get("query", {})
    for name, value in request.query_pairs:
        kind = parameters.get(name)
        if kind is None and name.startswith("metadata."):
            kind = parameters.get("metadata.{key}")
        if kind is None:
            found.append(f"query parameter {name!r}: not in the document ({sorted(parameters)})")
            continue
        problem = _value_problem(name, value, kind)
        if problem:
            found.append(problem)
    declared = operation.get("requestBody")
    if declared is None:
        if request.body is not None:
            found.append("a body, where the operation takes none")
    else:
        name = declared.split()[0]
        if request.body is None:
            if "(required)" in declared:
                found.append(f"no body, where {name} is required")
        else:
            found += schema_problems(request.body, name)
    return [f"{request.method} {request.path}: {p}" for p in found]


def answer_problems(request: RecordedRequest) -> list[str]:
    """Where the emulator's answer to ``request`` leaves the document's answer schemas."""
    if request.status == 0 or request.answer is None:
        return []  # dropped on purpose
    operation = operation_of(request.method, request.path)
    if request.status >= 400 or operation is None:
        problems = schema_problems(request.answer, "ErrorResponse")
    else:
        declared = str(operation.get("responses", {}).get(str(request.status), ""))
        match = re.match(r"(array of )?([A-Za-z.]+)", declared)
        defined = match is not None and match.group(2) in _definitions()
        if match is None or not defined:
            problems = [] if request.answer in ({}, None) else ["an answer where none is due"]
        else:
            problems = schema_problems(request.answer, match.group(2), array=bool(match.group(1)))
    return [f"answer {request.status} to {request.method} {request.path}: {p}" for p in problems]


# -- the checker checks ------------------------------------------------------------------------


def recorded(method: str, path: str, body: Any = None, **query: str) -> RecordedRequest:
    return RecordedRequest(
        method=method,
        path=path,
        query=query,
        body=body,
        status=200,
        authorized=True,
        action="",
        query_pairs=tuple(query.items()),
    )


def test_the_checker_finds_what_fly_would_refuse() -> None:
    base = f"/v1/apps/{APP}/machines"
    good = {"name": "n", "config": {"image": "i", "guest": {"cpu_kind": "shared", "cpus": 1}}}
    assert request_problems(recorded("POST", base, good)) == []
    bad: list[tuple[RecordedRequest, str]] = [
        (recorded("POST", base, {"config": {"guest": {"cpus": "2"}}}), "'2' is not of type"),
        (recorded("POST", base, {"config": {"imag": "i"}}), "'imag' was unexpected"),
        (recorded("POST", base, {"config": {"restart": {"policy": "on-fail"}}}), "on-fail"),
        (recorded("POST", base, {"confg": {}}), "'confg' was unexpected"),
        (recorded("POST", base), "CreateMachineRequest is required"),
        (recorded("GET", base, sumary="true"), "'sumary': not in the document"),
        (recorded("GET", base, summary="yes"), "not a boolean"),
        (recorded("GET", f"{base}/m/wait", state="running"), "['running'] not in"),
        (recorded("GET", f"{base}/m/wait", timeout="60s"), "not an integer"),
        (recorded("DELETE", f"{base}/m", kill="true"), "'kill': not in the document"),
        (recorded("POST", f"{base}/m/stop", {"timeout": 10}), "10 is not of type 'string'"),
        (recorded("POST", f"{base}/m/kill"), "no such operation"),
        (recorded("GET", f"{base}/m", {"x": 1}), "a body, where the operation takes none"),
    ]
    for request, problem in bad:
        found = request_problems(request)
        assert any(problem in p for p in found), (request, found)
    error = {"error": "x", "status": "rate_limited"}
    assert schema_problems(error, "ErrorResponse")  # not a published status


# -- the backend's own traffic -----------------------------------------------------------------


@pytest.fixture
def emulator() -> Iterator[FlyMachinesEmulator]:
    with FlyMachinesEmulator(token=TOKEN, app=APP, extra_env=IMAGE_ENV, rate_limits=FAST) as emu:
        yield emu


def every_kind_of_request(emulator: FlyMachinesEmulator) -> None:
    """Make the backend send each kind of request it has: creates (refused, retried, lost),
    look-ups, waits, gets, graceful stops and forced destroys."""

    def backend(**options: Any) -> FlyBackend:
        return FlyBackend(
            host=emulator.url,
            token=TOKEN,
            app=APP,
            image="registry.fly.io/conform:1",
            region="ams",
            advertise_host="fdaa::1",
            cpu_kind="shared",
            cpus=2,
            memory_mb=1024,
            env={"DATABASE_URL": "pg://db"},
            metadata={"team": "video"},
            services=[{"protocol": "tcp", "internal_port": 8080}],
            extra_config={"stop_config": {"signal": "SIGTERM", "timeout": "10s"}},
            skip_secrets=True,
            retry_backoff=0.01,
            rate_limits=FAST,
            **options,
        )

    def launch(n: int, argv: tuple[str, ...] = SLEEP) -> RunnerLaunch:
        return RunnerLaunch(runner_id=f"c{n}", pool="conform", env={"FLAME_PARENT": "s"}, argv=argv)

    async def scenario() -> None:
        graceful, forced = backend(), backend(stop_timeout=0)
        try:
            emulator.fail_next_creates(412, error_status="insufficient_capacity")
            emulator.lose_next_create_answer()
            first = await graceful.boot(launch(1))
            exited = await graceful.boot(launch(2, ("python", "-c", "raise SystemExit(3)")))
            assert "exited with code 3" in await exited.wait()
            await first.stop()
            second = await forced.boot(launch(3))
            await second._fetch_state()
            await second.stop()
        finally:
            await graceful.aclose()
            await forced.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_every_request_of_the_backend_is_in_the_published_api(
    emulator: FlyMachinesEmulator,
) -> None:
    published()
    every_kind_of_request(emulator)
    requests = emulator.requests
    kinds = {(r.method, r.action, tuple(sorted(dict(r.query_pairs)))) for r in requests}
    assert {action for _, action, _ in kinds} == {"create", "list", "get", "wait", "stop", "delete"}
    problems = [p for r in requests for p in request_problems(r) + answer_problems(r)]
    assert not problems, "\n".join(problems)


BEHAVIOURAL = ("test_calls.py", "test_failures.py", "test_pool.py", "test_cast_child_map.py")


@pytest.mark.after_suite
def test_every_request_of_the_behavioural_suite_is_in_the_published_api(
    request: pytest.FixtureRequest,
) -> None:
    """Runs last: the requests FlyBackend sent while every other test of the session ran."""
    published()
    requests = [r for emulator in fly_traffic.EMULATORS for r in emulator.requests]
    on_fly = [
        item.nodeid
        for item in request.session.items
        if item.nodeid.split("::")[0].endswith(BEHAVIOURAL) and "[fly" in item.nodeid
    ]
    if not on_fly:
        return  # the behavioural suite did not run on the Fly backend this session
    assert requests, f"{len(on_fly)} behavioural tests ran on Fly, yet no request was recorded"
    problems = sorted({p for r in requests for p in request_problems(r) + answer_problems(r)})
    assert not problems, f"{len(problems)} problems in {len(requests)} requests:\n" + "\n".join(
        problems[:50]
    )
    # what was covered, for the record
    actions = {r.action for r in requests}
    assert {"create", "wait"} <= actions, actions


def test_a_missing_document_skips_on_a_laptop_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "DOCUMENT", tmp_path / "nothing.json")
    published.cache_clear()
    try:
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match="shared/ folder"):
            published()
        monkeypatch.setenv("CI", "true")
        with pytest.raises(pytest.fail.Exception, match="CI must have it"):
            published()
    finally:
        published.cache_clear()
