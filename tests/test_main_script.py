"""A script run as ``__main__`` (SPEC "Booting the application on a runner").

The runner imports the parent's main script under another name, so its
``if __name__ == "__main__":`` block does not run there; a lambda or closure written in the
script finds the *runner's own* module-level objects (a lock, a socket) by name, and only the
globals the runner's import cannot have (bound under the main guard) travel by value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import assert_pids_gone

SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import socket
    import threading

    import flame

    LOCK = threading.Lock()
    SOCK = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    IMPORTED_AS = __name__
    SETTING = "from the import"
    MARKER = os.environ["MAIN_MARKER"]


    def top_level():
        return IMPORTED_AS, flame.parent() is not None


    if __name__ == "__main__":
        with open(MARKER, "a") as f:
            f.write(f"main block ran in {os.getpid()}\\n")
        GUARDED = {"answer": 41}
        SETTING = "set under the main guard"
        SOCK.bind(("127.0.0.1", 0))
        LOCK.acquire()  # held here for good: the runner's LOCK must be another one

        def probe():
            free = LOCK.acquire(blocking=False)
            if free:
                LOCK.release()
            return {
                "pid": os.getpid(),
                "lock_free": free,
                "sock": list(SOCK.getsockname()),
                "sock_open": SOCK.fileno() >= 0,
                "guarded": GUARDED["answer"] + 1,
                "setting": SETTING,
                "imported_as": IMPORTED_AS,
                "in_runner": flame.parent() is not None,
            }

        def make_closure(n):
            def closure(k):
                with LOCK:  # would deadlock if this were the parent's (held) lock
                    return n * k + GUARDED["answer"]

            return closure

        with flame.Pool("script", max=1, backend="process", idle_shutdown_after=None) as pool:
            results = {
                "probe": pool.call(probe),
                "lambda": pool.call(lambda x: (x, LOCK.locked(), GUARDED["answer"]), 7),
                "closure": pool.call(make_closure(10), 3, timeout=10),
                "top_level": list(pool.call(top_level)),
                "mutated": pool.call(lambda: GUARDED.update(answer=0) or GUARDED["answer"]),
            }
            results["guarded_after"] = GUARDED["answer"]
            results["home"] = {"pid": os.getpid(), "sock": list(SOCK.getsockname())}
            print("RESULT " + json.dumps(results), flush=True)
        SOCK.close()
    """
)


@pytest.mark.timeout(60)
def test_script_run_as_main_uses_the_runners_own_module_objects(tmp_path: Path) -> None:
    script = tmp_path / "app_script.py"
    script.write_text(SCRIPT)
    marker = tmp_path / "main-block-runs"
    env = dict(os.environ, MAIN_MARKER=str(marker))
    env.pop("FLAME_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    r = json.loads(lines[0].removeprefix("RESULT "))

    home, probe = r["home"], r["probe"]
    assert probe["pid"] != home["pid"]
    assert probe["in_runner"] is True
    # the lock and the socket are the runner's own copies, made by its own import
    assert probe["lock_free"] is True, "the runner saw the parent's (held) lock"
    assert probe["sock_open"] is True
    assert probe["sock"] == ["0.0.0.0", 0], "the runner's socket should be its own, unbound"
    assert home["sock"][0] == "127.0.0.1" and home["sock"][1] > 0
    # the runner imported the script under another name, so its main block did not run there
    assert probe["imported_as"] == "__mp_main__"
    assert marker.read_text().splitlines() == [f"main block ran in {home['pid']}"]
    # a global bound only under the main guard travels by value...
    assert probe["guarded"] == 42
    assert r["lambda"] == [7, False, 41]
    assert r["closure"] == 10 * 3 + 41
    # ...while a name the import binds is the runner's own value (as with multiprocessing)
    assert probe["setting"] == "from the import"
    # functions defined at the top of the script are found by reference on the runner
    assert r["top_level"] == ["__mp_main__", True]
    # the runner mutated its copy of the shipped global, not ours
    assert r["mutated"] == 0
    assert r["guarded_after"] == 41

    assert_pids_gone([probe["pid"]], 10)
