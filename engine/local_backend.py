"""The local backend: one worker process per run on this machine, a queue in the store.

A worker is forked by the worker zygote (`engine.zygote`, a process that has imported the
engine once; `start_zygote`), or, while none is ready, is `python -m engine worker RUN_ID
--store URL --artifacts DIR`. Either way it runs in its own session, so it outlives the
Streamlit session and an app restart; its stdout and stderr go to `<run folder>/worker.log`.
At most `settings.max_workers()` hold a worker at once; the rest wait as "queued", and each
ending worker starts the next (`dispatch`), so the queue drains without a scheduler.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engine.backends import Backend
from engine.executor import Executor, ProcessPool
from engine.recipe import Recipe
from engine.settings import max_workers
from engine.store import Store

_PROCS: dict[str, Forked | subprocess.Popen[bytes]] = {}  # workers this process started, by run id
_PROCS_LOCK = threading.Lock()  # Streamlit runs sessions in threads
_REPO = Path(__file__).resolve().parents[1]
ZYGOTE_ENV = "WORKBENCH_ZYGOTE"  # the zygote's socket, inherited by the workers it serves
_ZYGOTE: list[subprocess.Popen[bytes]] = []  # the zygote this process started, if any


class LocalBackend(Backend):
    name = "local"
    drains_queue = True

    def connect(self) -> None:
        start_zygote()  # the first run in this process starts it; later ones are forked

    def submit(self, run_id: str, store: Any, recipe: Recipe, *, threads: int | None = None,
               resources: dict[str, float] | None = None) -> None:
        dispatch(store)

    def alive(self, run: dict[str, Any]) -> bool:
        """A child of ours is asked directly, another local worker through its pid; one on
        another host is taken to be alive (only its own host can tell)."""
        with _PROCS_LOCK:
            proc = _PROCS.get(run["id"])
        if proc is not None:
            return proc.poll() is None
        if run["pid"] is None:
            return False
        return run["host"] != socket.gethostname() or is_alive(run["pid"])

    def kill(self, run: dict[str, Any]) -> bool:
        pid = local_pid(run)
        if pid is None:
            return False  # on another host: its worker sees the flag at its next event
        kill(run["id"], pid)
        return True

    def executor(self) -> Executor:
        return ProcessPool()


def dispatch(store: Store, *, limit: int | None = None) -> list[str]:
    """Start a worker process for each queued local run of this host while fewer than
    `limit` (default `max_workers()`) hold one; return the ids started. Called on submit,
    by a worker as it ends and by `jobs.reap`."""
    started = []
    for run_id in store.claim_queued(limit=limit or max_workers()):
        try:
            proc = _spawn(run_id, store)
        except OSError as exc:
            store.finish_run(run_id, "failed", error=f"could not start the worker: {exc}")
            continue
        store.set_worker(run_id, pid=proc.pid, node=socket.gethostname())
        started.append(run_id)
    return started


def start_zygote() -> None:
    """Start this process's worker zygote, once, unless one it inherited answers: from then
    on a run's worker is forked from it at no import cost. It imports the engine for a few
    seconds; runs started meanwhile get their own process, as before. It ends with this
    process. (No fork on this platform: nothing starts, every worker is a process.)"""
    with _PROCS_LOCK:
        if _ZYGOTE or not hasattr(os, "fork") or _zygote_socket() is not None:
            return
        path = os.path.join(tempfile.mkdtemp(prefix="workbench-zygote-"), "socket")
        with open(Path(path).with_name("zygote.log"), "ab") as log:
            _ZYGOTE.append(subprocess.Popen(
                [sys.executable, "-m", "engine", "zygote", path, "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO))
        os.environ[ZYGOTE_ENV] = path  # workers started from here find it too


def _zygote_socket() -> str | None:
    path = os.environ.get(ZYGOTE_ENV)
    return path if path and os.path.exists(path) else None


def _spawn(run_id: str, store: Store) -> Forked | subprocess.Popen[bytes]:
    """Start the run's worker in its own session (it outlives the app), its output going to
    the run's worker.log: forked by the zygote when one is ready, else `python -m engine
    worker RUN_ID` (an argument list: no string of the user's ever reaches a shell). The
    store and the artifacts folder are passed, so the worker's folder does not depend on
    its working directory."""
    folder = store.run_dir(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    threads = store.get_run(run_id)["threads"]
    threads = None if threads is None else int(threads)
    pid = _fork(run_id, store, threads, folder / "worker.log")
    proc: Forked | subprocess.Popen[bytes]
    if pid is not None:
        proc = Forked(pid)
    else:
        command = [sys.executable, "-u", "-m", "engine", "worker", run_id, "--store",
                   store.url, "--artifacts", str(store.artifacts)]  # -u: the log keeps up
        if threads is not None:
            command += ["--threads", str(threads)]
        with open(folder / "worker.log", "ab") as log:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=_REPO,
                                    start_new_session=True)
    with _PROCS_LOCK:
        _PROCS[run_id] = proc
    return proc


def _fork(run_id: str, store: Store, threads: int | None, log: Path) -> int | None:
    """The pid of a worker forked by the zygote, or None when none answers."""
    path = _zygote_socket()
    if path is None:
        return None
    request = {"run_id": run_id, "store": store.url, "artifacts": str(store.artifacts),
               "threads": threads, "env": dict(os.environ), "cwd": str(_REPO),
               "log": str(log)}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10.0)
            conn.connect(path)
            conn.sendall(json.dumps(request).encode() + b"\n")
            return int(json.loads(conn.makefile("rb").readline())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # gone or busy: a process of its own, as before the zygote


class Forked:
    """A worker forked by the zygote, followed by its pid as `subprocess.Popen` is (the
    zygote, not this process, is its parent and reaps it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None if is_alive(self.pid) else 0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.05)
        return 0


def is_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (ended, waiting to be reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or it ended just now
        return not Path("/proc").is_dir()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the name in (...) may hold spaces


def local_pid(run: dict[str, Any]) -> int | None:
    """The pid to kill for this run on this host, if any (a child of ours may not have
    stored its pid yet)."""
    with _PROCS_LOCK:
        proc = _PROCS.get(run["id"])
    if proc is not None:
        return proc.pid
    return run["pid"] if run["host"] == socket.gethostname() else None


def poll_children() -> set[str]:
    """Run ids whose worker (a child of this process) has ended; polling also reaps it."""
    with _PROCS_LOCK:
        ended = {run_id for run_id, proc in _PROCS.items() if proc.poll() is not None}
        for run_id in ended:
            del _PROCS[run_id]
    return ended


def kill(run_id: str, pid: int | None) -> None:
    """SIGKILL the worker's process group (its own session, so data-loader children die
    with it); never this process or its group (a worker run in-process)."""
    if pid is None or pid == os.getpid():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid != os.getpgid(0):
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    with _PROCS_LOCK:
        proc = _PROCS.pop(run_id, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)  # reap the zombie
