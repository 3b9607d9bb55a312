"""Background runs end to end: real worker processes write to a real SQLite store; runs
finish, fail with the engine's message, are cancelled, or die and are reaped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from engine import jobs, local_backend, worker
from engine.bundle import is_bundle
from engine.errors import UserError
from engine.store import ACTIVE, Store, run_dir

TINY = {"data": {"source": "builtin:iris"}, "model": {"source": "builtin:mlp", "hidden": [8]},
        "train": {"epochs": 3}}
LONG = {"data": {"source": "builtin:digits"}, "model": {"source": "builtin:mlp"},
        "train": {"epochs": 2000, "early_stopping": None}}  # minutes: stopped by the tests
DIVERGES = {"data": {"source": "builtin:diabetes", "standardize": False},
            "model": {"source": "builtin:mlp", "hidden": [8]},
            "train": {"optimizer": "sgd", "lr": 10.0, "epochs": 5}}


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """One store, and every worker submitted at once: their start-up (importing torch,
    loading data) overlaps, which keeps this file fast on two cores."""
    root = tmp_path_factory.mktemp("jobs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_ARTIFACTS", str(root / "art"))
        mp.setenv("WORKBENCH_MAX_WORKERS", "4")  # all four at once, whatever the cores
        store = Store(f"sqlite:///{root}/s.db")
        # "diverges" goes unnamed, as from the CLI: it is named by what it trains on what
        runs = {key: jobs.submit(recipe, store=store, threads=1,
                                 name=None if key == "diverges" else key)
                for key, recipe in (("cancel", LONG), ("kill", LONG), ("tiny", TINY),
                                    ("diverges", DIVERGES))}
        yield store, runs
        for proc in list(local_backend._PROCS.values()):  # a failed test may leave a worker behind
            proc.kill()
            proc.wait(10)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def finished(store: Store, run_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """Wait for the run to end; reaping on the way, so a crashed worker fails fast."""
    def ended() -> dict[str, Any] | None:
        jobs.reap(store)
        run = store.get_run(run_id)
        return run if run["status"] not in ACTIVE else None

    try:
        return wait_for(ended, f"run {run_id} to finish", timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(run_dir(run_id) / 'worker.log').read_text()}") from None


def epochs_done(store: Store, run_id: str, at_least: int) -> int:
    def count() -> bool:
        assert store.get_run(run_id)["status"] in ACTIVE, store.get_run(run_id)["error"]
        return len(store.history(run_id).get("epoch", [])) >= at_least

    wait_for(count, f"{at_least} epochs of run {run_id}")
    return len(store.history(run_id)["epoch"])


@pytest.mark.slow
def test_cancel_stops_a_run_and_keeps_its_epochs(workers):
    store, runs = workers
    run_id = runs["cancel"]
    epochs_done(store, run_id, 3)
    start = time.monotonic()
    jobs.cancel(run_id, store=store)
    assert time.monotonic() - start < 5  # stopped by its own check, not killed at grace_s
    run = store.get_run(run_id)
    assert run["status"] == "cancelled" and run["error"] == worker.CANCELLED_MESSAGE
    assert 3 <= len(store.history(run_id)["epoch"]) < 2000
    jobs.cancel(run_id, store=store)  # a finished run stays as it is
    assert store.get_run(run_id)["status"] == "cancelled"


@pytest.mark.slow
def test_a_killed_worker_is_reaped_as_failed_with_its_history(workers):
    store, runs = workers
    run_id = runs["kill"]
    epochs_done(store, run_id, 3)
    assert run_id not in jobs.reap(store)  # a live worker is left alone
    os.killpg(store.get_run(run_id)["pid"], signal.SIGKILL)
    assert wait_for(lambda: run_id in jobs.reap(store), "the reaper")
    kept = store.history(run_id)["epoch"]

    fresh = Store(store.url)  # what the app sees after a restart
    run = fresh.get_run(run_id)
    assert run["status"] == "failed" and run["error"] == worker.DIED_MESSAGE
    assert len(kept) >= 3 and fresh.history(run_id)["epoch"] == kept
    assert fresh.result(run_id)["variants"][0]["history"]["epoch"] == kept
    assert jobs.reap(fresh) == []  # marked once


def test_submit_runs_a_recipe_in_the_background(workers):
    store, runs = workers
    run_id = runs["tiny"]
    run = finished(store, run_id)
    assert run["status"] == "done", run["error"]
    assert run["name"] == "tiny" and run["device"] == "cpu" and run["host"] == socket.gethostname()
    assert run["recipe"]["train"]["optimizer"] == "adam"  # stored with defaults filled in
    assert run["progress"]["stage"] == "done" and run["duration_s"] > 0
    assert store.history(run_id)["epoch"] == [1, 2, 3]
    [variant] = store.variants(run_id)
    assert variant["name"] == "baseline" and is_bundle(variant["model_file"])
    result = store.result(run_id)
    assert "test_accuracy" in result["variants"][0]["metrics"]
    assert result["variants"][0]["history"]["epoch"] == [1, 2, 3]
    assert (run_dir(run_id) / "result.json").is_file()
    assert "done" in (run_dir(run_id) / "worker.log").read_text()


def test_a_diverging_run_fails_with_the_learning_rate_message(workers):
    store, runs = workers
    run = finished(store, runs["diverges"])
    assert run["status"] == "failed" and "learning rate (10)" in run["error"]
    assert run["name"] == "mlp on diabetes"
    result = store.result(runs["diverges"])  # the partial result is kept
    assert result["variants"][0]["history"]["epoch"]  # the epochs before the loss blew up
    assert "test_r2" in result["variants"][0]["metrics"]


def test_an_invalid_recipe_is_refused_and_nothing_is_stored(workers):
    store, _ = workers
    before = len(store.list_runs())
    with pytest.raises(UserError, match="optimizer"):
        jobs.submit({"train": {"optimiser": "adam"}}, store=store)
    assert len(store.list_runs()) == before


def test_reaper_marks_runs_without_a_worker(workers):
    store, _ = workers
    host = socket.gethostname()
    gone = store.create_run(TINY)
    store.start_run(gone, pid=2**31 - 1, host=host)  # a pid that cannot exist
    elsewhere = store.create_run(TINY)
    store.start_run(elsewhere, pid=2**31 - 1, host="another-host")
    never = store.create_run(TINY)
    waiting = store.create_run(TINY)
    with store._writer.begin() as conn:
        # dispatched two minutes ago, and no worker ever came
        conn.execute(text("UPDATE runs SET claimed = :t WHERE id = :id"),
                     {"id": never, "t": time.time() - 120})
        # dispatched just now: its worker may still be starting
        conn.execute(text("UPDATE runs SET claimed = :t WHERE id = :id"),
                     {"id": waiting, "t": time.time()})

    assert sorted(jobs.reap(store)) == sorted([gone, never])
    assert store.get_run(gone)["error"] == worker.DIED_MESSAGE
    assert store.get_run(never)["error"] == worker.NEVER_STARTED_MESSAGE
    assert store.get_run(elsewhere)["status"] == "running"  # another host's reaper decides
    assert store.get_run(waiting)["status"] == "queued"
    jobs.cancel(waiting, store=store)  # queued with no worker: cancelled at once
    assert store.get_run(waiting)["status"] == "cancelled"
    store.finish_run(elsewhere, "cancelled")


def test_reaper_kills_a_hung_worker(workers):
    store, _ = workers
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    run_id = store.create_run(TINY)
    store.start_run(run_id, pid=sleeper.pid, host=socket.gethostname())
    assert jobs.reap(store, hang_timeout_s=30) == []
    with store._writer.begin() as conn:
        conn.execute(text("UPDATE runs SET updated = updated - 60 WHERE id = :id"),
                     {"id": run_id})
    assert jobs.reap(store, hang_timeout_s=30) == [run_id]
    assert sleeper.wait(5) == -signal.SIGKILL
    assert store.get_run(run_id)["error"].startswith("no progress for 30 s")


def test_is_alive():
    assert local_backend.is_alive(os.getpid())
    assert not local_backend.is_alive(2**31 - 1) and not local_backend.is_alive(0)
    child = subprocess.Popen(["true"])
    wait_for(lambda: not local_backend.is_alive(child.pid), "the child to end")  # a zombie is dead
    child.wait()


def test_worker_command_refuses_an_unknown_run(workers, capsys):
    from engine.cli import main

    store, _ = workers
    assert main(["worker", "nope", "--store", store.url]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
