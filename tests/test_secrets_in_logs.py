"""The runner secret and the API tokens never show in logs, errors, reprs or command lines.

For each of ``ProcessBackend``, ``FlyBackend`` (on the Fly Machines emulator) and
``KubernetesBackend`` (on the Kubernetes API emulator), a full run with failures happens
while *everything* it prints is captured:

* every logging record of every logger, at DEBUG (flame, httpx/httpcore, httpx2/httpcore2
  under lightkube, asyncio...), formatted with its traceback. During the capture the root
  logger's only handler is the recorder (pytest's own log handlers are put back afterwards),
  so that a leaked secret is not copied into pytest's report of a failure;
* file descriptors 1 and 2 of this process (``capfd``), where ``ProcessBackend`` runners
  write (their stdout is ours; their stderr is copied to ours);
* what emulated machines and Pods wrote (the emulators' log files: ``fly logs``,
  ``kubectl logs``) and the emulators' request logs, but not the platform's stored machine
  configs, Pod specs or Secrets, which legitimately hold ``FLAME_PARENT``;
* ``str``, ``repr``, attributes and the formatted traceback (``__cause__``/``__context__``
  chain included) of every exception the run raises, and of the results hooks receive;
* ``repr``/``str`` of pools, ``pool.stats()``, backends, launches and runner handles (with
  their ``diagnostics()``), and what a runner says about itself (``flame.parent()``);
* the command lines (``/proc/<pid>/cmdline``) of every process below this one, taken
  while runners are alive (after each boot, with a runner idle and in the middle of a call).

The run: a successful call, a call that raises, a call that times out, a runner SIGKILLed in
the middle of a call (``RunnerLost``), boots that fail (an app whose import raises; a missing
interpreter; a runner given a wrong secret; the API refusing a create), a wrong API token,
a pool stop and a call after it.

Each runner's secret is taken from what the pool hands its backend (``boot`` is wrapped to
decode ``launch.env["FLAME_PARENT"]`` with flame's own decoder) and everything captured is
searched for it: as hex (also upper case, and each quarter of it), base64 and urlsafe base64,
``repr(bytes)``, the whole ``FLAME_PARENT`` value, the part of that value that encodes the
secret (so a truncated ``FLAME_PARENT`` counts), and ``FLAME_PARENT`` base64-encoded again (a
Kubernetes Secret's ``data``). API tokens (the right and the wrong ones) are searched as they
are, base64-encoded, and by their random part. A finding names the needle and the source and
shows the surrounding text with every needle replaced by ``***``.

So that none of this can pass vacuously, each run checks that its capture holds the lines it
must (the runner's own output, the boot failure's text, the ``RunnerLost`` message, DEBUG
records of the HTTP clients, runner command lines), and that the search finds each kind of
needle once planted in the captured text, without the report repeating it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import glob
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import flame
from flame._parent import LaunchInfo
from helpers import wait_until
from helpers.parent.callers import Caller
from helpers.runner import log_work
from helpers.runner import wire_work as work

# Machine and Pod processes import flame and the helpers the way a runner in the image would.
IMAGE_ENV = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
APP = "sl-app"
IMAGE = "registry.example/sl-app:1"
PARENT_POD = "sl-parent"

#: every named logger set to DEBUG (besides the root and every logger that exists already)
LOGGERS = ("flame", "httpx", "httpcore", "httpx2", "httpcore2", "lightkube", "asyncio")

POOL_OPTIONS: dict[str, Any] = {
    "boot_timeout": 15,
    "shutdown_timeout": 5,
    "idle_shutdown_after": None,
    "log": "DEBUG",
}


def new_token() -> str:
    return f"tok-{os.urandom(16).hex()}"


# -- what is captured ------------------------------------------------------------------------------
class Capture:
    """Texts captured during a run, each with the name of where it came from."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add(self, source: str, text: str) -> None:
        with self._lock:
            self.sources.append((source, text))

    def add_object(self, label: str, obj: Any) -> None:
        self.add(f"repr:{label}", repr(obj))
        self.add(f"str:{label}", str(obj))

    def add_exception(self, label: str, exc: BaseException) -> None:
        """Text, repr, attributes of ``exc`` and of its whole chain; the formatted traceback."""
        self.add(f"exception:{label}", "".join(traceback.format_exception(exc)))
        seen: set[int] = set()
        todo: list[BaseException] = [exc]
        while todo:
            e = todo.pop()
            if id(e) in seen:
                continue
            seen.add(id(e))
            self.add(f"exception:{label}:{type(e).__name__}", f"{e}\n{e!r}")
            with contextlib.suppress(Exception):
                self.add(f"exception:{label}:{type(e).__name__} attributes", repr(vars(e)))
            todo += [c for c in (e.__cause__, e.__context__) if c is not None]

    def add_cmdlines(self, label: str) -> None:
        for pid, cmdline in descendant_cmdlines().items():
            self.add(f"cmdline:{label}:pid {pid}", cmdline)

    def text(self, prefix: str) -> str:
        with self._lock:
            return "\n".join(t for s, t in self.sources if s.startswith(prefix))


