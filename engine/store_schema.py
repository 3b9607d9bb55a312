"""The run store's tables, its engines (one per URL per process) and its row helpers.

SQLite gets WAL mode, `BEGIN IMMEDIATE` for write transactions and no automatic
checkpoints; PostgreSQL gets advisory locks where SQLite's write lock would serialize.
`engine.store.Store` is the interface; this module is what it stands on.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select

from engine.errors import UserError

metadata = sa.MetaData()


def _owner() -> sa.Column:
    """The run a row belongs to: deleting the run deletes the row (SQLite enforces foreign
    keys only with PRAGMA foreign_keys=ON, set on every connection)."""
    return sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"),
                     nullable=False)


runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200)),
    sa.Column("group_id", sa.String(100), index=True),  # runs started together (a race)
    sa.Column("kind", sa.String(20), nullable=False, default="train"),
    sa.Column("status", sa.String(20), nullable=False, index=True),
    sa.Column("recipe", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False, index=True),  # epoch seconds
    sa.Column("started", sa.Float),
    sa.Column("finished", sa.Float),
    sa.Column("updated", sa.Float),  # time of the latest event: the reaper's hang check
    sa.Column("device", sa.String(40)),
    sa.Column("host", sa.String(200)),  # the submitting host, then the worker's
    sa.Column("pid", sa.Integer),
    sa.Column("backend", sa.String(20)),  # "local" (a worker process) or "ray" (a task)
    sa.Column("node", sa.String(200)),  # where the worker runs: host name or Ray node
    sa.Column("claimed", sa.Float),  # when a worker was dispatched for the queued run
    sa.Column("owner", sa.String(64), index=True),  # the app session that submitted it
    sa.Column("threads", sa.Integer),  # torch threads asked for the run, if any
    sa.Column("error", sa.Text),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("progress", sa.Text),  # stage, epoch/epochs and the latest epoch's figures
    sa.Column("result", sa.Text),  # the final result without histories (see `result`)
)
epochs = sa.Table(
    "epochs", metadata,
    _owner(),
    sa.Column("variant", sa.String(200), nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("record", sa.Text, nullable=False),
    sa.PrimaryKeyConstraint("run_id", "variant", "epoch"),  # one row per epoch
)
variants = sa.Table(
    "variants", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _owner(),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("technique", sa.String(100)),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("model_file", sa.Text),  # absolute path, or null
    sa.UniqueConstraint("run_id", "name"),
)
workspaces = sa.Table(  # what a browser workspace (?ws=...) had open: survives a reload
    "workspaces", metadata,
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    _owner(),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("event", sa.Text, nullable=False),
    sa.Index("ix_events_run_id_id", "run_id", "id"),
)

# PostgreSQL advisory lock keys (one per purpose, held to the end of the transaction): the
# role SQLite's BEGIN IMMEDIATE plays, for the two places that must not interleave.
_LOCK_CLAIM = 7317  # claim_queued: count busy runs, then claim
_LOCK_SCHEMA = 7318  # _engine: check and create tables, add missing columns
_ENGINES: dict[tuple[int, str], tuple[sa.Engine, sa.Engine]] = {}
_ENGINES_LOCK = threading.Lock()


# --- engines, one per URL per process -----------------------------------------------------

def _engine(url: str) -> tuple[sa.Engine, sa.Engine]:
    """(reader, writer) for `url`, made once per process: the app builds a Store on every
    rerun, and a forked child must not share its parent's connections."""
    key = (os.getpid(), url)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            parsed = sa.make_url(url)
            sqlite = parsed.get_backend_name() == "sqlite"
            if sqlite and parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # A server may drop idle connections; a SQLite file never does.
            db = sa.create_engine(url, pool_pre_ping=not sqlite)
            if sqlite:
                _configure_sqlite(db)
            writer = db.execution_options(sqlite_immediate=True)
            with writer.begin() as conn:  # one writer at a time checks and creates tables
                if db.dialect.name == "postgresql":  # processes opening a new store at once
                    # would race to CREATE TABLE (duplicate key in pg_type); DDL is
                    # transactional, so the lock holder's tables are visible to the next.
                    conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_LOCK_SCHEMA})"))
                metadata.create_all(conn)
                _add_missing_columns(conn)
            _ENGINES[key] = (db, writer)
        return _ENGINES[key]


