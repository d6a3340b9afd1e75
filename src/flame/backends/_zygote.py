"""``ProcessBackend``'s fork server: a process that has imported flame once and forks runners.

A runner spawned afresh spends most of its boot importing flame and its dependencies. The
fork server (the "zygote", ``python -m flame zygote``) pays that once: it is started with
the runners' own interpreter, environment and working directory, imports the runner's
modules and whatever the backend was asked to ``preload``, freezes what it has for the
garbage collector, and then forks one child per runner on request. The child becomes a
runner exactly where ``python -m flame runner`` would have started: a new session, fd 0 on
``/dev/null``, fd 1 and 2 on the descriptors the parent sent along, ``FLAME_PARENT`` (and
whatever else the launch sets for this runner alone) set in its environment from the
request, never from a command line, and its command line
renamed from ``zygote`` to ``runner``, so that ``ps`` (and the test suite's leak checks) see
a runner.

Both ends of the server's protocol live here: :class:`ForkServer` (the parent's side, one per
interpreter, environment, working directory and preload list, shared by every pool of the
process) and :func:`main` (the zygote). They talk over one ``AF_UNIX`` ``SOCK_SEQPACKET``
socket pair, one JSON object per message, descriptors passed alongside (``SCM_RIGHTS``):

==========  ==================================================================================
parent      ``{"sys_path": [...], "preload": [...]}`` once; then ``{"fork": id, "env": {...}}``
            (``FLAME_PARENT`` and the launch's other variables for this runner) with
            the runner's stdout and stderr (one descriptor for both, or two).
zygote      ``{"ready": pid}`` or ``{"failed": why}`` (then it exits); ``{"forked": id, "pid":
            pid}`` with a pidfd of the child, or ``{"refused": id, "why": ...}``; and
            ``{"exited": pid, "code": code}`` once it has reaped a child (negative: killed by
            that signal).
==========  ==================================================================================

The runners are the zygote's children, not the parent's, so the parent cannot ``waitpid``
them: their exit statuses come from the zygote, and the parent signals them through their
pidfds, which can never reach a recycled pid. The zygote exits when its socket closes (the
parent exited, was killed, or forked and closed its copy); runners it forked live on until
their own connections end, as before. If the zygote dies first, the parent still notices
each runner's end (its pidfd), but no longer its exit status.

Forking is only done where it is safe: Linux with pidfds (``os.pidfd_open``, 5.3+), a zygote
with a single thread at the time of each fork (a preloaded module that starts a thread,
even a C library's, makes the zygote refuse, and runners are spawned instead), and a
preload that does not call a pool while it is imported.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import gc
import importlib
import itertools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

from .. import _lifecycle
from .._exits import ExitCode

logger = logging.getLogger("flame")

#: the environment variable that tells the zygote which descriptor its socket is (it removes
#: it from its environment at once, so runners never see it)
FD_VAR = "FLAME_ZYGOTE_FD"
_MAX_MESSAGE = 1 << 20  # FLAME_PARENT carries sys.path: generous
_MAX_SERVERS = 4  # fork servers alive at once (one per environment, cwd, preload list)
#: what a runner imports after ``flame._child._main`` (measured: getaddrinfo's IDNA codec)
_RUNNER_MODULES = ("flame._child._main", "flame._child._runtime", "encodings.idna")


def supported() -> bool:
    """Whether runners can be forked here at all (Linux, with pidfds and SCM_RIGHTS)."""
    return (
        sys.platform == "linux"
        and hasattr(os, "fork")
        and hasattr(os, "pidfd_open")
        and hasattr(signal, "pidfd_send_signal")
        and hasattr(socket, "SOCK_SEQPACKET")
        and hasattr(socket, "SCM_RIGHTS")
    )


class Unavailable(Exception):
    """The fork server cannot start this runner (the reason is the message); spawn it."""


# -- the messages -------------------------------------------------------------------------------
def _send(sock: socket.socket, doc: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(doc, separators=(",", ":")).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and the descriptors that came with it; ``None`` once the peer is gone."""
    fds = array.array("i")
    data, ancillary, flags, _ = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(2 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError("a fork-server message was cut short")
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise OSError("a fork-server message is not a JSON object")
    return doc, list(fds)


# -- the parent's side --------------------------------------------------------------------------
class ForkedProcess:
    """A runner forked by the fork server, seen through the parts of ``subprocess.Popen``'s
    interface that the backend (and its tests) use: ``pid``, ``returncode``, ``stdout``,
    ``poll``, ``wait``, ``send_signal``, ``kill``, ``terminate``."""

    def __init__(self, pid: int, pidfd: int, stdout: BinaryIO | None) -> None:
        self.pid = pid
        self.stdout = stdout
        #: the exit code, once the zygote has reported it (negative: killed by that signal)
        self.returncode: int | None = None
        #: the runner is gone but its exit status is not known (the zygote died first)
        self.status_lost = False
        self._pidfd = pidfd
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._callbacks: list[Callable[[int | None], None]] = []

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the runner (through its pidfd: never another process that took its pid);
        nothing once it is gone."""
        with self._lock:
            if self._pidfd < 0:
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def on_exit(self, callback: Callable[[int | None], None]) -> None:
        """Call ``callback(returncode)`` (any thread) once the runner is gone; ``None`` if its
        status was lost. At once if it is gone already."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self.returncode)

    def _exited(self, code: int | None) -> None:
        """The zygote reaped it (``code``), or it is gone without a status (reader thread)."""
        with self._lock:
            if self._done.is_set():
                return
            self.returncode = code
            self.status_lost = code is None
            fd, self._pidfd = self._pidfd, -1
            _lifecycle.close_fd(fd)
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(code)

    def forsake(self) -> None:
        """In a child forked from the parent: close this process's copy of the pidfd."""
        _lifecycle.close_fd(self._pidfd)
        self._pidfd = -1


_Key = tuple[str, str, tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...]]


