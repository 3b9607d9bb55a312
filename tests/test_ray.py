"""The Ray backend against a real local Ray instance (2 CPUs): a 4-trial search whose
trials are Ray tasks, a 3-chain comparison with one task per chain, and cancel reaching a
task, all through `engine.jobs`, with results in the store shaped as a local run's."""

from __future__ import annotations

import os

import pytest

from engine import jobs, ray_backend
from engine.store import Store
from tests.test_jobs import epochs_done, finished

pytestmark = pytest.mark.slow  # real servers, processes or a browser: the full tier

ray = pytest.importorskip("ray", reason="the Ray backend tests need `ray` (requirements.txt)")

BASE = {"data": {"source": "builtin:iris"},
        "model": {"source": "builtin:mlp", "hidden": [8]}, "train": {"epochs": 4}}
SEARCH = {**BASE, "tune": {"sampler": "random", "n_trials": 4, "workers": 2,
                           "space": {"train.lr": {"low": 0.001, "high": 0.1, "log": True}}}}
CHAINS = [[{"technique": "prune", "method": "magnitude", "amount": 0.5, "finetune_epochs": 1}],
          [{"technique": "quantize", "method": "dynamic_int8"}],
          [{"technique": "prune", "method": "magnitude", "amount": 0.5, "finetune_epochs": 1},
           {"technique": "share", "bits": 4, "finetune_epochs": 1}]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_ARTIFACTS", str(root / "art"))
        mp.delenv("WORKBENCH_RAY_ADDRESS", raising=False)
        mp.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": repo}})
        try:
            yield Store(f"sqlite:///{root}/s.db")
        finally:
            ray.shutdown()


def shape(result: dict) -> tuple:
    """What must not differ between backends: the result's keys and each variant's."""
    return (sorted(result), [sorted(v) for v in result["variants"]],
            sorted(result["tuning"] or {}))


def test_a_search_fans_its_trials_out_as_ray_tasks(cluster):
    store = cluster
    run_id = jobs.submit(SEARCH, store=store, backend="ray", name="ray search")
    run = finished(store, run_id, timeout=240)
    assert run["status"] == "done", run["error"]
    assert run["backend"] == "ray" and run["node"].startswith("ray:")
    tuning = store.result(run_id)["tuning"]
    assert len([t for t in tuning["trials"] if t["state"] == "COMPLETE"]) == 4

    one_process = {**SEARCH, "tune": {**SEARCH["tune"], "workers": 1}}  # the shape is the same
    local = jobs.submit(one_process, store=store, backend="local")
    assert finished(store, local, timeout=240)["status"] == "done"
    assert store.get_run(local)["backend"] == "local"
    assert shape(store.result(run_id)) == shape(store.result(local))


def test_a_comparison_sends_one_task_per_chain(cluster):
    store = cluster
    ids = jobs.compare(BASE, CHAINS, store=store, backend="ray")
    assert len(ids) == 3 and len({store.get_run(i)["group_id"] for i in ids}) == 1
    names = []
    for run_id in ids:
        assert finished(store, run_id, timeout=240)["status"] == "done"
        names.append([v["name"] for v in store.variants(run_id)])
    assert names == [["baseline", "prune-magnitude"], ["baseline", "quantize-dynamic_int8"],
                     ["baseline", "prune-magnitude", "share"]]
    resources = ray_backend.resources()
    assert resources["CPUs"]["total"] == 2


def test_cancel_reaches_the_task(cluster):
    store = cluster
    long = {**BASE, "data": {"source": "builtin:digits"},
            "train": {"epochs": 1000, "early_stopping": None}}
    asked = jobs.submit(long, store=store, backend="ray")
    epochs_done(store, asked, 2)
    jobs.cancel(asked, store=store)  # the task sees the flag at its next epoch
    assert store.get_run(asked)["status"] == "cancelled"

    forced = jobs.submit(long, store=store, backend="ray")
    epochs_done(store, forced, 2)
    jobs.cancel(forced, store=store, grace_s=0)  # no waiting: ray.cancel(force=True)
    run = store.get_run(forced)
    assert run["status"] == "cancelled" and "killed" in run["error"]
    assert jobs.reap(store) == []  # nothing left for the reaper


def test_an_unreachable_cluster_is_one_sentence(monkeypatch):
    from engine.errors import UserError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("WORKBENCH_RAY_ADDRESS", "ray://127.0.0.1:1")
    with pytest.raises(UserError, match=r"could not reach the Ray cluster at ray://127\.0\.0\.1:1"):
        ray_backend.connect()
