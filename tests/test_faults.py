"""Faults and concurrency: a worker killed by SIGKILL mid-compression, an app restart
mid-run, a store copied while written, cancel at every stage, six runs queued at once
behind a worker limit of two, out-of-memory, and strings that try to become commands or
paths. Real worker processes, a real SQLite store."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import jobs, local_backend, settings, worker
from engine.bundle import is_bundle
from engine.errors import UserError
from engine.store import ACTIVE, Store, run_dir
from tests.test_jobs import epochs_done, finished, wait_for

TINY = {"data": {"source": "builtin:iris"}, "model": {"source": "builtin:mlp", "hidden": [8]},
        "train": {"epochs": 3}}
# A quick baseline, then a fine-tune that would take minutes: killed or cancelled mid-way.
COMPRESSING = {"data": {"source": "builtin:digits"},
               "model": {"source": "builtin:mlp", "hidden": [256, 256]},
               "train": {"epochs": 2, "early_stopping": None},
               "compress": [{"technique": "prune", "method": "magnitude", "amount": 0.5,
                             "finetune_epochs": 1000}]}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.setenv("WORKBENCH_MAX_WORKERS", "2")
    yield Store(f"sqlite:///{tmp_path}/s.db")
    for proc in list(local_backend._PROCS.values()):  # a failed test may leave a worker behind
        proc.kill()
        proc.wait(10)
    local_backend._PROCS.clear()


def in_compression(store: Store, run_id: str) -> None:
    """Wait until the baseline variant is stored and the fine-tune has run two epochs."""
    def ready() -> bool:
        run = store.get_run(run_id)
        assert run["status"] in ACTIVE, run["error"]
        return (any(v["name"] == "baseline" for v in store.variants(run_id))
                and len(store.history(run_id, "prune").get("epoch", [])) >= 2)

    wait_for(ready, "the fine-tune to start", timeout=120)


@pytest.mark.slow
def test_sigkill_mid_compression_keeps_every_finished_variant(store):
    run_id = jobs.submit(COMPRESSING, store=store, threads=1)
    in_compression(store, run_id)
    os.killpg(store.get_run(run_id)["pid"], signal.SIGKILL)
    assert wait_for(lambda: run_id in jobs.reap(store), "the reaper")

    fresh = Store(store.url)  # what an app started afterwards reads
    run = fresh.get_run(run_id)
    assert run["status"] == "failed" and run["error"] == worker.DIED_MESSAGE
    result = fresh.result(run_id)
    baseline = next(v for v in result["variants"] if v["name"] == "baseline")
    assert baseline["metrics"]["test_accuracy"] > 0.5 and is_bundle(baseline["model_file"])
    assert baseline["history"]["epoch"] == [1, 2]
    fine_tune = next(v for v in result["variants"] if v["name"] == "prune")  # its epochs so far
    assert len(fine_tune["history"]["epoch"]) >= 2 and not fine_tune["metrics"]
    assert "prune-magnitude" not in [v["name"] for v in fresh.variants(run_id)]


@pytest.mark.slow
def test_app_restart_mid_run_leaves_the_run_to_finish(store):
    run_id = jobs.submit(TINY | {"train": {"epochs": 40}}, store=store, threads=1)
    epochs_done(store, run_id, 1)
    local_backend._PROCS.clear()  # a restarted app knows its workers only from the store
    assert jobs.reap(Store(store.url)) == []  # alive by its pid: not failed
    assert finished(Store(store.url), run_id)["status"] == "done"


@pytest.mark.slow
def test_a_hung_worker_is_killed_after_the_configured_time(store, monkeypatch):
    run_id = jobs.submit(COMPRESSING, store=store, threads=1)
    in_compression(store, run_id)
    monkeypatch.setenv("WORKBENCH_HANG_TIMEOUT_S", "1")  # the reaper's limit, not the worker's
    os.killpg(store.get_run(run_id)["pid"], signal.SIGSTOP)  # hangs: stopped, so silent
    time.sleep(1.5)
    assert jobs.reap(store) == [run_id]
    run = store.get_run(run_id)
    assert run["status"] == "failed" and "no progress for 1 s" in run["error"]
    assert any(v["name"] == "baseline" for v in store.variants(run_id))


HANGS = """
import sys, time
from engine import worker

