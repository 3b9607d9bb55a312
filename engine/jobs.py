"""Background runs: one worker process per run, reporting to the run store.

    run_id = jobs.submit(recipe)          # returns at once; the run is "queued"
    jobs.cancel(run_id)                   # the worker stops at its next progress event
    jobs.reap()                           # call on every poll: dead workers -> "failed"

A worker is `python -m engine worker RUN_ID --store URL`, started in its own session so
it outlives the Streamlit session and an app restart; everything it learns goes to the
store, which is what the pages read. Its stdout and stderr go to `<run folder>/worker.log`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import engine
from engine.errors import Cancelled, UserError
from engine.recipe import Recipe, as_recipe
from engine.settings import env_int
from engine.store import ACTIVE, Store, artifacts_root, run_dir

CANCELLED_MESSAGE = "cancelled by the user"
DIED_MESSAGE = ("the worker process ended without finishing (killed or crashed); "
                "the history so far is kept")
NEVER_STARTED_MESSAGE = "the worker never started; see worker.log in the run's folder"
START_TIMEOUT_S = 60.0  # a queued run without a worker after this long is failed
CANCEL_CHECK_S = 0.2  # the worker reads the cancel flag at most this often
BACKENDS = ("local", "ray")

_PROCS: dict[str, subprocess.Popen[bytes]] = {}  # workers this process started, by run id
_PROCS_LOCK = threading.Lock()  # Streamlit runs sessions in threads


def submit(recipe: Recipe | dict[str, Any], *, store: Store | None = None,
           name: str | None = None, group: str | None = None,
           threads: int | None = None, backend: str | None = None,
           owner: str | None = None, resources: dict[str, float] | None = None) -> str:
    """Check the recipe (a UserError reaches the caller and nothing is stored), store a
    queued run and hand it to the backend; return the run id.

    backend "local" (default, or WORKBENCH_BACKEND): a worker process on this machine,
    started at once while fewer than `max_workers()` runs hold one, else when one ends.
    backend "ray": a task on the Ray cluster at WORKBENCH_RAY_ADDRESS, with `resources`
    ({"num_cpus": 1, "num_gpus": 0} by default; one GPU for a cuda recipe). `owner` tags
    the run with the app session that made it."""
    recipe = as_recipe(recipe)
    kind = backend_name(backend)
    if kind == "ray":
        from engine import ray_backend

        ray_backend.connect()  # an unreachable cluster is the user's one sentence, no run
    store = store or Store()
    run_id = store.create_run(recipe.to_dict(), name=name or recipe.name, group=group,
                              backend=kind, owner=owner, threads=threads)
    run_dir(run_id).mkdir(parents=True, exist_ok=True)
    if kind == "ray":
        ray_backend.submit(run_id, store, recipe, threads=threads, resources=resources)
    else:
        dispatch(store)
    return run_id


def compare(recipe: Recipe | dict[str, Any], chains: list[list[dict[str, Any]]], *,
            store: Store | None = None, backend: str | None = None,
            owner: str | None = None) -> list[str]:
    """Fan a technique comparison out: one run per compression chain, each on `recipe`
    with `compress` set to that chain, all in one group; returns their run ids. On Ray each
    chain is its own task, so chains run side by side across the cluster."""
    base = as_recipe(recipe).to_dict()
    runs = [as_recipe({**base, "compress": chain}) for chain in chains]  # all checked first
    group = uuid.uuid4().hex[:8]
    return [submit(r, store=store, backend=backend, owner=owner, group=group,
                   name=" -> ".join(step["technique"] for step in r.to_dict()["compress"])
                   or "baseline")
            for r in runs]


def dispatch(store: Store | None = None, *, limit: int | None = None) -> list[str]:
    """Start a worker process for each queued local run of this host while fewer than
    `limit` (default `max_workers()`) hold one; return the ids started. Called by `submit`,
    by a worker as it ends and by `reap`, so the queue drains without a scheduler."""
    store = store or Store()
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


def max_workers() -> int:
    """How many local worker processes may run at once: WORKBENCH_MAX_WORKERS, else the
    number of CPU cores (at least 2)."""
    return env_int("WORKBENCH_MAX_WORKERS", max(2, os.cpu_count() or 1))


def hang_limit_s() -> float | None:
    """Seconds without a progress event after which `reap` kills a worker:
    WORKBENCH_HANG_TIMEOUT_S (default 1800; 0 turns the check off)."""
    raw = os.environ.get("WORKBENCH_HANG_TIMEOUT_S", "1800")
    try:
        value = float(raw)
    except ValueError as exc:
        raise UserError(f"WORKBENCH_HANG_TIMEOUT_S is {raw!r}; set it to a number of "
                        "seconds (0 turns the check off).") from exc
    return value if value > 0 else None


def backend_name(backend: str | None = None) -> str:
    """The backend a run goes to: `backend`, else WORKBENCH_BACKEND, else "local"."""
    kind = (backend or os.environ.get("WORKBENCH_BACKEND") or "local").strip().lower()
    if kind not in BACKENDS:
        raise UserError(f"the backend {kind!r} is unknown; choose one of "
                        f"{', '.join(BACKENDS)} (WORKBENCH_BACKEND).")
    return kind


def _spawn(run_id: str, store: Store) -> subprocess.Popen[bytes]:
    """Start `python -m engine worker RUN_ID` in its own session (it outlives the app),
    its output going to the run's worker.log. The command is an argument list: no string
    of the user's ever reaches a shell."""
    folder = run_dir(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "engine", "worker", run_id, "--store", store.url]
    threads = store.get_run(run_id)["threads"]
    if threads is not None:
        command += ["--threads", str(int(threads))]
    # The worker's folder must not depend on its working directory: pass the root on.
    env = {**os.environ, "WORKBENCH_ARTIFACTS": str(artifacts_root()), "PYTHONUNBUFFERED": "1"}
    with open(folder / "worker.log", "ab") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=_repo_root(), env=env,
                                start_new_session=True)
    with _PROCS_LOCK:
        _PROCS[run_id] = proc
    return proc