def descendant_cmdlines() -> dict[int, str]:
    """``/proc/<pid>/cmdline`` (NULs as spaces) of every live process below this one."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(children.get(os.getpid(), ()))
    while todo:
        pid = todo.pop()
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found[pid] = raw.replace(b"\0", b" ").decode(errors="replace")
        todo += children.get(pid, ())
    return found


class _Recorder(logging.Handler):
    def __init__(self, capture: Capture) -> None:
        super().__init__(logging.DEBUG)
        self.capture = capture
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s [%(threadName)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception as exc:
            text = f"unformattable record from {record.name}: {exc!r}"
        self.capture.add(f"log:{record.name}", text)


@contextlib.contextmanager
def every_log_record(capture: Capture) -> Iterator[None]:
    """Record every logging record at DEBUG and up; put every logger back afterwards."""
    root = logging.getLogger()
    manager = root.manager
    named = [logging.getLogger(name) for name in LOGGERS]
    existing = [lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    loggers = list({id(lg): lg for lg in [*named, *existing]}.values())
    saved = [(lg, lg.level, lg.disabled) for lg in loggers]
    saved_root = (root.level, list(root.handlers))
    saved_disable = manager.disable
    detached = [lg for lg in loggers if not lg.propagate]
    handler = _Recorder(capture)
    logging.disable(logging.NOTSET)
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
    for lg in detached:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in detached:
            lg.removeHandler(handler)
        for lg, level, disabled in saved:
            lg.setLevel(level)
            lg.disabled = disabled
        root.handlers[:] = saved_root[1]
        root.setLevel(saved_root[0])
        logging.disable(saved_disable)


@contextlib.contextmanager
def capturing(capture: Capture, capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Logging records and this process's fds 1 and 2 (runner processes' output included)."""
    capfd.readouterr()
    try:
        with every_log_record(capture):
            yield
    finally:
        out, err = capfd.readouterr()
        capture.add("fd 1 (stdout)", out)
        capture.add("fd 2 (stderr)", err)


# -- what the pool hands its backends --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Launched:
    """One runner's ``FLAME_PARENT`` value and the secret it carries."""

    runner_id: str
    value: str
    secret: bytes = dataclasses.field(repr=False)