def stuck(*args, **kwargs):
    kwargs["on_progress"]({"event": "stage", "stage": "train"})
    time.sleep(60)  # a call that never returns

worker.run_recipe = stuck
sys.exit(worker.run_worker(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.slow
def test_a_worker_stops_itself_when_it_hangs_with_no_app_polling(store, tmp_path):
    run_id = store.create_run(TINY)
    env = {**os.environ, "WORKBENCH_HANG_TIMEOUT_S": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HANGS, run_id, store.url], env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert done.returncode == 3 and time.monotonic() - start < 30
    run = store.get_run(run_id)
    assert run["status"] == "failed" and run["error"] == worker.hang_message(1)
    assert store.events(run_id)[0]["stage"] == "train"  # what it said before, kept


@pytest.mark.slow
def test_wait_returns_every_run_once_ended(store):
    ids = [jobs.submit(TINY, store=store) for _ in range(3)]
    runs = jobs.wait(ids, store=store, timeout_s=120)
    assert [r["status"] for r in runs] == ["done"] * 3


def test_bad_limits_are_one_sentence(monkeypatch):
    monkeypatch.setenv("WORKBENCH_MAX_WORKERS", "many")
    with pytest.raises(UserError, match="WORKBENCH_MAX_WORKERS must be a positive whole number"):
        settings.max_workers()
    monkeypatch.setenv("WORKBENCH_HANG_TIMEOUT_S", "soon")
    with pytest.raises(UserError, match="WORKBENCH_HANG_TIMEOUT_S"):
        settings.hang_limit_s()
    monkeypatch.setenv("WORKBENCH_HANG_TIMEOUT_S", "0")
    assert settings.hang_limit_s() is None


@pytest.mark.slow
def test_cancel_works_queued_running_and_finished(store, monkeypatch):
    monkeypatch.setenv("WORKBENCH_MAX_WORKERS", "1")
    busy = jobs.submit(COMPRESSING, store=store, threads=1)
    waiting = jobs.submit(TINY, store=store)  # behind the limit: queued, no worker
    assert store.get_run(waiting)["claimed"] is None
    jobs.cancel(waiting, store=store, grace_s=0)
    assert store.get_run(waiting)["status"] == "cancelled"

    in_compression(store, busy)  # cancel mid-compression
    jobs.cancel(busy, store=store)
    run = store.get_run(busy)
    assert run["status"] == "cancelled" and run["error"] == worker.CANCELLED_MESSAGE
    assert any(v["name"] == "baseline" for v in store.variants(busy))

    done = jobs.submit(TINY, store=store)  # the slot is free again
    assert finished(store, done)["status"] == "done"
    jobs.cancel(done, store=store)
    assert store.get_run(done)["status"] == "done"  # a finished run stays as it is


@pytest.mark.slow
def test_six_runs_behind_a_limit_of_two_all_finish(store):
    ids = [jobs.submit(TINY, store=store, name=f"load {i}", threads=1) for i in range(6)]
    most, stop = [0], threading.Event()

    def watch() -> None:  # the limit holds at every moment, not just at the end
        watcher = Store(store.url)
        while not stop.is_set():
            active = [r for r in watcher.active_runs() if r["claimed"] is not None]
            most[0] = max(most[0], len(active))
            time.sleep(0.05)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        for run_id in ids:
            assert finished(store, run_id, timeout=240)["status"] == "done"
    finally:
        stop.set()
        thread.join()
    assert 1 <= most[0] <= 2
    for run_id in ids:  # consistent: every epoch, the variant, the end, the files
        run = store.get_run(run_id)
        assert run["started"] <= run["finished"] and run["pid"] and run["node"]
        assert store.history(run_id)["epoch"] == [1, 2, 3]
        assert [v["name"] for v in store.variants(run_id)] == ["baseline"]
        assert store.events(run_id)[-1]["event"] == "finished"
        assert (run_dir(run_id) / "result.json").is_file()
    assert len(store.list_runs()) == 6


@pytest.mark.slow
def test_a_store_copied_while_written_keeps_finished_runs(store, tmp_path):
    done = jobs.submit(TINY, store=store)
    assert finished(store, done)["status"] == "done"
    busy = store.create_run(TINY)
    store.start_run(busy, pid=os.getpid(), host="elsewhere")
    stop = threading.Event()

    def write() -> None:  # events keep arriving while the file is copied
        writer, epoch = Store(store.url), 0
        while not stop.is_set():
            epoch += 1
            writer.record_event(busy, {"event": "epoch", "epoch": epoch, "train_loss": 1.0})

    thread = threading.Thread(target=write)
    thread.start()
    try:
        time.sleep(0.2)
        database = store.url.removeprefix("sqlite:///")
        copies = []
        for i in range(3):
            copies.append(shutil.copy(database, tmp_path / f"plain{i}.db"))  # a plain `cp`
            copies.append(str(store.backup(tmp_path / f"backup{i}.db")))  # the safe way
    finally:
        stop.set()
        thread.join()
    for copy in copies:
        with sqlite3.connect(copy) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        readable = Store(f"sqlite:///{copy}")
        assert readable.get_run(done)["status"] == "done"
        [variant] = readable.variants(done)
        assert variant["metrics"]["test_accuracy"] > 0
        assert readable.history(done)["epoch"] == [1, 2, 3]


def test_out_of_memory_is_one_sentence_and_the_worker_goes_on(store, monkeypatch):
    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    first = store.create_run(TINY)
    monkeypatch.setattr(worker, "run_recipe", exhausted)
    assert worker.run_worker(first, store.url) == 2
    error = store.get_run(first)["error"]
    assert error.startswith("out of GPU memory at batch size 64; lower the batch size")
    monkeypatch.undo()
    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(run_dir(first).parent))
    second = store.create_run(TINY)  # the same process runs the next one
    assert worker.run_worker(second, store.url) == 0
    assert store.get_run(second)["status"] == "done"


@pytest.mark.slow
def test_no_string_becomes_a_command_or_a_path(store, tmp_path):
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker}); `touch {marker}` | touch {marker}"
    run_id = jobs.submit({**TINY, "name": hostile}, store=store, name=hostile)
    assert finished(store, run_id)["status"] == "done"
    assert not marker.exists()
    assert store.get_run(run_id)["name"] == hostile[:200]  # kept as text, never run
    for bad in ("../../etc", "/tmp/x", "a/b", "", "..", "ABC"):
        with pytest.raises(UserError, match="is not a run id"):
            run_dir(bad)
    assert run_dir(run_id).parent == run_dir(run_id).parent.resolve()


def test_two_sessions_see_their_own_runs(store):
    mine = store.create_run(TINY, owner="session-a")
    theirs = store.create_run(TINY, owner="session-b")
    assert [r["id"] for r in store.list_runs(owner="session-a")] == [mine]
    assert [r["id"] for r in store.list_runs(owner="session-b")] == [theirs]
    assert {r["id"] for r in store.list_runs()} == {mine, theirs}
    for run_id in (mine, theirs):
        store.finish_run(run_id, "cancelled")


def test_a_message_shown_alone_starts_with_a_capital_unless_it_opens_on_a_name():
    from engine.errors import reword, sentence

    assert sentence("the labels go up to 7; pick another file.") == (
        "The labels go up to 7; pick another file.")
    for name_first in ("builtin:digits is unknown", "data.source is missing", "`X` is empty",
                       "'flat.csv' has no rows", "Already a sentence."):
        assert sentence(name_first) == name_first
    assert reword("data.missing: pick one", {"data.missing": "Missing values"}, {}) == (
        "\u201cMissing values\u201d: pick one")
