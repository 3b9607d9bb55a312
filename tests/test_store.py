"""The run store: a run's life cycle, events into history and variants, what a finished run
keeps, and two processes writing one store at once.

Every test that takes `store` runs on SQLite and on PostgreSQL (see conftest.py); the few
about SQLite's own machinery (WAL, file paths) take `sqlite_store` or no store at all."""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import sys
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy import text

from engine.errors import UserError
from engine.settings import artifacts_root
from engine.settings import store_url as default_url
from engine.store import Store, run_dir

RECIPE = {"data": {"source": "builtin:iris"}, "model": {"source": "builtin:mlp", "hidden": [8]},
          "train": {"epochs": 3}}


@pytest.fixture
def store(store_url):
    """A fresh, empty store on each backend in turn (conftest.py's `store_url`)."""
    return Store(store_url)


@pytest.fixture
def sqlite_store(tmp_path, monkeypatch):
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


def test_urls_and_folders(tmp_path, monkeypatch):  # SQLite only: file paths made absolute
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORKBENCH_STORE", raising=False)
    monkeypatch.delenv("WORKBENCH_ARTIFACTS", raising=False)
    assert default_url() == f"sqlite:///{tmp_path}/runs/workbench.db"
    assert artifacts_root() == tmp_path / "runs" / "artifacts"
    assert Store("sqlite:///rel.db").url == f"sqlite:///{tmp_path}/rel.db"  # absolute for workers
    monkeypatch.setenv("WORKBENCH_STORE", "sqlite:////elsewhere/x.db")
    assert default_url() == "sqlite:////elsewhere/x.db"


def test_sqlite_runs_in_wal_mode(sqlite_store):  # SQLite only: PRAGMAs have no PostgreSQL twin
    with sqlite_store._db.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_one_engine_per_url_per_process(store):
    assert Store(store.url)._db is store._db


def _write_epochs(url: str, run_id: str, variant: str, count: int, barrier) -> None:
    store = Store(url)
    barrier.wait()  # both writers start together
    for epoch in range(1, count + 1):
        store.record_event(run_id, epoch_event(epoch, variant=variant))
    _exit_now()  # an exception above still ends the process with an error


@pytest.mark.slow
def test_two_processes_write_one_store_at_once(store):
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


def _open_and_create(url: str, barrier, queue) -> None:
    barrier.wait()  # every process opens the brand-new store at the same moment
    try:
        queue.put(Store(url).create_run(RECIPE))
    except Exception as exc:  # reported to the test, which fails on it
        queue.put(f"{type(exc).__name__}: {exc}")
    _exit_now(queue)


def _exit_now(queue=None) -> None:
    """End a spawned helper once its work is stored: a process that imported the engine
    has been seen to abort (SIGABRT) in the interpreter's teardown, after its work was
    done, which is not what these tests are about."""
    if queue is not None:
        queue.close()
        queue.join_thread()  # the result is in the pipe before the process goes
    sys.stdout.flush()
    os._exit(0)


def test_processes_opening_a_new_store_at_once(store_url):
    """Workers starting together on an empty store all make its tables at once: on
    PostgreSQL that raced to CREATE TABLE until the store took a lock for it."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open_and_create, args=(store_url, barrier, queue))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    made = sorted(queue.get(timeout=5) for _ in procs)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sorted(r["id"] for r in Store(store_url).list_runs()) == made


def _claim_together(url: str, barrier: threading.Barrier, claimed: list[str]) -> None:
    mine = Store(url)  # a dispatcher of its own: its own Store, its own connection
    barrier.wait()
    for _ in range(3):
        claimed.extend(mine.claim_queued(limit=2))


def test_concurrent_claims_never_exceed_the_limit_nor_repeat_a_run(store_url):
    """Six dispatchers claim from 10 queued runs with limit=2 at the same moment, three
    times each, for two rounds: never more than 2 hold a worker, no run is claimed twice,
    and the oldest go first. (PostgreSQL: the advisory lock; SQLite: BEGIN IMMEDIATE.)"""
    store = Store(store_url)
    queued = []
    for i in range(10):
        queued.append(store.create_run(RECIPE, name=f"r{i}"))
        time.sleep(0.002)  # distinct creation times: "oldest first" is well defined
    for round_ in range(2):
        barrier, claimed = threading.Barrier(6), []
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            for future in [pool.submit(_claim_together, store_url, barrier, claimed)
                           for _ in range(6)]:
                future.result()
        assert len(claimed) == 2 and set(claimed) == set(queued[2 * round_:2 * round_ + 2])
        busy = [r["id"] for r in store.active_runs() if r["claimed"] is not None]
        assert sorted(busy) == sorted(claimed)
        for run_id in claimed:  # their workers end: the next round claims the next two
            store.finish_run(run_id, "done")


def test_concurrent_events_keep_every_progress_key(store):
    """Writers of one run's events each merge their keys into its progress summary; none
    may drop another's (PostgreSQL needed a row lock: SQLite serializes writers anyway)."""
    run_id = store.create_run(RECIPE)
    barrier = threading.Barrier(4)

    def write(worker: int) -> None:
        barrier.wait()
        for i in range(15):
            store.record_event(run_id, {"event": "stage", f"w{worker}_{i}": i})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(write, w) for w in range(4)]:
            future.result()
    progress = store.get_run(run_id)["progress"]
    assert {f"w{w}_{i}" for w in range(4) for i in range(15)} <= set(progress)
    assert len(store.events(run_id)) == 60


