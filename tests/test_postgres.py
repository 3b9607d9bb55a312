"""Optuna's trials in a PostgreSQL store: `engine.tune.search` builds its RDBStorage from the
store URL (`engine.tune._storage`), so a search on a shared PostgreSQL store keeps its study
beside the runs. The server and the per-test schema come from conftest.py's `postgres_url`."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from engine.recipe import Recipe
from engine.runner import resolve
from engine.store import Store
from engine.tune import search, validate_tune

pytestmark = pytest.mark.slow  # real servers, processes or a browser: the full tier


def tiny(tune: dict) -> Recipe:
    recipe = resolve({"data": {"source": "builtin:iris"},
                               "model": {"source": "builtin:logreg"},
                               "train": {"epochs": 2, "early_stopping": None}})
    return recipe.replace(tune=validate_tune(tune))


def test_a_search_keeps_its_study_in_postgresql_and_workers_share_it(postgres_url):
    tune = {"sampler": "random", "n_trials": 3, "seed": 0, "study": "pg-study",
            "space": {"train.lr": {"low": 1e-3, "high": 0.3, "log": True}}}
    seen = []
    result = search(tiny(tune), storage=postgres_url, on_trial=seen.append)
    assert [t["number"] for t in seen] == [0, 1, 2]
    assert [t["state"] for t in result["trials"]] == ["COMPLETE"] * 3
    assert all(1e-3 <= t["params"]["train.lr"] <= 0.3 for t in result["trials"])
    assert result["best_value"] == max(t["values"][0] for t in result["trials"])

    # The same study name resumes from the server, the 3 trials counting toward 5, and two
    # spawned worker processes share the study through it for the last 2.
    seen.clear()
    again = search(tiny({**tune, "n_trials": 5, "workers": 2}), storage=postgres_url,
                   on_trial=seen.append)
    assert sorted(t["number"] for t in seen) == [3, 4]
    assert [t["state"] for t in again["trials"]] == ["COMPLETE"] * 5

    # Optuna's tables and the run store's share the test's schema without clashing.
    store = Store(postgres_url)
    assert store.list_runs() == []
    with sa.create_engine(postgres_url, poolclass=sa.NullPool).connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar()
    assert {"studies", "trials", "runs", "events"} <= tables and schema.startswith("test_")
