"""Background runs: submit a recipe, follow it in the store, cancel it, reap dead workers.

    run_id = jobs.submit(recipe)          # returns at once; the run is "queued"
    jobs.cancel(run_id)                   # the worker stops at its next progress event
    jobs.reap()                           # call on every poll: dead workers -> "failed"

Where a run goes is a backend (`engine.backends`): worker processes on this machine
(`local`, the default) or tasks on a Ray cluster (`ray`), chosen per call or by
WORKBENCH_BACKEND. This module never branches on which: it asks the run's backend.
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

from engine.backends import Backend
from engine.errors import UserError
from engine.local_backend import LocalBackend, dispatch, kill, poll_children
from engine.ray_backend import RayBackend
from engine.recipe import Recipe
from engine.runner import resolve
from engine.settings import backend_name, hang_limit_s
from engine.store import ACTIVE, Store
from engine.worker import CANCELLED_MESSAGE, DIED_MESSAGE, NEVER_STARTED_MESSAGE, hang_message

START_TIMEOUT_S = 60.0  # a queued run without a worker after this long is failed
_BACKENDS: dict[str, Backend] = {"local": LocalBackend(), "ray": RayBackend()}


def backend(name: str | None = None) -> Backend:
    """The backend called `name`, else WORKBENCH_BACKEND's, else the local one."""
    return _BACKENDS[backend_name(name)]


def submit(recipe: Recipe | dict[str, Any], *, store: Store | None = None,
           name: str | None = None, group: str | None = None,
           threads: int | None = None, backend: str | None = None,
           owner: str | None = None, resources: dict[str, float] | None = None) -> str:
    """Check the recipe (a UserError reaches the caller and nothing is stored), store a
    queued run and hand it to the backend; return the run id.

    backend "local" (default, or WORKBENCH_BACKEND): a worker process on this machine,
    started at once while fewer than `settings.max_workers()` runs hold one, else when one
    ends. backend "ray": a task on the Ray cluster at WORKBENCH_RAY_ADDRESS, with
    `resources` ({"num_cpus": 1, "num_gpus": 0} by default; one GPU for a cuda recipe).
    `owner` tags the run with the app session that made it. A run is named `name`, else the
    recipe's, else what it trains on what ("mlp on digits")."""
    recipe = resolve(recipe)
    target = _BACKENDS[backend_name(backend)]
    target.connect()
    store = store or Store()
    run_id = store.create_run(recipe.to_dict(), group=group,
                              name=name or recipe.name or recipe.title(),  # never unnamed
                              backend=target.name, owner=owner, threads=threads)
    store.run_dir(run_id).mkdir(parents=True, exist_ok=True)
    target.submit(run_id, store, recipe, threads=threads, resources=resources)
    return run_id


def compare(recipe: Recipe | dict[str, Any], chains: list[list[dict[str, Any]]], *,
            store: Store | None = None, backend: str | None = None,
            owner: str | None = None) -> list[str]:
    """Fan a technique comparison out: one run per compression chain, each on `recipe`
    with `compress` set to that chain, all in one group; returns their run ids. On Ray each
    chain is its own task, so chains run side by side across the cluster."""
    base = resolve(recipe).to_dict()
    runs = [resolve({**base, "compress": chain}) for chain in chains]  # all checked first
    group = uuid.uuid4().hex[:8]
    return [submit(r, store=store, backend=backend, owner=owner, group=group,
                   name=f"{' -> '.join(s['technique'] for s in r.compress) or 'baseline'}"
                        f" · {r.title()}")
            for r in runs]


def wait(run_ids: list[str], *, store: Store | None = None, timeout_s: float = 3600.0,
         poll_s: float = 0.5) -> list[dict[str, Any]]:
    """Wait until every run has ended, reaping (and so starting queued runs) as it polls,
    and return the runs; what a script that submits runs without the app calls."""
    store = store or Store()
    deadline = time.monotonic() + timeout_s
    while True:
        reap(store)
        runs = [store.get_run(run_id) for run_id in run_ids]
        if all(run is None or run["status"] not in ACTIVE for run in runs):
            return [run for run in runs if run is not None]
        if time.monotonic() >= deadline:
            raise UserError(f"{sum(r['status'] in ACTIVE for r in runs if r)} of "
                            f"{len(run_ids)} runs still going after {timeout_s:g} s; wait "
                            "longer or cancel them.")
        time.sleep(poll_s)


