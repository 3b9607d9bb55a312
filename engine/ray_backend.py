"""The Ray backend of `engine.jobs`: a run is a Ray task on the cluster that
WORKBENCH_RAY_ADDRESS names, reporting to the same store as a local worker.

    WORKBENCH_BACKEND=ray WORKBENCH_RAY_ADDRESS=auto streamlit run app.py

The address is anything `ray.init(address=...)` takes ("auto" for the cluster this host
belongs to, "ray://head:10001" for a remote one); "local" or unset starts a private
one-machine instance. The task runs `engine.worker.run_worker` in a Ray worker process, so
a run's events, variants and result land in the store exactly as a local run's do; the
store should then be one every node reaches (PostgreSQL) and the artifacts folder one every
node mounts. Nodes need this repository and its requirements on the same path. A run's
search fans its trials out as Ray tasks too (`RayTasks`, the backend's executor), and
`jobs.compare` sends one task per compression chain. Ray is imported only here, and only
when asked for.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.backends import Backend
from engine.errors import UserError
from engine.executor import Executor, Task
from engine.local_backend import is_alive
from engine.recipe import Recipe
from engine.settings import python_path, ray_address
from engine.worker import run_worker

_REFS: dict[str, Any] = {}  # run id -> the ObjectRef of its task, for runs this process sent
_LOCK = threading.Lock()
_REMOTE: dict[str, Any] = {}


def connect() -> None:
    """Connect this process to the cluster once (a no-op when connected, as inside a task).
    An unreachable cluster or a missing `ray` package is one sentence for the user."""
    try:
        import ray
    except ImportError as exc:
        raise UserError("the Ray backend needs the `ray` package; run "
                        "`pip install -r requirements.txt`.") from exc
    if ray.is_initialized():
        return
    address = ray_address()
    _check_port(address)
    path = python_path(Path(__file__).resolve().parents[1])
    try:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"could not reach the Ray cluster at {address or 'local'} ({exc}); "
                        "check WORKBENCH_RAY_ADDRESS, or start one with `ray start "
                        "--head`.") from exc


def _check_port(addr: str | None, timeout_s: float = 3.0) -> None:
    """A quick TCP check of a `ray://host:port` or `host:port` address, so a wrong address
    is a sentence in seconds rather than after Ray's own 30-s connection timeout."""
    if addr is None or addr == "auto":
        return
    hostport = addr.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # let Ray judge the odd forms
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"could not reach the Ray cluster at {addr} ({exc.strerror or exc}); "
                        "check WORKBENCH_RAY_ADDRESS, or start one with `ray start "
                        "--head`.") from exc


def _remote(name: str) -> Any:
    """The remote functions, defined on first use so importing this module needs no Ray."""
    import ray

    with _LOCK:
        if not _REMOTE:
            _REMOTE["run"] = ray.remote(max_retries=0)(_run_task)
            _REMOTE["call"] = ray.remote(max_retries=0)(_call)
        return _REMOTE[name]


def _run_task(run_id: str, store_url: str, artifacts: str, threads: int | None) -> int:
    import ray

    node = ray.get_runtime_context().get_node_id()
    return run_worker(run_id, store_url, artifacts=artifacts, threads=threads,
                      node=f"ray:{node[:12]}", executor=RayTasks(),  # its search fans out
                      drain_queue=False)  # Ray schedules its own tasks


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args)


class RayTasks(Executor):
    """Each task a Ray task of one CPU; even a single one runs on the cluster."""

    name = "ray"
    always_fan_out = True

    def threads_per_task(self, n_tasks: int) -> int:
        return 1

    def run_all(self, tasks: Sequence[Task], *, poll: Callable[[], None],
                poll_s: float = 0.5) -> None:
        import ray

        connect()
        pending = [_remote("call").options(num_cpus=1).remote(fn, args) for fn, args in tasks]
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            ray.get(ready)  # re-raises what a finished task raised
            poll()


class RayBackend(Backend):
    """A run is a Ray task asking for one CPU (or `threads`) and one GPU for a cuda
    recipe, unless `resources` says otherwise."""

    name = "ray"

    def connect(self) -> None:
        connect()  # an unreachable cluster is the user's one sentence, and no run

    def submit(self, run_id: str, store: Any, recipe: Recipe, *, threads: int | None = None,
               resources: dict[str, float] | None = None) -> None:
        connect()
        wanted = {"num_cpus": threads or 1,
                  "num_gpus": 1 if str(recipe.device).startswith("cuda") else 0,
                  **(resources or {})}
        ref = _remote("run").options(**wanted, name=f"workbench-run-{run_id[:8]}").remote(
            run_id, store.url, str(store.artifacts), threads)
        store.set_worker(run_id, pid=None, node="ray")
        with _LOCK:
            _REFS[run_id] = ref

    def alive(self, run: dict[str, Any]) -> bool:
        """The task's state when this process sent it; else what the store says: a queued
        run Ray has not placed yet is alive, a started one is judged by its pid."""
        with _LOCK:
            ref = _REFS.get(run["id"])
        if ref is not None:
            import ray

            ready, _ = ray.wait([ref], timeout=0)
            return not ready
        if run["pid"] is None:
            return run["status"] == "queued"
        return run["host"] != socket.gethostname() or is_alive(run["pid"])

    def kill(self, run: dict[str, Any]) -> bool:
        """Force-cancel the run's task (its worker process is killed); False if this
        process did not send it."""
        with _LOCK:
            ref = _REFS.pop(run["id"], None)
        if ref is None:
            return False
        import ray

        ray.cancel(ref, force=True)
        return True

    def executor(self) -> Executor:
        return RayTasks()


def resources_now() -> dict[str, dict[str, float]]:
    """`resources()` after connecting this process (the app) to the configured cluster."""
    connect()
    return resources() or {}


def resources() -> dict[str, dict[str, float]] | None:
    """The cluster's total and free CPUs, GPUs and memory (GiB) when this process is
    connected to Ray, else None."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    total, free = ray.cluster_resources(), ray.available_resources()
    out = {}
    for key, label, scale in (("CPU", "CPUs", 1), ("GPU", "GPUs", 1),
                              ("memory", "memory (GiB)", 2**30)):
        if key in total:
            out[label] = {"total": total[key] / scale, "free": free.get(key, 0.0) / scale}
    out["nodes"] = {"total": float(len([n for n in ray.nodes() if n.get("Alive")])),
                    "free": float("nan")}
    return out