def test_an_older_store_gains_the_new_columns(store_url):
    """A store made before `backend`, `node`, `claimed`, ... existed opens, gets the
    columns, and its runs stay readable."""
    old = sa.MetaData()
    sa.Table("runs", old, sa.Column("id", sa.String(32), primary_key=True),
             sa.Column("name", sa.String(200)), sa.Column("kind", sa.String(20)),
             sa.Column("status", sa.String(20)), sa.Column("recipe", sa.Text),
             sa.Column("created", sa.Float), sa.Column("started", sa.Float),
             sa.Column("finished", sa.Float), sa.Column("error", sa.Text),
             sa.Column("cancel_requested", sa.Boolean, nullable=False),
             sa.Column("progress", sa.Text), sa.Column("result", sa.Text))
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        old.create_all(conn)
        conn.execute(old.tables["runs"].insert().values(
            id="ab" * 16, name="old", kind="train", status="done", recipe='{"a": 1}',
            created=1.5, started=2.0, finished=3.25, cancel_requested=False))
    engine.dispose()
    store = Store(store_url)
    run = store.get_run("ab" * 16)
    assert run["name"] == "old" and run["recipe"] == {"a": 1} and run["duration_s"] == 1.25
    assert run["backend"] is None and run["node"] is None and run["claimed"] is None
    assert run["cancel_requested"] is False
    assert store.start_run(store.create_run(RECIPE), pid=1, host="h", node="n1")


def test_timestamps_round_trip_exactly(store, monkeypatch):
    """Times are epoch seconds stored as double precision on every backend: a time with
    sub-microsecond digits reads back bit for bit (a 4-byte float would lose minutes)."""
    import engine.store as store_mod

    t = 1795405855.2985532
    monkeypatch.setattr(store_mod.time, "time", lambda: t)
    run_id = store.create_run(RECIPE)
    monkeypatch.setattr(store_mod.time, "time", lambda: t + 0.000123)
    store.start_run(run_id, pid=1, host="h")
    run = store.get_run(run_id)
    assert run["created"] == t and run["started"] == t + 0.000123
    assert isinstance(run["created"], float)


def test_an_error_with_a_nul_character_still_finishes_the_run(store):
    """A worker log's tail may hold a NUL byte; PostgreSQL text cannot, so it becomes
    U+FFFD there. The run must end either way."""
    run_id = store.create_run(RECIPE)
    assert store.finish_run(run_id, "failed", error="bad\x00byte")
    error = store.get_run(run_id)["error"]
    expected = "bad\ufffdbyte" if store.url.startswith("postgresql") else "bad\x00byte"
    assert error == expected


def test_backup_copies_a_sqlite_store_and_points_a_server_store_to_its_tools(store, tmp_path):
    run_id = store.create_run(RECIPE)
    if store.url.startswith("sqlite"):
        copy = store.backup(tmp_path / "copy" / "b.db")
        assert Store(f"sqlite:///{copy}").get_run(run_id)["recipe"] == RECIPE
    else:
        with pytest.raises(UserError, match="pg_dump"):
            store.backup(tmp_path / "b.db")