def run_worker(run_id: str, store_url: str, *, threads: int | None = None,
               node: str | None = None) -> int:
    """Run one stored run in this process, recording every progress event; the body of
    `python -m engine worker` and of a Ray task. Returns the exit code: 0 done or
    cancelled, 2 a user's error (the run is failed with its message), 1 an internal error.
    A local worker then starts the next queued run, if any."""
    store = Store(store_url)
    try:
        return _work(store, run_id, threads=threads, node=node)
    finally:
        run = store.get_run(run_id)
        if run is not None and run["backend"] != "ray":
            with contextlib.suppress(Exception):  # never turn a finished run into an error
                dispatch(store)


def _work(store: Store, run_id: str, *, threads: int | None, node: str | None) -> int:
    import torch

    from engine.runner import TrainingDivergedError
    from engine.train import resolve_device

    os.environ["WORKBENCH_STORE"] = store.url  # searches keep their studies in this database
    run = store.get_run(run_id)
    if run is None:
        print(f"error: there is no run {run_id!r} in {store.url}", file=sys.stderr)
        return 2
    try:
        recipe = as_recipe(run["recipe"])  # checked at submit; a newer engine may disagree
    except UserError as exc:
        store.finish_run(run_id, "failed", error=str(exc))
        return 2
    try:
        device: str | None = str(resolve_device(recipe.device))
    except UserError:
        device = None  # engine.run raises the same error below and the run fails with it
    if not store.start_run(run_id, pid=os.getpid(), host=socket.gethostname(), device=device,
                           node=node):
        print(f"run {run_id} is {store.get_run(run_id)['status']}; nothing to do")
        return 0
    if threads is not None:
        torch.set_num_threads(threads)
    print(f"run {run_id}: started on {device} with {torch.get_num_threads()} threads", flush=True)
    start = time.perf_counter()
    reporter = _Reporter(store, run_id)
    watchdog = _Watchdog(store, run_id, reporter, hang_limit_s())
    try:
        result = engine.run(recipe, out_dir=run_dir(run_id), on_progress=reporter)
    except Cancelled:
        store.finish_run(run_id, "cancelled", error=CANCELLED_MESSAGE)
        print(f"run {run_id}: cancelled")
        return 0
    except TrainingDivergedError as exc:
        store.finish_run(run_id, "failed", error=str(exc), result=exc.result)
        print(f"run {run_id}: failed: {exc}")
        return 2
    except (torch.OutOfMemoryError, MemoryError) as exc:
        where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "main"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        store.finish_run(run_id, "failed", error=(
            f"out of {where} memory at batch size {recipe.train.batch_size}; lower the "
            f"batch size or choose a smaller model (the history so far is kept)"))
        print(f"run {run_id}: failed: out of {where} memory")
        return 2
    except UserError as exc:
        store.finish_run(run_id, "failed", error=str(exc))
        print(f"run {run_id}: failed: {exc}")
        return 2
    except Exception as exc:  # a bug: keep the traceback in worker.log, one line in the store
        traceback.print_exc()
        store.finish_run(run_id, "failed", error=f"internal error: {type(exc).__name__}: "
                                                 f"{exc}; see worker.log")
        return 1
    finally:
        watchdog.stop()
    store.finish_run(run_id, "done", result=result)
    print(f"run {run_id}: done in {time.perf_counter() - start:.1f} s")
    return 0


