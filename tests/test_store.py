"""The run store: a run's life cycle, events into history and variants, what a finished run
keeps, and two processes writing one SQLite file at once."""

from __future__ import annotations

import math
import multiprocessing
import time

import pytest
from sqlalchemy import text

from engine.errors import UserError
from engine.store import Store, artifacts_root, default_url, run_dir

RECIPE = {"data": {"source": "builtin:iris"}, "model": {"source": "builtin:mlp", "hidden": [8]},
          "train": {"epochs": 3}}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(tmp_path / "art"))
    return Store(f"sqlite:///{tmp_path}/s.db")


def epoch_event(epoch: int, variant: str = "baseline", **figures: float) -> dict:
    return {"event": "epoch", "variant": variant, "epoch": epoch, "epochs": 3,
            "train_loss": 1.0 / epoch, "train_accuracy": 0.5, "val_loss": 1.5 / epoch,
            "val_accuracy": 0.4, "lr": 0.01, "time_s": 0.1 * epoch, **figures}


def test_lifecycle_and_timestamps(store):
    before = time.time()
    run_id = store.create_run(RECIPE, name="iris", group="g1")
    run = store.get_run(run_id)
    assert run["status"] == "queued" and run["name"] == "iris" and run["group_id"] == "g1"
    assert run["kind"] == "train" and run["recipe"] == RECIPE
    assert before <= run["created"] <= time.time()
    assert run["started"] is None and run["duration_s"] is None
    assert [r["id"] for r in store.active_runs()] == [run_id]

    assert store.start_run(run_id, pid=1234, host="box", device="cpu")
    run = store.get_run(run_id)
    assert (run["status"], run["pid"], run["host"], run["device"]) == ("running", 1234, "box",
                                                                      "cpu")
    assert run["started"] >= run["created"] and run["duration_s"] >= 0
    assert not store.start_run(run_id, pid=1, host="box")  # only a queued run starts

    assert store.finish_run(run_id, "done", result={"device": "cpu", "variants": []})
    run = store.get_run(run_id)
    assert run["status"] == "done" and run["finished"] >= run["started"]
    assert run["duration_s"] == pytest.approx(run["finished"] - run["started"])
    assert run["result"] == {"device": "cpu", "variants": []}
    assert store.active_runs() == []
    assert store.events(run_id)[-1]["event"] == "finished"


def test_a_finished_run_is_never_overwritten(store):
    run_id = store.create_run(RECIPE)
    store.start_run(run_id, pid=1, host="box")
    assert store.finish_run(run_id, "done")
    assert not store.finish_run(run_id, "failed", error="late reaper")
    run = store.get_run(run_id)
    assert run["status"] == "done" and run["error"] is None
    with pytest.raises(ValueError):
        store.finish_run(run_id, "running")


def test_events_fill_history_variants_and_progress(store):
    run_id = store.create_run(RECIPE)
    store.start_run(run_id, pid=1, host="box")
    store.record_event(run_id, {"event": "stage", "stage": "train", "message": "training",
                                "epochs": 3})
    for epoch in (2, 1, 3):  # stored out of order, read back in epoch order
        store.record_event(run_id, epoch_event(epoch, val_loss=math.nan if epoch == 3 else 0.5))
    store.record_event(run_id, epoch_event(2, train_loss=0.25))  # a repeat replaces the row
    store.record_event(run_id, {"event": "variant", "name": "baseline", "technique": None,
                                "metrics": {"test_accuracy": 0.9, "test_loss": math.inf},
                                "model_file": "baseline.pt2"})

    history = store.history(run_id)
    assert list(history) == ["epoch", "train_loss", "train_accuracy", "val_loss",
                             "val_accuracy", "lr", "time_s"]
    assert history["epoch"] == [1, 2, 3]
    assert history["train_loss"] == [1.0, 0.25, pytest.approx(1 / 3)]
    assert history["val_loss"] == [0.5, 0.75, None]  # NaN is stored as null
    assert store.history(run_id, "pruned") == {}

    [variant] = store.variants(run_id)
    assert variant["name"] == "baseline" and variant["position"] == 0
    assert variant["metrics"] == {"test_accuracy": 0.9, "test_loss": None}
    assert variant["model_file"] == str(run_dir(run_id) / "baseline.pt2")
    assert run_dir(run_id).is_absolute() and run_dir(run_id).parent == artifacts_root()

    progress = store.get_run(run_id)["progress"]
    assert progress["stage"] == "train" and progress["epochs"] == 3 and progress["epoch"] == 2

    log = store.events(run_id)
    assert [e["event"] for e in log] == ["stage", "epoch", "epoch", "epoch", "epoch", "variant"]
    assert log[0]["message"] == "training" and log[0]["time"] > 0
    assert store.events(run_id, after_id=log[-2]["id"]) == log[-1:]


