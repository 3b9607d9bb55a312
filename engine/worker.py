"""The worker: one stored run executed in this process, every event written to the store.

`python -m engine worker RUN_ID --store URL` (a local backend's process) and a Ray task
both run `run_worker`. It reads the recipe from the store, runs it (`engine.runner.run`)
with a reporter that stores each progress event and stops the run at the next epoch or
stage once the user asked to cancel, and a watchdog that ends a hung worker with its
reason. Every way a run can end leaves the store saying so.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from engine.errors import Cancelled, UserError
from engine.executor import Executor
from engine.local_backend import dispatch
from engine.runner import TrainingDivergedError, resolve
from engine.runner import run as run_recipe
from engine.settings import hang_limit_s
from engine.store import Store
from engine.train import resolve_device

CANCELLED_MESSAGE = "cancelled by the user"
DIED_MESSAGE = ("the worker process ended without finishing (killed or crashed); "
                "the history so far is kept")
NEVER_STARTED_MESSAGE = "the worker never started; see worker.log in the run's folder"
CANCEL_CHECK_S = 0.2  # the worker reads the cancel flag at most this often


def run_worker(run_id: str, store_url: str, *, artifacts: str | Path | None = None,
               threads: int | None = None, node: str | None = None,
               executor: Executor | None = None, drain_queue: bool = True) -> int:
    """Run one stored run in this process, recording every progress event; the body of
    `python -m engine worker` and of a Ray task. Returns the exit code: 0 done or
    cancelled, 2 a user's error (the run is failed with its message), 1 an internal error.
    With `drain_queue` (a local worker) it then starts the next queued run, if any. A
    search in the run keeps its study in the store's database and runs its parallel
    trials on `executor`."""
    store = Store(store_url, artifacts=artifacts)
    try:
        return _work(store, run_id, threads=threads, node=node, executor=executor)
    finally:
        if drain_queue:
            with contextlib.suppress(Exception):  # never turn a finished run into an error
                dispatch(store)


def _work(store: Store, run_id: str, *, threads: int | None, node: str | None,
          executor: Executor | None) -> int:
    run = store.get_run(run_id)
    if run is None:
        print(f"error: there is no run {run_id!r} in {store.url}", file=sys.stderr)
        return 2
    try:
        recipe = resolve(run["recipe"])  # checked at submit; a newer engine may disagree
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
    limit_s = hang_limit_s()
    print(f"run {run_id}: started on {device} with {torch.get_num_threads()} threads, "
          f"stopped after {f'{limit_s:g} s' if limit_s else 'no limit'} without progress",
          flush=True)
    start = time.perf_counter()
    reporter = _Reporter(store, run_id)
    watchdog = _Watchdog(store, run_id, reporter, limit_s)
    try:
        # searches keep their studies in this store's database
        result = run_recipe(recipe, out_dir=store.run_dir(run_id), on_progress=reporter,
                            storage=store.url, executor=executor)
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