def cancel(run_id: str, *, store: Store | None = None, grace_s: float = 10.0) -> None:
    """Ask the run to stop and wait (up to `grace_s`) until it has. A queued run with no
    live worker is cancelled at once; a worker that has not stopped within `grace_s`
    (a long epoch, a hang) is killed and the run marked cancelled. Finished runs are left
    as they are; a worker on another host is only asked. With `grace_s <= 0` a worker in
    reach is killed before it is asked, so it cannot end itself first (the run then says
    it was killed)."""
    store = store or Store()
    if grace_s <= 0:
        run = store.get_run(run_id)
        if run is not None and run["status"] in ACTIVE and _alive(run) and _kill(run):
            store.finish_run(run_id, "cancelled", error=f"{CANCELLED_MESSAGE}; killed at "
                                                        "once (no grace period)")
            return
    store.request_cancel(run_id)
    deadline = time.monotonic() + grace_s
    while True:
        run = store.get_run(run_id)
        if run is None or run["status"] not in ACTIVE:
            return
        if not _alive(run):
            store.finish_run(run_id, "cancelled", error=CANCELLED_MESSAGE)
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not _kill(run):
        return  # out of reach (another host): its worker sees the flag at its next event
    store.finish_run(run_id, "cancelled", error=f"{CANCELLED_MESSAGE}; the worker did not "
                                                f"stop within {grace_s:g} s and was killed")


def _kill(run: dict[str, Any]) -> bool:
    """Kill the run's worker through its backend (or as a local process); False when it
    is out of this process's reach."""
    return _backend_of(run).kill(run) or _BACKENDS["local"].kill(run)


def reap(store: Store | None = None, *, hang_timeout_s: float | None = None) -> list[str]:
    """Mark runs whose worker is gone as failed, return their ids, then start queued runs
    into the freed slots (`local_backend.dispatch`).

    Cheap enough for every poll: one query when nothing is active. A worker silent for
    longer than `hang_timeout_s` (default: `settings.hang_limit_s()`, where 0 turns it off)
    is killed and its run failed too. A queued run waiting for a free worker is left alone.
    Local runs of other hosts are left to their own reaper; a backend that keeps no local
    queue (Ray) judges its runs by their task."""
    store = store or Store()
    if hang_timeout_s is None:
        hang_timeout_s = hang_limit_s()
    exited = poll_children()  # before the query: a worker that ended has written its end
    host, now = socket.gethostname(), time.time()
    marked, waiting = [], False
    for run in store.active_runs():
        queue = _backend_of(run).drains_queue
        if run["host"] != host and queue:
            continue
        if run["status"] == "queued" and run["claimed"] is None and queue:
            waiting = True  # for a free worker: `dispatch` below starts it when one is
            continue
        waited = now - (run["claimed"] or run["created"])
        dead = run["id"] in exited or not _alive(run)
        if dead and run["status"] == "running":
            error = DIED_MESSAGE
        elif dead and (run["id"] in exited or run["pid"] is not None
                       or waited > START_TIMEOUT_S):
            error = NEVER_STARTED_MESSAGE  # it ended, or none came, before start_run
        elif (hang_timeout_s is not None and run["status"] == "running"
              and now - (run["updated"] or run["started"]) > hang_timeout_s):
            if not _backend_of(run).kill(run):
                kill(run["id"], run["pid"])
            error = hang_message(hang_timeout_s)
        else:
            continue
        if store.finish_run(run["id"], "failed", error=error):
            marked.append(run["id"])
    if waiting:  # a write transaction: only when a queued run could take a slot
        dispatch(store)
    return marked


def _backend_of(run: dict[str, Any]) -> Backend:
    return _BACKENDS.get(run["backend"] or "local", _BACKENDS["local"])


def _alive(run: dict[str, Any]) -> bool:
    return _backend_of(run).alive(run)
