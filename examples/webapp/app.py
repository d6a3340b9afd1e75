"""A FastAPI app with a light endpoint and a CPU-heavy one, the heavy one served three ways.

* ``/heavy/async/{n}``: the work inline in an ``async def`` endpoint. It runs on the event
  loop, and nothing else is served until it is done.
* ``/heavy/thread/{n}``: the work inline in a ``def`` endpoint, which FastAPI runs on its
  thread pool. The loop stays free, but the work holds the GIL most of the time.
* ``/heavy/flame/{n}``: ``await flame.acall(...)`` to a warm ``ProcessBackend`` pool. The
  work runs in runner processes; this process only waits for the answer.

``/light`` answers at once; ``load.py`` measures how long it takes while heavy requests run.
``WEBAPP_RUNNERS`` sets the pool's size (default: this machine's core count).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from work import crunch

import flame

RUNNERS = int(os.environ.get("WEBAPP_RUNNERS") or os.cpu_count() or 2)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # warm: every runner is booted before the server takes requests, and none idles away
    async with flame.Pool(
        "heavy",
        min=RUNNERS,
        max=RUNNERS,
        max_concurrency=8,
        idle_shutdown_after=None,
        backend="process",
    ) as pool:
        app.state.pool = pool
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/light")
async def light() -> dict[str, bool]:
    return {"ok": True}


@app.get("/heavy/async/{n}")
async def heavy_async(n: int) -> dict[str, int]:
    return {"total": crunch(n)}  # blocks the event loop


@app.get("/heavy/thread/{n}")
def heavy_thread(n: int) -> dict[str, int]:
    return {"total": crunch(n)}  # on the thread pool, competing for the GIL


@app.get("/heavy/flame/{n}")
async def heavy_flame(request: Request, n: int) -> dict[str, int]:
    return {"total": await flame.acall(request.app.state.pool, crunch, n, timeout=120)}
