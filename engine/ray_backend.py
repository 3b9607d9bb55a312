"""The Ray backend of `engine.jobs`: a run is a Ray task on the cluster that
WORKBENCH_RAY_ADDRESS names, reporting to the same store as a local worker.

    WORKBENCH_BACKEND=ray WORKBENCH_RAY_ADDRESS=auto streamlit run app.py

The address is anything `ray.init(address=...)` takes ("auto" for the cluster this host
belongs to, "ray://head:10001" for a remote one); "local" or unset starts a private
one-machine instance. The task runs `jobs.run_worker` in a Ray worker process, so a run's
events, variants and result land in the store exactly as a local run's do; the store
should then be one every node reaches (PostgreSQL) and WORKBENCH_ARTIFACTS a folder every
node mounts. Nodes need this repository and its requirements on the same path.

Searches fan their trials out as Ray tasks (`search_workers`), and `jobs.compare` sends one
task per compression chain. Ray is imported only here, and only when asked for.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

from engine.errors import UserError

_REFS: dict[str, Any] = {}  # run id -> the ObjectRef of its task, for runs this process sent
_LOCK = threading.Lock()
_REMOTE: dict[str, Any] = {}


def address() -> str | None:
    """The cluster address from WORKBENCH_RAY_ADDRESS; None for a private local instance."""
    value = os.environ.get("WORKBENCH_RAY_ADDRESS", "").strip()
    return None if value in ("", "local") else value


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
    _check_port(address())
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    try:
        ray.init(address=address(), ignore_reinit_error=True, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"could not reach the Ray cluster at {address() or 'local'} ({exc}); "
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
            _REMOTE["trials"] = ray.remote(max_retries=0)(_trials_task)
        return _REMOTE[name]


def _run_task(run_id: str, store_url: str, artifacts: str, threads: int | None) -> int:
    import ray

    from engine import jobs

    os.environ["WORKBENCH_ARTIFACTS"] = artifacts
    os.environ["WORKBENCH_BACKEND"] = "ray"  # its search fans out over the cluster too
    node = ray.get_runtime_context().get_node_id()
    return jobs.run_worker(run_id, store_url, threads=threads, node=f"ray:{node[:12]}")


def _trials_task(*args: Any) -> None:
    from engine import tune

    tune.run_trials(*args)


def submit(run_id: str, store: Any, recipe: Any, *, threads: int | None = None,
           resources: dict[str, float] | None = None) -> None:
    """Send the stored run to the cluster as a task with its resources: one CPU (or
    `threads`), and one GPU for a recipe asking for cuda, unless `resources` says."""
    from engine.store import artifacts_root

    connect()
    wanted = {"num_cpus": threads or 1,
              "num_gpus": 1 if str(recipe.device).startswith("cuda") else 0,
              **(resources or {})}
    ref = _remote("run").options(**wanted, name=f"workbench-run-{run_id[:8]}").remote(
        run_id, store.url, str(artifacts_root()), threads)
    store.set_worker(run_id, pid=None, node="ray")
    with _LOCK:
        _REFS[run_id] = ref


def alive(run_id: str) -> bool | None:
    """Whether the run's task is still pending or running; None when this process did not
    send it (after an app restart only the task's own store updates tell)."""
    with _LOCK:
        ref = _REFS.get(run_id)
    if ref is None:
        return None
    import ray

    ready, _ = ray.wait([ref], timeout=0)
    return not ready


def cancel(run_id: str) -> bool:
    """Force-cancel the run's task (its worker process is killed); False if unknown here."""
    with _LOCK:
        ref = _REFS.pop(run_id, None)
    if ref is None:
        return False
    import ray

    ray.cancel(ref, force=True)
    return True


def search_workers(args: list[tuple[Any, ...]]) -> list[Any]:
    """Start one trial task per argument tuple of `tune.run_trials`; return their refs."""
    connect()
    return [_remote("trials").options(num_cpus=1).remote(*a) for a in args]


def wait(refs: list[Any], timeout_s: float) -> list[Any]:
    """The refs still running after waiting up to `timeout_s`; raises a task's error."""
    import ray

    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    ray.get(ready)  # re-raises what a finished task raised
    return pending


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