class BootRecorder:
    """Wraps backends' ``boot`` to keep each runner's secret and handle, and capture them."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.launched: list[Launched] = []
        self.handles: list[tuple[str, flame.RunnerHandle]] = []

    def wrap(
        self,
        backend: flame.Backend,
        *,
        tamper: Callable[[LaunchInfo], LaunchInfo] | None = None,
    ) -> flame.Backend:
        inner = backend.boot
        capture = self.capture

        async def boot(launch: flame.RunnerLaunch) -> flame.RunnerHandle:
            value = launch.env["FLAME_PARENT"]
            info = LaunchInfo.decode(value)
            rid = info.runner_id
            self.launched.append(Launched(rid, value, info.secret))
            capture.add_object(f"launch of {rid}", launch)
            capture.add_object(f"LaunchInfo of {rid}", info)
            if tamper is not None:  # hand the runner another secret than the parent expects
                forged = tamper(info)
                self.launched.append(Launched(f"{rid} (forged)", forged.encode(), forged.secret))
                launch = dataclasses.replace(
                    launch, env={**launch.env, "FLAME_PARENT": forged.encode()}
                )
            try:
                handle = await inner(launch)
            except BaseException as exc:
                capture.add_exception(f"{backend.name} backend boot of {rid}", exc)
                raise
            finally:
                capture.add_cmdlines(f"after the boot of {rid}")
            self.handles.append((rid, handle))
            self.describe(rid, handle, "booted")
            return handle

        backend.boot = boot  # type: ignore[method-assign]
        capture.add_object(f"{backend.name} backend", backend)
        return backend

    def describe(self, rid: str, handle: flame.RunnerHandle, when: str) -> None:
        self.capture.add_object(f"handle of {rid} ({when})", handle)
        self.capture.add(f"handle id of {rid} ({when})", handle.id)
        self.capture.add(f"handle diagnostics of {rid} ({when})", handle.diagnostics())

    def describe_all(self, when: str) -> None:
        for rid, handle in self.handles:
            self.describe(rid, handle, when)


def hooks(capture: Capture) -> dict[str, Any]:
    """Pool hooks that capture what they are given (``on_grow_end`` gets boot errors)."""

    def on_grow_end(result: Any, meta: dict[str, Any]) -> None:
        if isinstance(result, BaseException):
            capture.add_exception(f"on_grow_end of {meta['name']}", result)
        capture.add_object(f"on_grow_end result of {meta['name']}", result)

    def on_shrink(meta: dict[str, Any]) -> None:
        capture.add_object("on_shrink meta", meta)

    return {"on_grow_end": on_grow_end, "on_shrink": on_shrink}


# -- the run ---------------------------------------------------------------------------------------
def full_run(pool: flame.Pool, capture: Capture, marker: str, workdir: Path) -> None:
    """A call that works, one that raises, one that times out, a runner SIGKILLed mid-call,
    the pool's stop and a call after it."""
    try:
        view = pool.call(log_work.chatter, marker)
        capture.add("runner's view of itself", json.dumps(view, indent=1))
        capture.add_cmdlines("a runner is up")
        capture.add_object("pool with a runner", pool)
        capture.add_object("pool.stats() with a runner", pool.stats())

        with pytest.raises(log_work.MarkedError) as raised:
            pool.call(log_work.fail, marker)
        capture.add_exception("a call that raises", raised.value)

        with pytest.raises(flame.CallTimeout) as timed_out:
            pool.call(work.nap, 30, timeout=0.5)
        capture.add_exception("a call that times out", timed_out.value)
        wait_until(lambda: pool.stats().in_flight == 0, 10, message="the timed-out call ended")

        pid, _ = pool.call(work.whoami)
        caller = Caller(pool.call, work.timed, str(workdir), "doomed", 30)
        wait_until((workdir / "doomed.started").exists, 15, message="the doomed call started")
        capture.add_cmdlines("a runner is in the middle of a call")
        capture.add_object("pool mid-call", pool)
        capture.add_object("pool.stats() mid-call", pool.stats())
        os.kill(pid, signal.SIGKILL)
        lost = caller.failure(15)
        assert isinstance(lost, flame.RunnerLost), repr(lost)
        capture.add_exception("a runner SIGKILLed mid-call", lost)
    finally:
        pool.stop()
    capture.add_object("pool after stop", pool)
    capture.add_object("pool.stats() after stop", pool.stats())
    with pytest.raises(flame.PoolClosed) as closed:
        pool.call(work.whoami)
    capture.add_exception("a call after stop", closed.value)


