"""A Compose-deployed app whose flame runners are containers of its own image.

``docker compose up --build`` starts this script in the ``app`` service. Its pool's
``DockerBackend()`` needs no options: the parent finds its own container through the
engine's socket (mounted in ``compose.yaml``), and each runner is a container of the very
same image, on the same Compose network, that dials the parent's address there. Runners
import this file as the app (``/app/app.py``, the same path in the same image), so
``CHUNK`` below is the runner's own, and the ``__main__`` block runs only in the parent.
"""

from __future__ import annotations

import hashlib
import os
import socket

import flame

CHUNK = 1 << 20  # module-level state: each runner has its own copy

pool = flame.Pool(
    "hashes",
    max=int(os.environ.get("RUNNERS", "2")),
    max_concurrency=2,
    backend=flame.DockerBackend(cpus=1, memory_mb=256, env={"CHUNK_NOTE": "from the parent"}),
)


def digest(seed: int) -> tuple[str, str]:
    """Hash ``seed`` many megabytes of zeros: (the runner's host name, hex digest)."""
    h = hashlib.sha256()
    block = bytes(CHUNK)
    for _ in range(seed):
        h.update(block)
    return socket.gethostname(), h.hexdigest()[:16]


if __name__ == "__main__" and not flame.parent():
    with pool:
        seeds = range(1, 7)
        for seed, (runner, hexdigest) in zip(seeds, pool.map(digest, seeds), strict=True):
            print(f"{seed} MiB -> {hexdigest} (runner container {runner})", flush=True)
    print("done", flush=True)
