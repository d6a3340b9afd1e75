"""Work that runs *on runners* in ``test_secrets_in_logs``.

Pickled by reference, so a runner (a local process, an emulated Fly machine or Pod) imports
this light module through the parent's ``sys.path``. Each function leaves a trace in every
place a runner can write to (stdout, stderr, the runner's own logging), so that the test can
check that its capture of those places works, and reports what the runner shows about itself.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def chatter(marker: str) -> dict[str, Any]:
    """Write ``marker`` to stdout, stderr and a runner-side log record; describe the runner."""
    import flame

    print(f"{marker} on the runner's stdout", flush=True)
    print(f"{marker} on the runner's stderr", file=sys.stderr, flush=True)
    # no handler on the runner: logging's last resort writes WARNING records to stderr
    logging.getLogger("flame.test").warning("%s in a runner-side log record", marker)
    sys.stderr.flush()
    p = flame.parent()
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    return {
        "pid": os.getpid(),
        "parent_repr": repr(p),
        "parent_str": str(p),
        "parent_vars": repr(vars(p)) if p is not None else "",
        "cmdline": cmdline,
        "flame_parent_env": repr(os.environ.get("FLAME_PARENT")),
    }


class MarkedError(Exception):
    """What :func:`fail` raises on the runner (re-raised as itself in the caller)."""


def fail(marker: str) -> None:
    raise MarkedError(f"{marker}: raised on the runner on purpose")
