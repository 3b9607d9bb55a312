"""Store URLs for tests that must pass on every backend the run store supports.

`store_url` is parametrized over SQLite and PostgreSQL: a test that takes it runs once per
backend, each time on an empty store of its own. `postgres_url` is the PostgreSQL one alone.

PostgreSQL: the server at WORKBENCH_TEST_POSTGRES (default: the one `scripts/postgres.sh`
starts). Each test gets a schema of its own, made for it and dropped after it, and a URL
whose connections put that schema first on the search_path, so no test sees another's
rows and the store's tables (and Optuna's) are created afresh. An unreachable server skips
these tests with one line, except under CI=true, where it fails them: nothing skips in CI.
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest
import sqlalchemy as sa

POSTGRES_DEFAULT = "postgresql+psycopg://workbench:workbench@localhost:5432/workbench"
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(autouse=True)
def _warm_up_finished():
    """An AppTest of app.py starts the app's warm-up thread (the engine's imports, the worker
    zygote, transformers' classes), which outlives the test: the test waits for it, so the
    next one never runs beside it (test_text's `from transformers import BertConfig`, right
    after an AppTest, met a half-imported module: "cannot import name 'BertConfig'")."""
    yield
    for thread in threading.enumerate():
        if thread.name == "workbench-warm-up":
            thread.join(timeout=180)


@pytest.fixture(scope="session")
def postgres_admin():
    """An AUTOCOMMIT engine on the test server (to create and drop schemas), or skip/fail."""
    url = os.environ.get("WORKBENCH_TEST_POSTGRES") or POSTGRES_DEFAULT
    admin = sa.create_engine(url, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT",
                             connect_args={"connect_timeout": 5})
    problem = None
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any failure to connect means "no server"
        problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if problem is not None:  # outside `except`: one line, no chained traceback
        shown = sa.make_url(url).render_as_string(hide_password=True)
        reason = (f"no PostgreSQL at {shown} ({problem}); start one with "
                  f"`bash scripts/postgres.sh` or set WORKBENCH_TEST_POSTGRES")
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    yield admin
    admin.dispose()


@pytest.fixture
def postgres_url(postgres_admin):
    """A PostgreSQL store URL on an empty schema of this test's own, dropped afterwards."""
    schema = f"test_{uuid.uuid4().hex[:16]}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = (sa.make_url(postgres_admin.url)
           .update_query_dict({"options": f"-csearch_path={schema}"})
           .render_as_string(hide_password=False))
    yield url
    _forget_engines(url)
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path, monkeypatch):
    """An empty store's URL on each backend in turn; artifacts go under tmp_path."""
    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(tmp_path / "art"))
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/s.db"
    else:
        yield request.getfixturevalue("postgres_url")


def _forget_engines(url: str) -> None:
    """Close this process's pooled connections to `url` (the store keeps one engine per
    URL), so a test's schema can be dropped and a long run never piles up idle sessions."""
    from engine import store_schema as store

    with store._ENGINES_LOCK:
        for key in [k for k in store._ENGINES if k[1] == url]:
            store._ENGINES.pop(key)[0].dispose()