class _Reporter:
    """The worker's `on_progress`: stores each event, and raises Cancelled at an epoch or
    stage boundary once the user asked. The flag is read at most every CANCEL_CHECK_S, so
    a run of short epochs does not double its store traffic; the first check always reads."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.next_check = 0.0
        self.last = time.monotonic()  # when the latest event came: the watchdog's clock

    def __call__(self, event: dict[str, Any]) -> None:
        self.last = time.monotonic()
        self.store.record_event(self.run_id, event)
        if event.get("event") not in ("epoch", "stage"):
            return
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + CANCEL_CHECK_S
            if self.store.cancel_requested(self.run_id):
                raise Cancelled(self.run_id)


class _Watchdog(threading.Thread):
    """Inside the worker: when no event has come for `limit_s`, fail the run with its
    reason and end the process, so a hang ends even with no app polling (a stopped or
    GIL-holding worker is left to the reaper's same check)."""

    def __init__(self, store: Store, run_id: str, reporter: _Reporter,
                 limit_s: float | None) -> None:
        super().__init__(name="workbench-watchdog", daemon=True)
        self.store, self.run_id, self.reporter, self.limit_s = store, run_id, reporter, limit_s
        self.stopped = threading.Event()
        if limit_s is not None:
            self.start()

    def run(self) -> None:
        assert self.limit_s is not None
        while not self.stopped.wait(min(5.0, self.limit_s / 4)):
            if time.monotonic() - self.reporter.last > self.limit_s:
                self.store.finish_run(self.run_id, "failed", error=hang_message(self.limit_s))
                print(f"run {self.run_id}: {hang_message(self.limit_s)}", flush=True)
                os._exit(3)  # the stuck call never returns; only the process can end

    def stop(self) -> None:
        self.stopped.set()


def hang_message(limit_s: float) -> str:
    return (f"no progress for {limit_s:g} s, so the worker was stopped; the history so far "
            f"is kept (WORKBENCH_HANG_TIMEOUT_S sets the limit)")


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
    as they are; a worker on another host is only asked."""
    store = store or Store()
    store.request_cancel(run_id)
    deadline = time.monotonic() + grace_s
    while True:
        run = store.get_run(run_id)
        if run is None or run["status"] not in ACTIVE:
            return
        if not _worker_alive(run):
            store.finish_run(run_id, "cancelled", error=CANCELLED_MESSAGE)
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if run["backend"] == "ray" and _ray().cancel(run_id):
        pass  # Ray killed the task's worker process
    else:
        pid = _local_pid(run)
        if pid is None:
            return  # on another host: its worker sees the flag at its next event
        _kill(run_id, pid)
    store.finish_run(run_id, "cancelled", error=f"{CANCELLED_MESSAGE}; the worker did not "
                                                f"stop within {grace_s:g} s and was killed")


def reap(store: Store | None = None, *, hang_timeout_s: float | None = None) -> list[str]:
    """Mark runs whose worker is gone as failed, return their ids, then start queued runs
    into the freed slots (`dispatch`).

    Cheap enough for every poll: one query when nothing is active. A worker silent for
    longer than `hang_timeout_s` (default: `hang_limit_s()`, where 0 turns it off) is killed and
    its run failed too. A queued run waiting for a free worker is left alone. Local runs of
    other hosts are left to their own reaper; Ray runs are judged by their task."""
    store = store or Store()
    if hang_timeout_s is None:
        hang_timeout_s = hang_limit_s()
    exited = _poll_children()  # before the query: a worker that ended has written its end
    host, now = socket.gethostname(), time.time()
    marked, waiting = [], False
    for run in store.active_runs():
        if run["host"] != host and run["backend"] != "ray":
            continue
        if run["status"] == "queued" and run["claimed"] is None and run["backend"] != "ray":
            waiting = True  # for a free worker: `dispatch` below starts it when one is
            continue
        waited = now - (run["claimed"] or run["created"])
        dead = run["id"] in exited or not _worker_alive(run)
        if dead and run["status"] == "running":
            error = DIED_MESSAGE
        elif dead and (run["id"] in exited or run["pid"] is not None
                       or waited > START_TIMEOUT_S):
            error = NEVER_STARTED_MESSAGE  # it ended, or none came, before start_run
        elif (hang_timeout_s is not None and run["status"] == "running"
              and now - (run["updated"] or run["started"]) > hang_timeout_s):
            if run["backend"] != "ray" or not _ray().cancel(run["id"]):
                _kill(run["id"], run["pid"])
            error = hang_message(hang_timeout_s)
        else:
            continue
        if store.finish_run(run["id"], "failed", error=error):
            marked.append(run["id"])
    if waiting:  # a write transaction: only when a queued run could take a slot
        dispatch(store)
    return marked


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


# --- helpers ------------------------------------------------------------------------------

def _worker_alive(run: dict[str, Any]) -> bool:
    """A child of ours is asked directly, another local worker through its pid; one on
    another host is taken to be alive (only its own host can tell)."""
    if run["backend"] == "ray":
        known = _ray().alive(run["id"])
        if known is not None:
            return known
    with _PROCS_LOCK:
        proc = _PROCS.get(run["id"])
    if proc is not None:
        return proc.poll() is None
    if run["pid"] is None:
        return run["backend"] == "ray" and run["status"] == "queued"  # Ray has not placed it
    return run["host"] != socket.gethostname() or is_alive(run["pid"])


def _local_pid(run: dict[str, Any]) -> int | None:
    """The pid to kill for this run on this host, if any (a child of ours may not have
    stored its pid yet)."""
    with _PROCS_LOCK:
        proc = _PROCS.get(run["id"])
    if proc is not None:
        return proc.pid
    return run["pid"] if run["host"] == socket.gethostname() else None


def _poll_children() -> set[str]:
    """Run ids whose worker (a child of this process) has ended; polling also reaps it."""
    with _PROCS_LOCK:
        ended = {run_id for run_id, proc in _PROCS.items() if proc.poll() is not None}
        for run_id in ended:
            del _PROCS[run_id]
    return ended


def _kill(run_id: str, pid: int) -> None:
    """SIGKILL the worker's process group (its own session, so data-loader children die
    with it); never this process or its group (a worker run in-process)."""
    if pid == os.getpid():
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


def _ray() -> Any:
    from engine import ray_backend

    return ray_backend


def _repo_root() -> Path:
    return Path(engine.__file__).resolve().parents[1]
