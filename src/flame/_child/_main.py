"""Entry point of a runner process: ``python -m flame runner``.

Order matters: decode ``FLAME_PARENT`` (never a pickle), arm the failsafe (the process exits
if it has not reached and authenticated with its parent in time, import included), adopt the
parent's ``sys.path`` and working directory when the backend asked for it, make
``flame.parent()`` answer, import the application (the parent's main module under the name
``__mp_main__``, aliased as ``__main__``, as multiprocessing's spawn does), then serve.

The process always ends through ``os._exit`` with an :class:`ExitCode`, so neither a
non-daemon thread of the app nor a stuck call can keep a runner alive.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
import traceback

from .._exits import ExitCode
from .._parent import (
    CalledWhileImporting,
    LaunchInfo,
    Parent,
    _set_current,
    importing_app,
)
from ._output import OutputCapture, line_buffered

#: the runner's stdout and stderr, caught for its parent (``Pool(forward_output=True)``)
_capture: OutputCapture | None = None


def _exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if _capture is not None:  # what was not sent goes to the original fd 1 and 2
            _capture.restore()
    finally:
        os._exit(code)


def _arm_failsafe(seconds: float, connected: threading.Event, runner_id: str) -> None:
    def watch() -> None:
        if not connected.wait(seconds):
            try:  # stderr may be a broken pipe by now (a dead parent): exit all the same
                print(
                    f"flame runner {runner_id}: did not reach its parent within the failsafe "
                    f"time ({seconds:g}s); exiting",
                    file=sys.stderr,
                )
            finally:
                _exit(ExitCode.FAILSAFE)

    threading.Thread(target=watch, name="flame-failsafe", daemon=True).start()


def import_app(app: dict[str, str] | None) -> None:
    """Import the application described by ``app`` (see ``Backend.runner_app``)."""
    if not app:
        return
    if "module" in app:
        importlib.import_module(app["module"])
        return
    if "main_module" in app:
        name = app["main_module"]
        found = importlib.util.find_spec(name)
        if found is None or not found.origin or not found.has_location:
            raise ImportError(f"cannot find the app module {name!r}")
        loader = importlib.machinery.SourceFileLoader("__mp_main__", found.origin)
        spec = importlib.util.spec_from_loader("__mp_main__", loader, origin=found.origin)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        module.__file__ = found.origin
        module.__package__ = name.rpartition(".")[0]  # relative imports keep working
    else:
        path = app.get("main_path") or app["path"]
        loader = importlib.machinery.SourceFileLoader("__mp_main__", path)
        spec = importlib.util.spec_from_loader("__mp_main__", loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        module.__file__ = path
    sys.modules["__mp_main__"] = module
    sys.modules["__main__"] = module
    assert spec.loader is not None
    spec.loader.exec_module(module)


def main() -> None:
    global _capture
    started = time.monotonic()
    line_buffered()
    try:
        info = LaunchInfo.from_environ()
    except ValueError as exc:
        print(f"flame runner: {exc}", file=sys.stderr)
        _exit(ExitCode.BAD_ENV)
        return
    if info.forward_output:  # from now on: what the app prints at import is caught too
        _capture = OutputCapture()
    # the secret is in our environment; our children need not inherit it
    os.environ.pop("FLAME_PARENT", None)
    connected = threading.Event()
    _arm_failsafe(info.failsafe, connected, info.runner_id)
    if info.cwd:
        try:
            os.chdir(info.cwd)
        except OSError as exc:
            print(f"flame runner: cannot enter {info.cwd!r}: {exc}", file=sys.stderr)
    if info.sys_path is not None:
        sys.path[:] = list(info.sys_path)
    _set_current(
        Parent(
            runner_id=info.runner_id,
            pool=info.pool,
            backend=info.backend,
            addresses=info.addresses,
        ),
        info.app,
    )
    try:
        with importing_app:
            import_app(info.app)
    except CalledWhileImporting:  # the parent tells the user, in one line
        _exit(ExitCode.NO_MAIN_GUARD)
        return
    except BaseException:
        print(
            f"flame runner {info.runner_id}: importing the application failed:\n"
            + traceback.format_exc(),
            file=sys.stderr,
        )
        _exit(ExitCode.APP_FAILED)
        return

    from ._runtime import serve

    try:
        code = asyncio.run(serve(info, started, connected.set, _capture))
    except BaseException:
        traceback.print_exc()
        code = ExitCode.INTERNAL
    _exit(code)
