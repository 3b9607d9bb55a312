"""The worker zygote: one process that has imported the engine (torch, scikit-learn, ONNX)
once and forks a worker per run, so a run starts in milliseconds instead of paying the
imports again (6-10 s of CPU on two cores for every run).

    python -m engine zygote SOCKET --parent PID     # started by local_backend.start_zygote

It listens on a Unix socket in a private folder. A request is one JSON line: the run, the
store, the artifacts folder, threads, the caller's environment and working directory, and
the worker log. The zygote forks; the child starts its own session (it outlives the app, as
a `python -m engine worker` process does), sends its output to the log and runs
`run_worker`; the zygote answers the child's pid. The kernel reaps the children. The
zygote ends when its parent does; a worker started from it runs on. It never opens the
store, starts a thread or touches torch's thread pools before forking.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import traceback
from typing import Any

from engine.worker import run_worker


def serve(path: str, parent: int) -> int:
    """Answer fork requests on the Unix socket `path` until process `parent` has ended."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the forked workers
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}"
    server.bind(staging)
    os.rename(staging, path)  # the socket appears only once the engine is imported
    server.listen(16)
    server.settimeout(1.0)
    try:
        while os.getppid() == parent:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10.0)
                try:
                    request = json.loads(conn.makefile("rb").readline())
                except (OSError, ValueError):
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                ready, told = os.pipe()
                pid = os.fork()
                if pid == 0:
                    server.close()
                    conn.close()
                    os.close(ready)
                    os._exit(_child(request, told))
                os.close(told)
                with contextlib.suppress(OSError):
                    os.read(ready, 1)  # its own session first: the pid answered is its group's
                os.close(ready)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    finally:
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    folder = os.path.dirname(path)  # its parent ended: nothing of it is left behind
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(folder, "zygote.log"))
        os.rmdir(folder)
    return 0


def _child(request: dict[str, Any], told: int) -> int:
    """The forked worker: its own session (then a byte on `told` for the zygote), output to
    the run's log, the caller's environment and folder, then the run. Returns the exit code
    (never raises)."""
    code = 1
    try:
        try:
            os.setsid()
        finally:
            os.write(told, b"1")
            os.close(told)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocess needs its exit codes
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout.reconfigure(line_buffering=True)  # as `python -u`: the log keeps up
        sys.stderr.reconfigure(line_buffering=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = run_worker(request["run_id"], request["store"], artifacts=request["artifacts"],
                          threads=request["threads"])
    except BaseException:  # a child must end through os._exit, whatever happened
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    return code
