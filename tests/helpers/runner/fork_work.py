"""Work that runs on runners in ``test_fork_server``, and modules it preloads.

``whereami()`` describes the runner process as the kernel shows it. The ``preload_*``
modules are what ``ProcessBackend(preload=[...])`` imports in the fork server: one that
notes where it was imported, one that starts a thread, one that calls a pool at import.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def whereami() -> dict[str, Any]:
    """The runner's pid, parent, session, command line and initial environment, and the pid
    of the process that imported ``helpers.runner.fork_preload_marker`` (if it was preloaded)."""
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read()
    with open("/proc/self/environ", "rb") as f:
        environ = f.read()
    marker = sys.modules.get("helpers.runner.fork_preload_marker")
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "cmdline": cmdline.split(b"\0")[:-1],
        "flame_parent_in_environ": b"FLAME_PARENT=" in environ,
        "flame_parent_now": os.environ.get("FLAME_PARENT"),
        "zygote_fd_var": os.environ.get("FLAME_ZYGOTE_FD"),
        "preloaded_in": getattr(marker, "IMPORTED_IN", None),
        "env": {k: v for k, v in os.environ.items() if k.startswith("FLAME_TEST_")},
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    }


def say(text: str) -> None:
    print(text, flush=True)
    print(text, file=sys.stderr, flush=True)


def die(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), 9)
    os._exit(int(how))