def test_list_runs_newest_first_with_baseline_metrics(store):
    ids = []
    for i in range(3):
        ids.append(store.create_run(RECIPE, name=f"run{i}", group="race" if i else None))
        time.sleep(0.002)
    store.record_event(ids[1], {"event": "variant", "name": "baseline", "technique": None,
                                "metrics": {"test_accuracy": 0.8}, "model_file": None})
    store.record_event(ids[1], {"event": "variant", "name": "pruned", "technique": "prune",
                                "metrics": {"test_accuracy": 0.7}, "model_file": None})
    store.finish_run(ids[2], "failed", error="boom")

    rows = store.list_runs()
    assert [r["id"] for r in rows] == ids[::-1]  # one row per run: the join takes baseline only
    assert rows[1]["metrics"] == {"test_accuracy": 0.8} and rows[0]["metrics"] == {}
    assert "result" not in rows[0]
    assert [r["id"] for r in store.list_runs(status="failed")] == [ids[2]]
    assert [r["id"] for r in store.list_runs(group="race")] == [ids[2], ids[1]]
    assert [r["id"] for r in store.list_runs(limit=1)] == [ids[2]]
    assert [v["position"] for v in store.variants(ids[1])] == [0, 1]


def test_cancel_flag(store):
    run_id = store.create_run(RECIPE)
    assert not store.cancel_requested(run_id)
    store.request_cancel(run_id)
    assert store.cancel_requested(run_id) and store.get_run(run_id)["cancel_requested"]


def test_delete_removes_rows_and_folder(store):
    run_id = store.create_run(RECIPE)
    store.record_event(run_id, epoch_event(1))
    store.record_event(run_id, {"event": "variant", "name": "baseline", "technique": None,
                                "metrics": {}, "model_file": "baseline.pt2"})
    run_dir(run_id).mkdir(parents=True)
    (run_dir(run_id) / "baseline.pt2").write_bytes(b"x")
    with pytest.raises(UserError, match="still active"):
        store.delete_run(run_id)
    store.finish_run(run_id, "done")
    store.delete_run(run_id)
    assert store.get_run(run_id) is None and not run_dir(run_id).exists()
    with store._db.connect() as conn:
        for table in ("epochs", "variants", "events"):
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0


def test_result_assembles_histories_also_for_a_failed_run(store):
    done = store.create_run(RECIPE)
    for epoch in (1, 2):
        store.record_event(done, epoch_event(epoch))
    store.record_event(done, {"event": "variant", "name": "baseline", "technique": None,
                              "metrics": {"test_accuracy": 0.9}, "model_file": "baseline.pt2"})
    full = {"recipe": RECIPE, "device": "cpu", "tuning": None, "diagnostics": {},
            "variants": [{"name": "baseline", "technique": None, "model_file": "baseline.pt2",
                          "metrics": {"test_accuracy": 0.9}, "history": {"epoch": [1, 2]}}]}
    store.finish_run(done, "done", result=full)
    assert "history" not in store.get_run(done)["result"]["variants"][0]  # kept once, in epochs
    result = store.result(done)
    assert result["status"] == "done" and result["device"] == "cpu"
    [variant] = result["variants"]
    assert variant["metrics"] == {"test_accuracy": 0.9}
    assert variant["history"]["epoch"] == [1, 2] and len(variant["history"]["val_loss"]) == 2
    assert variant["model_file"] == str(run_dir(done) / "baseline.pt2")

    failed = store.create_run(RECIPE)  # killed after two epochs: no variant, no result
    for epoch in (1, 2):
        store.record_event(failed, epoch_event(epoch))
    store.finish_run(failed, "failed", error="killed")
    result = store.result(failed)
    assert result["recipe"] == RECIPE and result["error"] == "killed"
    assert [v["name"] for v in result["variants"]] == ["baseline"]
    assert result["variants"][0]["history"]["epoch"] == [1, 2]
    assert result["variants"][0]["model_file"] is None


def test_unknown_run_is_a_user_error(store):
    assert store.get_run("nope") is None
    for call in (lambda: store.history("nope"), lambda: store.variants("nope"),
                 lambda: store.events("nope"), lambda: store.result("nope"),
                 lambda: store.record_event("nope", epoch_event(1)),
                 lambda: store.request_cancel("nope"), lambda: store.cancel_requested("nope"),
                 lambda: store.start_run("nope", pid=1, host="h"),
                 lambda: store.finish_run("nope", "done"), lambda: store.delete_run("nope")):
        with pytest.raises(UserError, match="there is no run 'nope'"):
            call()


def test_urls_and_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORKBENCH_STORE", raising=False)
    monkeypatch.delenv("WORKBENCH_ARTIFACTS", raising=False)
    assert default_url() == f"sqlite:///{tmp_path}/runs/workbench.db"
    assert artifacts_root() == tmp_path / "runs" / "artifacts"
    assert Store("sqlite:///rel.db").url == f"sqlite:///{tmp_path}/rel.db"  # absolute for workers
    monkeypatch.setenv("WORKBENCH_STORE", "sqlite:////elsewhere/x.db")
    assert default_url() == "sqlite:////elsewhere/x.db"


def test_sqlite_runs_in_wal_mode(store):
    with store._db.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    assert Store(store.url)._db is store._db  # one engine per URL per process


def _write_epochs(url: str, run_id: str, variant: str, count: int, barrier) -> None:
    store = Store(url)
    barrier.wait()  # both writers start together
    for epoch in range(1, count + 1):
        store.record_event(run_id, epoch_event(epoch, variant=variant))


def test_two_processes_write_one_file_at_once(store):
    run_id = store.create_run(RECIPE)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_epochs, args=(store.url, run_id, v, 200, barrier))
             for v in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    for variant in ("a", "b"):
        assert store.history(run_id, variant)["epoch"] == list(range(1, 201))
    assert len(store.events(run_id)) == 400
