"""Executors: where a batch of independent tasks runs (a search's trial workers, say).

`search(recipe, *, storage, executor)` hands its workers to an executor and polls its
study while they run; it never knows where they ran. `ProcessPool` (spawned processes on
this machine) is the default; the Ray backend has its own (`engine.ray_backend`), the
same interface. A task is a picklable top-level function and its arguments.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from engine.errors import UserError

Task = tuple[Callable[..., Any], tuple[Any, ...]]


class Executor(ABC):
    """Runs tasks to their end, polling while they run; the first failure is re-raised."""

    name = "executor"
    #: even a single task runs here rather than in the caller's process (a cluster's
    #: resources, not this process's, are the point)
    always_fan_out = False

    @abstractmethod
    def threads_per_task(self, n_tasks: int) -> int:
        """The torch threads each of `n_tasks` tasks running at once should use."""

    @abstractmethod
    def run_all(self, tasks: Sequence[Task], *, poll: Callable[[], None],
                poll_s: float = 0.5) -> None:
        """Run `fn(*args)` for every task at once; call `poll()` every `poll_s` seconds
        until all have ended; raise the first task's error (a UserError stays one)."""


class ProcessPool(Executor):
    """One spawned process per task on this machine, the cores shared out between them."""

    name = "local"

    def threads_per_task(self, n_tasks: int) -> int:
        return max(1, (os.cpu_count() or 1) // max(1, n_tasks))

    def run_all(self, tasks: Sequence[Task], *, poll: Callable[[], None],
                poll_s: float = 0.5) -> None:
        spawn = mp.get_context("spawn")
        errors = spawn.Queue()
        procs = [spawn.Process(target=_run_one, args=(fn, args, errors), daemon=True)
                 for fn, args in tasks]
        for p in procs:
            p.start()
        try:
            while any(p.is_alive() for p in procs):
                time.sleep(poll_s)
                poll()
        finally:
            for p in procs:
                p.join(timeout=None if not p.is_alive() else 5)
                if p.is_alive():
                    p.terminate()
        problems = []
        while not errors.empty():
            problems.append(errors.get())
        if problems:
            kind, message = problems[0]
            raise (UserError if kind == "UserError" else RuntimeError)(message)
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            raise RuntimeError(f"a worker process ended with exit code {bad[0]}.")


def _run_one(fn: Callable[..., Any], args: tuple[Any, ...], errors: Any) -> None:
    """The body of one spawned process: run the task, its error sent to the parent."""
    try:
        fn(*args)
    except BaseException as exc:
        errors.put((type(exc).__name__, str(exc)))
        raise
