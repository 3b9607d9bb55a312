"""The showcase: a reduced one runs end to end through real workers, every expected variant
is stored, and pressing again submits nothing that is done or still running."""

from __future__ import annotations

import time

import pytest

from engine import jobs, local_backend, showcase
from engine.compress import step_name
from engine.runner import resolve
from engine.store import ACTIVE, Store, run_dir

pytestmark = pytest.mark.slow  # real servers, processes or a browser: the full tier


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("showcase")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_ARTIFACTS", str(root / "art"))
        yield Store(f"sqlite:///{root}/s.db")
        for proc in list(local_backend._PROCS.values()):  # a failed test may leave a worker behind
            proc.kill()
            proc.wait(10)


def wait_all(store: Store, run_ids: list[str], timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs.reap(store)
        runs = [store.get_run(i) for i in run_ids]
        if all(r["status"] not in ACTIVE for r in runs):
            return runs
        time.sleep(0.3)
    raise AssertionError(f"the showcase did not finish in {timeout} s")


def expected_variants(recipe: dict) -> list[str]:
    used: set[str] = set()
    return ["baseline", *(step_name(s, used) for s in recipe["compress"])]


def test_keys_are_stable_and_distinct():
    entries = showcase.recipes(quick=True)
    assert len({e.key for e in entries}) == len(entries)
    first = entries[0]
    spelled_out = resolve(first.recipe).to_dict()  # every default written
    assert showcase.recipe_key(spelled_out) == first.key
    assert showcase.recipe_key({**first.recipe, "name": "renamed"}) == first.key
    assert showcase.key_of(first.name) == first.key
    assert showcase.display_name(first.name) == "baseline (adam) · mlp on iris"
    assert showcase.display_name("my run") == "my run"
    kinds = [e.kind for e in showcase.recipes()]
    assert kinds.count("baseline") == 1 and kinds.count("race") == len(showcase.RACE) - 1
    techniques = {e.recipe["compress"][0]["technique"] for e in showcase.recipes()
                  if e.kind == "compress"}
    assert techniques == {"prune", "quantize", "distill", "lowrank", "deep_compression"}


def test_reduced_showcase_stores_every_variant_and_a_second_press_reuses_them(store):
    entries = showcase.recipes(quick=True)
    # a failed earlier attempt at one recipe is not reused: it is run again
    failed = store.create_run(entries[1].recipe, name=entries[1].name, group=showcase.GROUP)
    store.finish_run(failed, "failed", error="an earlier attempt")

    first = showcase.launch(store, quick=True)
    assert len(first.run_ids) == len(entries) and first.submitted == first.run_ids
    assert failed not in first.run_ids
    again = showcase.launch(store, quick=True)  # while the runs are queued or running
    assert again.submitted == [] and again.run_ids == first.run_ids

    runs = wait_all(store, first.run_ids)
    for entry, run in zip(entries, runs, strict=True):
        log = (run_dir(run["id"]) / "worker.log").read_text()
        assert run["status"] == "done", f"{entry.label}: {run['error']}\n{log[-2000:]}"
        assert run["group_id"] == showcase.GROUP and run["name"] == entry.name
        assert [v["name"] for v in store.variants(run["id"])] == expected_variants(run["recipe"])
    race = [r for e, r in zip(entries, runs, strict=True) if e.kind in ("baseline", "race")]
    assert {r["recipe"]["train"]["optimizer"] for r in race} == set(showcase.QUICK_RACE)

    done = showcase.launch(store, quick=True)  # once finished: reused, nothing new
    assert done.submitted == [] and done.run_ids == first.run_ids
    assert done.reused == first.run_ids
    assert showcase.progress(store, done.run_ids) == {"done": len(entries), "active": 0,
                                                      "failed": 0}