def failed_boot(capture: Capture, label: str, pool: flame.Pool, *, start: bool = False) -> str:
    """Boot a runner that cannot come up (``pool.start()`` for ``min=1``, else a call)."""
    boot: Callable[[], Any] = pool.start if start else lambda: pool.call(work.whoami, timeout=20)
    try:
        with pytest.raises(flame.BootError) as info:
            boot()
    finally:
        pool.stop()
    capture.add_exception(label, info.value)
    return str(info.value)


# -- the search ------------------------------------------------------------------------------------
def _window(encoded: str, raw: bytes, inner: bytes) -> str:
    """The characters of ``encoded`` (base64 of ``raw``) that only ``inner``'s bytes decide."""
    at = raw.index(inner)
    return encoded[-(-at // 3) * 4 : (at + len(inner)) // 3 * 4]


def secret_needles(launched: Launched) -> dict[str, str]:
    """Each form of one runner's secret to search for, by a name that does not show it."""
    s, value = launched.secret, launched.value
    hexed = s.hex()
    in_value = _window(value, base64.urlsafe_b64decode(value), hexed.encode())
    again = base64.b64encode(value.encode()).decode()
    who = f"runner {launched.runner_id}:"
    needles = {
        f"{who} the secret as hex": hexed,
        f"{who} the secret as upper-case hex": hexed.upper(),
        f"{who} the secret as base64": base64.b64encode(s).decode().rstrip("="),
        f"{who} the secret as urlsafe base64": base64.urlsafe_b64encode(s).decode().rstrip("="),
        f"{who} the secret as repr(bytes)": repr(s)[2:-1],
        f"{who} the whole FLAME_PARENT value": value,
        f"{who} the part of FLAME_PARENT that encodes the secret": in_value,
        f"{who} FLAME_PARENT base64-encoded again": again,
        f"{who} the part of FLAME_PARENT base64-encoded again that encodes the secret": _window(
            again, value.encode(), in_value.encode()
        ),
    }
    for i in range(0, len(hexed), 16):
        needles[f"{who} characters {i}-{i + 15} of the secret's hex"] = hexed[i : i + 16]
    step = -(-len(in_value) // 4)
    for i in range(0, len(in_value), step):
        name = f"{who} quarter {i // step + 1} of the part of FLAME_PARENT encoding the secret"
        needles[name] = in_value[i : i + step]
    return needles


def truncations(launched: Launched) -> list[str]:
    """``FLAME_PARENT`` cut off part-way through the characters that encode the secret."""
    value = launched.value
    window = _window(value, base64.urlsafe_b64decode(value), launched.secret.hex().encode())
    at = value.index(window)
    return [value[: at + 60], value[at + 25 :]]


def token_needles(name: str, token: str) -> dict[str, str]:
    return {
        f"the {name}": token,
        f"the {name}, base64-encoded": base64.b64encode(token.encode()).decode().rstrip("="),
        f"the random part of the {name}": token.removeprefix("tok-"),
    }


def _redacted_context(text: str, start: int, end: int, values: list[str], width: int = 100) -> str:
    """``text`` around ``[start, end)``, widened so as not to cut a needle, needles as ***."""
    lo, hi = max(0, start - width), min(len(text), end + width)
    widened = True
    while widened:
        widened = False
        for v in values:
            i = text.find(v, max(0, lo - len(v) + 1))
            while 0 <= i < hi:
                if i < lo:
                    lo, widened = i, True
                if i + len(v) > hi:
                    hi, widened = i + len(v), True
                i = text.find(v, i + 1)
    snippet = text[lo:hi]
    for v in values:  # longest first
        snippet = snippet.replace(v, "***")
    return repr(snippet)


def find_leaks(sources: Iterable[tuple[str, str]], needles: Mapping[str, str]) -> list[str]:
    """Where any needle occurs, as "<needle name> in <source>: <context, needles as ***>"."""
    ordered = sorted(((n, v) for n, v in needles.items() if v), key=lambda nv: -len(nv[1]))
    values = [v for _, v in ordered]
    found: list[str] = []
    for source, text in sources:
        masked = text  # a needle found is masked, so its own substrings are not reported again
        for name, value in ordered:
            at = masked.find(value)
            while at >= 0:
                found.append(
                    f"{name}, in {source!r}: {_redacted_context(text, at, at + len(value), values)}"
                )
                masked = masked[:at] + "\0" * len(value) + masked[at + len(value) :]
                at = masked.find(value, at + len(value))
    return found


def check(
    capture: Capture,
    launched: list[Launched],
    tokens: Mapping[str, str],
    expected: Mapping[str, Iterable[str]],
) -> None:
    """The capture worked, the search works on it, and no secret or token is in it."""
    # 1. the capture holds what it must
    missing = [
        f"{text!r} in {prefix!r}"
        for prefix, texts in expected.items()
        for text in texts
        if text not in capture.text(prefix)
    ]
    assert not missing, (
        f"the capture lacks: {missing}; sources: {sorted({s for s, _ in capture.sources})}"
    )
    assert any("flame runner" in t for s, t in capture.sources if s.startswith("cmdline:")), (
        "no runner command line was captured"
    )
    assert launched, "no runner secret was recorded"
    assert all(len(item.secret) == 32 for item in launched)

    needles: dict[str, str] = {}
    for item in launched:
        needles.update(secret_needles(item))
    for name, token in tokens.items():
        needles.update(token_needles(name, token))
    values = list(needles.values())

    # 2. the search finds each kind of needle planted in the real captured text
    source, text = max(capture.sources, key=lambda st: len(st[1]))
    plants = list(secret_needles(launched[0]).values())
    plants += [item.secret.hex() for item in launched[1:]]
    plants += list(tokens.values())
    plants += [f"Authorization: Bearer {token}" for token in tokens.values()]
    plants += truncations(launched[0])
    for plant in plants:
        middle = len(text) // 2
        planted = f"{text[:middle]} {plant}\n{text[middle:]}"
        got = find_leaks([(f"{source} (with a planted needle)", planted)], needles)
        assert got, f"the search misses planted needle number {plants.index(plant)}"
        assert not any(v in report for report in got for v in values), "a report repeats a needle"

    # 3. nothing leaked
    leaks = find_leaks(capture.sources, needles)
    assert not leaks, (
        f"secret material in {len(leaks)} place(s) (needles shown as ***):\n" + "\n".join(leaks)
    )


# -- the search itself -----------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_the_search_finds_every_form_and_never_repeats_it() -> None:
    secret = os.urandom(32)
    info = LaunchInfo(
        runner_id="sl-self-check-1",
        secret=secret,
        addresses=(("127.0.0.1", 4000),),
        pool="sl-self-check",
        backend="process",
    )
    launched = Launched(info.runner_id, info.encode(), secret)
    token = new_token()
    needles = {**secret_needles(launched), **token_needles("API token", token)}
    values = list(needles.values())
    value = launched.value
    forms = {
        "hex": secret.hex(),
        "upper-case hex": secret.hex().upper(),
        "half the hex": secret.hex()[:40],
        "base64": base64.b64encode(secret).decode(),
        "urlsafe base64": base64.urlsafe_b64encode(secret).decode(),
        "repr": repr(secret),
        "FLAME_PARENT": f"FLAME_PARENT={value}",
        "truncated FLAME_PARENT": truncations(launched)[0],
        "FLAME_PARENT without its head": truncations(launched)[1],
        "FLAME_PARENT base64-encoded": base64.b64encode(value.encode()).decode(),
        "json": json.dumps({"secret": secret.hex()}),
        "token": f"Authorization: Bearer {token}",
        "token, base64-encoded": base64.b64encode(f"{token}".encode()).decode(),
        "token's random part": token[4:],
    }
    clean = "INFO flame pool 'x': runner 'x-1-abc' up in 0.31s\n" * 50
    assert find_leaks([("clean", clean)], needles) == []
    for form, leak in forms.items():
        text = f"{clean}WARNING something happened: {leak} (end)\n{clean}"
        got = find_leaks([("a log", text)], needles)
        assert got, f"the search misses the {form}"
        assert all(report.startswith(("runner sl-self-check-1:", "the ")) for report in got)
        assert all("in 'a log'" in report and "***" in report for report in got)
        assert any("something happened" in report for report in got)  # the context is shown
        for report in got:
            for v in values:
                assert v not in report, f"the report for the {form} repeats a needle"


# -- ProcessBackend --------------------------------------------------------------------------------
@pytest.mark.timeout(40)
def test_process_backend_run_leaks_no_secret(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    capture = Capture()
    rec = BootRecorder(capture)
    marker = f"sl-marker-{os.urandom(4).hex()}"
    with capturing(capture, capfd):
        pool = flame.Pool(
            "sl-process",
            max=1,
            backend=rec.wrap(flame.ProcessBackend()),
            **POOL_OPTIONS,
            **hooks(capture),
        )
        full_run(pool, capture, marker, tmp_path)
        bad_app = failed_boot(
            capture,
            "an app whose import raises",
            flame.Pool(
                "sl-process-bad-app",
                max=1,
                backend=rec.wrap(flame.ProcessBackend(app="helpers.runner.bad_app")),
                **POOL_OPTIONS,
                **hooks(capture),
            ),
        )
        no_python = failed_boot(
            capture,
            "a missing interpreter",
            flame.Pool(
                "sl-process-no-python",
                min=1,
                max=1,
                backend=rec.wrap(flame.ProcessBackend(python=str(tmp_path / "no-python"))),
                **POOL_OPTIONS,
            ),
            start=True,
        )
        wrong_secret = failed_boot(
            capture,
            "a runner given another secret",
            flame.Pool(
                "sl-process-forged",
                min=1,
                max=1,
                backend=rec.wrap(
                    flame.ProcessBackend(),
                    tamper=lambda info: dataclasses.replace(info, secret=os.urandom(32)),
                ),
                **POOL_OPTIONS,
            ),
            start=True,
        )
        rec.describe_all("at the end")
    assert "bad_app_marker" in bad_app
    assert "no-python" in no_python
    assert "handshake" in wrong_secret
    check(
        capture,
        rec.launched,
        {},
        {
            "fd 1": [f"{marker} on the runner's stdout"],
            "fd 2": [
                f"{marker} on the runner's stderr",
                f"{marker} in a runner-side log record",
            ],
            # what a runner wrote before it connected is in the error message's tail
            "handle diagnostics of sl-process-bad-app": ["bad_app_marker"],
            "log:flame": [" up in ", "sl-process-bad-app", "sl-process-forged"],
            "exception:a runner SIGKILLed mid-call": ["RunnerLost", "SIGKILL"],
            "exception:a call that raises": [f"{marker}: raised on the runner on purpose"],
            "exception:a call that times out": ["CallTimeout"],
            "exception:on_grow_end": ["bad_app_marker"],
            "repr:pool mid-call": ["in_flight=1"],
            "runner's view": ["sl-process"],
        },
    )
    assert len(rec.launched) == 5  # the full run, bad app, no python, forged (twice: both secrets)


# -- FlyBackend on the emulator --------------------------------------------------------------------
@pytest.fixture
def fly_token() -> str:
    return new_token()


@pytest.fixture
def fly(fly_token: str) -> Iterator[Any]:
    from flame.testing.fly import FlyMachinesEmulator

    with FlyMachinesEmulator(token=fly_token, app=APP, extra_env=IMAGE_ENV) as emu:
        yield emu


def fly_backend(emu: Any, token: str, **options: Any) -> flame.Backend:
    return flame.FlyBackend(
        host=emu.url,
        token=token,
        app=APP,
        image=IMAGE,
        advertise_host="127.0.0.1",
        cpus=1,
        retry_backoff=0.01,
        **options,
    )


def capture_fly_emulator(capture: Capture, emu: Any) -> None:
    """What the platform shows: machine logs, commands and the request log (not configs)."""
    capture.add_object("Fly emulator", emu)
    for machine in emu.machines():
        capture.add(f"emulator:fly logs of machine {machine.id}", emu.logs(machine.id))
        capture.add(f"cmdline:emulated machine {machine.id}", " ".join(machine.argv or ()))
    for request in emu.requests:
        capture.add("emulator:request log", repr(request))


@pytest.mark.timeout(40)
def test_fly_backend_run_leaks_no_secret_or_token(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, fly: Any, fly_token: str
) -> None:
    capture = Capture()
    rec = BootRecorder(capture)
    marker = f"sl-marker-{os.urandom(4).hex()}"
    wrong = new_token()
    with capturing(capture, capfd):
        fly.fail_next_creates(429, message="sl rate limited", retry_after=0)  # logged retry
        pool = flame.Pool(
            "sl-fly",
            max=1,
            backend=rec.wrap(fly_backend(fly, fly_token)),
            **POOL_OPTIONS,
            **hooks(capture),
        )
        full_run(pool, capture, marker, tmp_path)
        bad_app = failed_boot(
            capture,
            "an app whose import raises",
            flame.Pool(
                "sl-fly-bad-app",
                max=1,
                backend=rec.wrap(fly_backend(fly, fly_token, app_module="helpers.runner.bad_app")),
                **POOL_OPTIONS,
                **hooks(capture),
            ),
        )
        fly.fail_next_creates(400, message="sl injected create failure")
        refused = failed_boot(
            capture,
            "the API refusing a create",
            flame.Pool(
                "sl-fly-refused",
                min=1,
                max=1,
                backend=rec.wrap(fly_backend(fly, fly_token)),
                **POOL_OPTIONS,
            ),
            start=True,
        )
        wrong_token = failed_boot(
            capture,
            "a wrong token",
            flame.Pool(
                "sl-fly-wrong-token",
                max=1,
                backend=rec.wrap(fly_backend(fly, wrong)),
                **POOL_OPTIONS,
                **hooks(capture),
            ),
        )
        rec.describe_all("at the end")
        capture_fly_emulator(capture, fly)
    assert "importing the application raised" in bad_app
    assert "HTTP 400: sl injected create failure" in refused
    assert "401" in wrong_token
    assert any(not r.authorized for r in fly.requests)
    check(
        capture,
        rec.launched,
        {"Fly API token": fly_token, "wrong Fly API token": wrong},
        {
            # the runners' output comes through their connections; a runner that never
            # connected left its output in the platform's logs
            "fd 1": [f"{marker} on the runner's stdout"],
            "fd 2": [f"{marker} on the runner's stderr"],
            "emulator:fly logs": ["bad_app_marker"],
            "log:flame": [" up in ", "sl-fly-bad-app"],
            "log:flame.fly": ["sl rate limited", "retrying", "destroyed machine"],
            "log:httpx": ["HTTP Request: POST", "401 Unauthorized"],
            "log:httpcore": ["send_request_headers"],
            "exception:a runner SIGKILLed mid-call": ["RunnerLost"],
            "exception:a call that raises": [f"{marker}: raised on the runner on purpose"],
            "exception:a wrong token": ["401", "unauthorized"],
            "emulator:request log": ["FLAME_PARENT", "<redacted>"],
            "repr:fly backend": ["token=<hidden>"],
            "runner's view": ["sl-fly"],
        },
    )


# -- KubernetesBackend on the emulator -------------------------------------------------------------
@pytest.fixture
def k8s_token() -> str:
    return new_token()


@pytest.fixture
def k8s(k8s_token: str) -> Iterator[Any]:
    from flame.testing.kubernetes import KubernetesAPIEmulator

    with KubernetesAPIEmulator(token=k8s_token, env=IMAGE_ENV) as emu:
        emu.add_parent_pod(PARENT_POD)
        yield emu


def k8s_backend(kubeconfig: str | Path, **options: Any) -> flame.Backend:
    return flame.KubernetesBackend(
        kubeconfig=kubeconfig,
        pod_name=PARENT_POD,
        listen_host="127.0.0.1",
        advertise_host="127.0.0.1",
        **options,
    )


def capture_k8s_emulator(capture: Capture, emu: Any) -> None:
    """What the platform shows: container logs (``kubectl logs``) and the request log."""
    capture.add_object("Kubernetes emulator", emu)
    logs = sorted(glob.glob(os.path.join(os.path.dirname(emu.kubeconfig), "*.log")))
    assert logs, "the emulator's container logs were not found"
    for path in logs:
        capture.add(f"emulator:kubectl logs {os.path.basename(path)}", Path(path).read_text())
    capture.add("emulator:request log", repr(emu.calls))


@pytest.mark.timeout(40)
def test_kubernetes_backend_run_leaks_no_secret_or_token(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, k8s: Any, k8s_token: str
) -> None:
    capture = Capture()
    rec = BootRecorder(capture)
    marker = f"sl-marker-{os.urandom(4).hex()}"
    wrong = new_token()
    config = json.loads(Path(k8s.kubeconfig).read_text())
    config["users"][0]["user"]["token"] = wrong
    wrong_config = tmp_path / "wrong-kubeconfig"
    wrong_config.write_text(json.dumps(config))
    with capturing(capture, capfd):
        k8s.forbid("patch", "secrets", times=1)  # a logged warning naming the Secret
        pool = flame.Pool(
            "sl-k8s",
            max=1,
            backend=rec.wrap(k8s_backend(k8s.kubeconfig)),
            **POOL_OPTIONS,
            **hooks(capture),
        )
        full_run(pool, capture, marker, tmp_path)
        bad_app = failed_boot(
            capture,
            "an app whose import raises",
            flame.Pool(
                "sl-k8s-bad-app",
                max=1,
                backend=rec.wrap(k8s_backend(k8s.kubeconfig, app="helpers.runner.bad_app")),
                **POOL_OPTIONS,
                **hooks(capture),
            ),
        )
        k8s.forbid("create", "pods", times=1)  # after the runner's Secret was created
        refused = failed_boot(
            capture,
            "the API refusing a create",
            flame.Pool(
                "sl-k8s-refused",
                min=1,
                max=1,
                backend=rec.wrap(k8s_backend(k8s.kubeconfig)),
                **POOL_OPTIONS,
            ),
            start=True,
        )
        wrong_token = failed_boot(
            capture,
            "a wrong token",
            flame.Pool(
                "sl-k8s-wrong-token",
                max=1,
                backend=rec.wrap(k8s_backend(wrong_config)),
                **POOL_OPTIONS,
                **hooks(capture),
            ),
        )
        rec.describe_all("at the end")
        capture_k8s_emulator(capture, k8s)
    assert "bad_app_marker" in bad_app  # the tail of the Pod's log
    assert "403 Forbidden" in refused
    assert "401 Unauthorized" in wrong_token
    check(
        capture,
        rec.launched,
        {"Kubernetes API token": k8s_token, "wrong Kubernetes API token": wrong},
        {
            "fd 1": [f"{marker} on the runner's stdout"],
            "fd 2": [f"{marker} on the runner's stderr"],
            "emulator:kubectl logs": ["bad_app_marker"],
            "log:flame": [" up in ", "sl-k8s-bad-app"],
            "log:flame.backends.kubernetes": ["stays owned by the parent Pod"],
            "log:httpx2": ["HTTP Request: POST", "401 Unauthorized"],
            "log:httpcore2": ["send_request_headers"],
            "exception:a runner SIGKILLed mid-call": ["RunnerLost"],
            "exception:a call that raises": [f"{marker}: raised on the runner on purpose"],
            "exception:a wrong token": ["401 Unauthorized"],
            "exception:an app whose import raises": ["bad_app_marker"],
            "emulator:request log": ["('create', 'secrets')"],
            "runner's view": ["sl-k8s"],
        },
    )