class ForkServer:
    """The parent's side of one zygote: starts it, asks it for runners, and hears of their
    ends. Its thread starts the zygote and then reads everything the zygote says."""

    def __init__(
        self,
        python: str,
        env: Mapping[str, str],
        cwd: str,
        sys_path: Sequence[str],
        preload: tuple[str, ...],
    ) -> None:
        self.python = python
        self.env = dict(env)
        self.cwd = cwd
        self.sys_path = list(sys_path)
        self.preload = preload
        #: "starting", "ready", then "failed" (it never became ready: sticky) or "gone"
        self.state = "starting"
        self.reason = ""
        self.pid: int | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[concurrent.futures.Future[ForkedProcess], Any]] = {}
        self._children: dict[int, ForkedProcess] = {}
        threading.Thread(target=self._run, name="flame-fork-server", daemon=True).start()

    def __repr__(self) -> str:
        return f"<ForkServer pid={self.pid} {self.state}>"

    @property
    def busy(self) -> bool:
        """Starting, or with runners alive: not to be closed to make room for another."""
        with self._lock:
            return self.state == "starting" or bool(self._children) or bool(self._pending)

    # -- asking for a runner (the event loop) -------------------------------------------------
    async def fork(self, env: Mapping[str, str], forward_output: bool) -> ForkedProcess:
        """A new runner, forked with ``env`` added to its environment (``FLAME_PARENT``, and
        any other variable of this runner's launch); its stdout and stderr go
        to a pipe (``ForkedProcess.stdout``) with ``forward_output``, else to ours. Raises
        :class:`Unavailable` if the zygote cannot do it."""
        await self._wait_ready()
        stdout: BinaryIO | None = None
        if forward_output:
            read, write = os.pipe()
            stdout = os.fdopen(read, "rb")  # the handle's pump owns it
            fds = [write]
        else:
            fds = [_fd_or_null(1), _fd_or_null(2)]
        future: concurrent.futures.Future[ForkedProcess] = concurrent.futures.Future()
        with self._lock:
            sock, request = self._sock, next(self._ids)
            if self.state != "ready" or sock is None:
                future.set_exception(Unavailable(self.reason or "the fork server is gone"))
            else:
                self._pending[request] = (future, stdout)
        try:
            if sock is not None and not future.done():
                _send(sock, {"fork": request, "env": dict(env)}, fds)
        except OSError as exc:
            with self._lock:
                self._pending.pop(request, None)
            future.set_exception(Unavailable(f"the fork server is gone ({exc})"))
        finally:
            for fd in fds:
                os.close(fd)
        if future.done() and future.exception() is not None and stdout is not None:
            stdout.close()
        # cancelled meanwhile (boot timeout, pool stopped): the reader kills what comes back
        return await asyncio.wrap_future(future)

    async def _wait_ready(self) -> None:
        """Until the zygote is ready; :class:`Unavailable` if it never will be. (Shielded: a
        cancelled boot must not cancel the readiness that every boot shares.)"""
        if not self._ready.done():
            waiting = asyncio.wrap_future(self._ready)
            waiting.add_done_callback(_quiet)
            await asyncio.shield(waiting)
        self._ready.result()

    # -- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        what = "it could not start"
        try:
            self._start()
            what = "it broke its protocol"  # the zygote is not to be trusted then
            self._read()
        except Exception as exc:
            self._fail(f"{what}: {type(exc).__name__}: {exc}")
        finally:
            self._gone()

    def _start(self) -> None:
        if self.state != "starting":
            raise Unavailable("it was closed before it started")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(self.env)
        env[FD_VAR] = str(theirs.fileno())
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "flame", "zygote"],
                env=env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        with self._lock:
            self._sock, self._proc, self.pid = ours, proc, proc.pid
        _send(ours, {"sys_path": self.sys_path, "preload": list(self.preload)})

    def _read(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                message = _recv(sock)
            except (ConnectionError, OSError) as exc:
                if self.state == "gone":  # closed by us
                    return
                raise OSError(str(exc)) from exc
            if message is None:
                return
            doc, fds = message
            if "exited" in doc:
                with self._lock:
                    child = self._children.pop(int(doc["exited"]), None)
                if child is not None:
                    child._exited(int(doc["code"]))
            elif "forked" in doc:
                self._forked(int(doc["forked"]), int(doc["pid"]), fds)
            elif "refused" in doc:
                with self._lock:
                    future, stdout = self._pending.pop(int(doc["refused"]), (None, None))
                if stdout is not None:
                    stdout.close()
                if future is not None:
                    with contextlib.suppress(concurrent.futures.InvalidStateError):
                        future.set_exception(Unavailable(str(doc.get("why", "refused"))))
            elif "ready" in doc:
                with self._lock:
                    ready = self.state == "starting"
                    if ready:
                        self.state = "ready"
                if not ready:  # closed while it started: let it go
                    return
                self._ready.set_result(None)
            elif "failed" in doc:
                self._fail(str(doc["failed"]))
            else:
                raise OSError(f"unexpected message {sorted(doc)}")

    def _forked(self, request: int, pid: int, fds: list[int]) -> None:
        if len(fds) != 1:
            raise OSError("a forked runner came without its pidfd")
        with self._lock:
            future, stdout = self._pending.pop(request, (None, None))
            child = ForkedProcess(pid, fds[0], stdout)
            self._children[pid] = child
        try:
            if future is None:
                raise concurrent.futures.InvalidStateError
            future.set_result(child)
        except concurrent.futures.InvalidStateError:  # nobody waits for it any more
            child.kill()
            if stdout is not None:
                stdout.close()

    def _fail(self, reason: str) -> None:
        with self._lock:
            first = self.state == "starting"
            if first:
                self.state, self.reason = "failed", reason
        if first:
            logger.warning(
                "flame: ProcessBackend's fork server is unavailable (%s); runners are "
                "started as new processes instead",
                reason,
            )
            self._ready.set_exception(Unavailable(reason))

    def _gone(self) -> None:
        """The zygote is gone, or to be: reap it, fail what waits, and keep watching its
        runners' pidfds."""
        with self._lock:
            sock, proc = self._sock, self._proc
        if sock is not None:
            sock.close()  # a zygote still running sees its socket close, and exits
        code = None
        if proc is not None:
            try:
                code = proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if self.state == "starting":
            self._fail(f"it exited with code {code} before it was ready")
        with self._lock:
            if self.state != "failed":
                self.state = "gone"
                self.reason = self.reason or "the fork server exited"
            pending, self._pending = self._pending, {}
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # closed while starting
            self._ready.set_exception(Unavailable(self.reason))
        for future, stdout in pending.values():
            if stdout is not None:
                stdout.close()
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(Unavailable(self.reason))
        self._watch_orphans()

    def _watch_orphans(self) -> None:
        """Runners whose zygote died: their ends are still seen, through their pidfds."""
        while True:
            with self._lock:
                children = {c._pidfd: c for c in self._children.values() if c._pidfd >= 0}
                self._children = {c.pid: c for c in children.values()}
            if not children:
                return
            poller = select.poll()
            for fd in children:
                poller.register(fd, select.POLLIN)
            try:
                ready = poller.poll(1000)  # a second at most: forget children gone meanwhile
            except OSError:
                continue
            for fd, _ in ready:
                child = children[fd]
                with self._lock:
                    self._children.pop(child.pid, None)
                child._exited(None)

    def close(self, wait: float = 0.0) -> None:
        """Close the zygote's socket: it exits (its runners live on); optionally reap it."""
        with self._lock:
            sock, proc = self._sock, self._proc
            if self.state in ("starting", "ready"):
                self.state, self.reason = "gone", "the fork server was closed"
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if proc is not None and wait > 0:
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def forsake(self) -> None:
        """In a child forked from the parent: let go of this zygote, touching nothing of it
        but this process's copies of its descriptors (the parent still uses it)."""
        sock = self._sock
        if sock is not None:
            _lifecycle.close_fd(sock.detach())
        for child in self._children.values():
            child.forsake()
        if self._proc is not None:
            self._proc.returncode = 0  # not ours to reap (no "still running" warning either)
        _lifecycle.bury(self)


def _quiet(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "never retrieved" log for a boot gone meanwhile


def _fd_or_null(fd: int) -> int:
    """A copy of ``fd`` to send, or of ``/dev/null`` if this process has no such descriptor."""
    try:
        return os.dup(fd)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY)


_servers_lock = threading.Lock()
_servers: dict[_Key, ForkServer] = {}


def server_for(
    python: str,
    env: Mapping[str, str],
    cwd: str,
    sys_path: Sequence[str],
    preload: tuple[str, ...],
) -> ForkServer | None:
    """The fork server for runners of this interpreter, environment (what every runner of
    the backend gets; ``FLAME_PARENT`` and the launch's other variables aside), working
    directory, ``sys.path`` (what the preload is imported with) and preload list, started
    on first use and shared by every pool of this process; ``None`` where none can be had
    (it failed to start, or too many others are busy): spawn then."""
    key: _Key = (python, cwd, tuple(sorted(env.items())), tuple(sys_path), preload)
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and server.state != "gone":
            return None if server.state == "failed" else server
        if server is None and len(_servers) >= _MAX_SERVERS:
            idle = [k for k, s in _servers.items() if not s.busy]
            if not idle:
                return None
            _servers.pop(idle[0]).close()
        server = ForkServer(python, env, cwd, sys_path, preload)
        _servers[key] = server
        return server


def close_all(wait: float = 2.0) -> None:
    """Close every fork server of this process (at exit; tests). Their runners live on."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close(wait)


def _after_fork() -> None:
    global _servers_lock
    for server in _servers.values():
        server.forsake()
    _servers.clear()
    _servers_lock = threading.Lock()


_lifecycle.on_fork(_after_fork)
_lifecycle.on_exit(close_all)


# -- the zygote ---------------------------------------------------------------------------------
def main() -> None:
    """``python -m flame zygote``: started by :class:`ForkServer`, never by hand."""
    raw = os.environ.pop(FD_VAR, "")
    if not raw.isdigit():
        sys.stderr.write("flame zygote: started by ProcessBackend, not by hand\n")
        raise SystemExit(2)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=int(raw))
    _Zygote(sock).serve()


class _Zygote:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.poller = select.poll()

    def serve(self) -> None:
        first = _recv(self.sock)
        if first is None:
            os._exit(0)
        doc = first[0]
        failure = _preload(doc.get("sys_path"), doc.get("preload", []))
        if failure:
            _send(self.sock, {"failed": failure})
            os._exit(1)
        import ctypes  # noqa: F401 - for _rename_as_runner, in every child

        gc.freeze()  # what is imported stays put: no collector pass dirties the shared pages
        try:
            self._loop()
        except OSError:  # the parent is gone (EPIPE, ECONNRESET): so are we
            os._exit(0)

    def _loop(self) -> None:
        _send(self.sock, {"ready": os.getpid()})
        self.poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            for fd, _ in self.poller.poll():
                if fd == self.sock.fileno():
                    message = _recv(self.sock)
                    if message is None:  # the parent is gone, or let us go
                        os._exit(0)
                    self._request(*message)
                else:
                    self._reap(fd)

    def _request(self, doc: dict[str, Any], fds: list[int]) -> None:
        request = doc.get("fork")
        try:
            if not isinstance(request, int) or len(fds) not in (1, 2):
                raise OSError("a malformed request")  # the parent's flame is not ours
            why = _unsafe()
            if why:
                _send(self.sock, {"refused": request, "why": why})
                return
            env = doc.get("env")
            if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()
            ):
                raise OSError("a malformed request")
            self._fork(request, env, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _fork(self, request: int, env: dict[str, str], fds: list[int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            _send(self.sock, {"refused": request, "why": f"fork failed: {exc.strerror}"})
            return
        if pid == 0:
            self._become_runner(env, fds)
        pidfd = os.pidfd_open(pid)  # before any reaping: the pid is still this child's
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        _send(self.sock, {"forked": request, "pid": pid}, [pidfd])

    def _become_runner(self, env: dict[str, str], fds: list[int]) -> None:
        """In the new child: take the place of ``python -m flame runner``. Never returns."""
        try:
            os.setsid()
            out, err = fds[0], fds[-1]
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            for fd in {null, *fds, *self.children, self.sock.detach()}:
                if fd > 2:
                    os.close(fd)
            os.environ.update(env)  # the runner removes FLAME_PARENT at once
            del env
            sys.argv[1:] = ["runner"]
            _rename_as_runner()
            from .._child._main import main as runner_main

            runner_main()  # exits through os._exit
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            os._exit(ExitCode.INTERNAL)

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # cannot happen: nobody else reaps our children
            code = int(ExitCode.INTERNAL)
        _send(self.sock, {"exited": pid, "code": code})


def _preload(sys_path: Sequence[str] | None, names: Sequence[str]) -> str:
    """Import the runner's modules and ``names`` with the parent's ``sys.path`` (as the
    runner will have it); what failed, or ``""``. A pool called while these are imported
    raises (as in a runner importing its app), so the import fails."""
    from .. import _parent

    if sys_path is not None:
        sys.path[:] = [str(p) for p in sys_path]
    try:
        with _parent.importing_app:
            for name in (*_RUNNER_MODULES, *names):
                importlib.import_module(name)
    except BaseException as exc:
        return f"preloading failed: {type(exc).__name__}: {exc}"
    return _unsafe()


def _unsafe() -> str:
    """Why forking this process now is not safe, or ``""``: it must have only one thread."""
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        threads = ["?"] * threading.active_count()
    if len(threads) == 1:
        return ""
    names = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    which = f" (Python threads: {', '.join(names)})" if names else " (threads of C libraries)"
    return (
        f"the fork server has {len(threads)} threads after preloading{which}; forking it "
        "would not be safe"
    )


def _rename_as_runner() -> None:
    """Make this process's command line say ``... -m flame runner`` instead of ``zygote`` (the
    same length), in the memory the kernel shows as ``/proc/<pid>/cmdline``."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (Linux 3.5+)
        if start <= 0 or end <= start:
            return
        import ctypes

        old, new = b"\0zygote\0", b"\0runner\0"
        if ctypes.string_at(end - len(old), len(old)) == old:
            ctypes.memmove(end - len(new), new, len(new))
    except (OSError, ValueError, IndexError, ImportError):
        pass
