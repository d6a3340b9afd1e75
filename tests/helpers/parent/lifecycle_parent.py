"""A parent process for the link tests: it starts a pool, puts linked and unlinked work on
one runner, reports the runner's pid, and waits to be killed.

usage: python lifecycle_parent.py WORKDIR SHUTDOWN_TIMEOUT UNLINKED_SECONDS
"""

import os
import sys
import time

import flame
from helpers.runner import wire_work as work

if __name__ == "__main__":
    workdir, shutdown_timeout, unlinked = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    flame.configure(heartbeat_interval=0.2, heartbeat_timeout=1.0, cancel_grace=0.5)
    pool = flame.Pool(
        "linked", max=1, max_concurrency=2, backend="process", shutdown_timeout=shutdown_timeout
    )
    pool.start()
    pid, _ = pool.call(work.whoami)
    with open(os.path.join(workdir, "runner.pid"), "w") as f:
        f.write(str(pid))
    pool.cast(work.timed, workdir, "linked", 60.0, link=True)
    pool.cast(work.timed, workdir, "unlinked", unlinked, link=False)
    while True:  # until killed
        time.sleep(1)