def _add_missing_columns(conn: Any) -> None:
    """A store made by an older version lacks newer nullable columns: add them, so old
    runs stay readable (the only migration the schema has needed)."""
    for table in metadata.sorted_tables:
        have = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" '
                                     f"{kind}")


def _configure_sqlite(db: sa.Engine) -> None:
    @sa.event.listens_for(db, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # sqlite3 leaves BEGIN to `_on_begin`
        cursor = dbapi_conn.cursor()
        # busy_timeout first: WAL may need the lock. No automatic checkpoints: the database
        # file changes only when a run ends (`finish_run` checkpoints), so a plain copy of
        # it taken while runs write events (they go to the write-ahead log) is consistent.
        for pragma in ("busy_timeout=10000", "journal_mode=WAL", "foreign_keys=ON",
                       "synchronous=NORMAL", "wal_autocheckpoint=0"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @sa.event.listens_for(db, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that reads, then writes after another writer committed,
        # fails at once with SQLITE_BUSY; IMMEDIATE takes the write lock up front and waits.
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _absolute(url: str) -> str:
    """A relative SQLite path made absolute, so a worker started elsewhere finds the file."""
    parsed = sa.make_url(url)
    if (parsed.get_backend_name() == "sqlite" and parsed.database
            and parsed.database != ":memory:" and not parsed.database.startswith("file:")):
        parsed = parsed.set(database=str(Path(parsed.database).resolve()))
    return parsed.render_as_string(hide_password=False)


# --- rows and JSON ------------------------------------------------------------------------

def _require(conn: Any, run_id: str) -> Any:
    row = conn.execute(select(runs.c.status, runs.c.cancel_requested)
                       .where(runs.c.id == run_id)).first()
    if row is None:
        raise _not_found(run_id)
    return row


def _not_found(run_id: str) -> UserError:
    return UserError(f"there is no run {run_id!r} in the store; pick one from the list of runs.")


def _run_dict(row: Any) -> dict[str, Any]:
    out = dict(row)
    for key in ("recipe", "progress", "result"):
        if key in out:
            out[key] = _loads(out[key])
    out["cancel_requested"] = bool(out["cancel_requested"])
    started, finished = out["started"], out["finished"]
    out["duration_s"] = None if started is None else (finished or time.time()) - started
    return out


def _progress_update(event: dict[str, Any]) -> dict[str, Any]:
    """What one event changes in the run's progress summary (a cheap progress bar)."""
    kind = event.get("event")
    if kind in ("stage", "epoch"):
        return {k: v for k, v in event.items() if k != "event"}
    if kind == "variant":
        return {"message": f"variant {event.get('name')} evaluated"}
    if kind == "done":
        return {"stage": "done", "message": "finished"}
    if kind == "trial":  # a search's trials so far
        return {"trials": int(event.get("number", -1)) + 1}
    return {"message": event["message"]} if "message" in event else {}


def _columns(records: list[tuple[int, dict[str, Any]]]) -> dict[str, list[Any]]:
    """Epoch records -> the engine's history shape, columns in first-seen key order."""
    if not records:
        return {}
    keys = dict.fromkeys(k for _, r in records for k in r if k not in ("epoch", "epochs"))
    return {"epoch": [e for e, _ in records],
            **{k: [r.get(k) for _, r in records] for k in keys}}


def _without_histories(result: dict[str, Any]) -> dict[str, Any]:
    """Histories live in the epochs table; the stored result keeps the rest."""
    return {**result, "variants": [{k: v for k, v in variant.items() if k != "history"}
                                   for variant in result.get("variants", [])]}


def _dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), allow_nan=False, default=str)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _clean(obj: Any) -> Any:
    """JSON-ready: NaN and infinities become None; numpy and torch scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
