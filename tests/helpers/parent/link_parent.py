"""A parent process for the link tests, to be SIGKILLed by the test: it puts linked and
unlinked casts and children (``helpers.runner.pool_work``) on one runner.

usage: python -c "import sys; from helpers.parent.link_parent import main as m; m(sys.argv[1], 1.0)"
"""

from __future__ import annotations

import time
from pathlib import Path

import flame
from helpers.runner.pool_work import Counter, Writer, mark, write_after

LINK_WORK = ("unlinked-cast", "linked-cast", "unlinked-child", "linked-child")


def main(workdir: str, seconds: float) -> None:
    """Run as a separate parent process, to be SIGKILLed by the test.

    Starts, on one runner, a cast and a placed child with ``link=False`` and the same with
    ``link=True``; each writes ``<name>.started`` at once and ``<name>.done`` after
    ``seconds``. Also places a linked child without ``run()`` (a ``Counter``) whose
    ``close()`` writes ``linked-counter.closed``. Once all have started, writes the runner's
    pid to ``ready`` and waits. A long cancel grace makes a runner that waits for it stand out.
    """
    d = Path(workdir)
    flame.configure(cancel_grace=30.0)
    pool = flame.Pool(
        "link-parent",
        max=1,
        max_concurrency=5,
        backend=flame.ProcessBackend(),
        shutdown_timeout=10,
        idle_shutdown_after=None,
    )
    pool.start()

    def paths(name: str) -> tuple[str, str]:
        return str(d / f"{name}.done"), str(d / f"{name}.started")

    done, started = paths("unlinked-cast")
    pool.cast(write_after, done, seconds, started, link=False)
    done, started = paths("linked-cast")
    pool.cast(write_after, done, seconds, started, link=True)
    done, started = paths("unlinked-child")
    pool.place_child(Writer, done, seconds, started, link=False)
    done, started = paths("linked-child")
    pool.place_child(Writer, done, seconds, started, link=True)
    pool.place_child(Counter, 0, str(d / "linked-counter.closed"), link=True)
    deadline = time.monotonic() + 30
    while not all((d / f"{name}.started").exists() for name in LINK_WORK):
        if time.monotonic() > deadline:
            raise SystemExit("the work never started")
        time.sleep(0.01)
    pids = {(d / f"{name}.started").read_text() for name in LINK_WORK}
    assert len(pids) == 1, pids
    mark(str(d / "ready"), pids.pop())
    while True:  # until the test kills us
        time.sleep(1)
