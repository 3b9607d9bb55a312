"""The run store: runs, their progress, per-epoch history and variants, in SQL.

One SQLite file by default (`./runs/workbench.db`); any SQLAlchemy URL works, so a shared
PostgreSQL store later is a change of URL. The app and several worker processes write at
once: every write is one short transaction, and on SQLite the database runs in WAL mode
(readers never block the writer) with write transactions opened by `BEGIN IMMEDIATE`, so
a writer waits for the lock (busy_timeout) instead of failing on a stale read snapshot.

JSON documents (recipe, progress, result, events) are stored as text: portable, and NaN,
which JSON lacks, becomes null. Artifacts of a run (model files, result.json, worker.log)
live on disk under `<artifacts>/<run_id>/` (`Store.run_dir`).

    store = Store()                        # settings.store_url(): WORKBENCH_STORE or ./runs/...
    run_id = store.create_run(recipe.to_dict(), name="digits")
    store.record_event(run_id, {"event": "epoch", "epoch": 1, ...})
    store.history(run_id)                  # {"epoch": [1], "train_loss": [...], ...}
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import and_, func, select

from engine.errors import UserError
from engine.settings import artifacts_root, store_url
from engine.store_schema import (
    _LOCK_CLAIM,
    _absolute,
    _columns,
    _dumps,
    _engine,
    _loads,
    _not_found,
    _progress_update,
    _require,
    _run_dict,
    _without_histories,
    epochs,
    events,
    runs,
    variants,
    workspaces,
)

ACTIVE = ("queued", "running")
_RUN_ID = re.compile(r"[0-9a-f]{8,32}")
FINISHED = ("done", "failed", "cancelled")


def run_dir(run_id: str, root: Path | None = None) -> Path:
    """The folder holding one run's model files, result.json and worker.log, under `root`
    (the configured artifacts folder when None). A run id is hex digits (see
    `Store.create_run`): anything else is refused, so no string from a request can name a
    folder outside the artifacts root."""
    if not _RUN_ID.fullmatch(run_id or ""):
        raise UserError(f"{run_id!r} is not a run id; pick a run from the list of runs.")
    return (root or artifacts_root()) / run_id


class Store:
    """The run store at `url` (`settings.store_url()` when None), its runs' files under
    `artifacts` (`settings.artifacts_root()` when None). Cheap to create: engines are
    shared."""

    def __init__(self, url: str | None = None, *, artifacts: str | Path | None = None) -> None:
        self.url = _absolute(url or store_url())
        self.artifacts = Path(artifacts).resolve() if artifacts else artifacts_root()
        self._db, self._writer = _engine(self.url)

    def run_dir(self, run_id: str) -> Path:
        """The run's folder under this store's artifacts folder (see `run_dir`)."""
        return run_dir(run_id, self.artifacts)

    def _model_path(self, run_id: str, model_file: str | None) -> str | None:
        """A model file named inside the run's folder, as an absolute path (absolute stays)."""
        return None if model_file is None else str(self.run_dir(run_id) / model_file)

    # --- life cycle of a run -------------------------------------------------------------

    def create_run(self, recipe: dict[str, Any], *, name: str | None = None,
                   group: str | None = None, kind: str = "train", backend: str = "local",
                   owner: str | None = None, threads: int | None = None) -> str:
        """Store a queued run and return its id: 32 hex digits, unique across every node
        that shares this store, and safe as a folder name."""
        run_id = uuid.uuid4().hex
        with self._writer.begin() as conn:
            conn.execute(runs.insert().values(
                id=run_id, name=None if name is None else name[:200],
                group_id=None if group is None else group[:100],
                kind=kind, status="queued", recipe=_dumps(recipe), created=time.time(),
                cancel_requested=False, backend=backend, threads=threads,
                owner=None if owner is None else owner[:64],
                host=socket.gethostname()))  # so the reaper knows whose queued run it is
        return run_id

    def claim_queued(self, *, limit: int, backend: str = "local",
                     host: str | None = None) -> list[str]:
        """Claim the oldest unclaimed queued runs of `backend` submitted from `host` while
        fewer than `limit` of its runs hold a worker, and return their ids, oldest first.
        Atomic across processes (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped
        advisory lock), so two dispatchers never exceed the limit nor claim a run twice."""
        host = host or socket.gethostname()
        mine = and_(runs.c.backend == backend, runs.c.host == host)
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_LOCK_CLAIM})"))
            busy = conn.execute(select(func.count()).select_from(runs).where(
                mine, runs.c.status.in_(ACTIVE), runs.c.claimed.is_not(None))).scalar_one()
            free = limit - busy
            if free <= 0:
                return []
            ids = list(conn.execute(
                select(runs.c.id).where(mine, runs.c.status == "queued",
                                        runs.c.claimed.is_(None))
                .order_by(runs.c.created).limit(free)).scalars())
            if ids:
                conn.execute(runs.update().where(runs.c.id.in_(ids))
                             .values(claimed=time.time()))
        return ids

    def set_worker(self, run_id: str, *, pid: int | None, node: str | None = None) -> None:
        """Record the process dispatched for a claimed run (before it starts)."""
        with self._writer.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id)
                         .values(pid=pid, node=node))

    def start_run(self, run_id: str, *, pid: int, host: str,
                  device: str | None = None, node: str | None = None) -> bool:
        """Mark a queued run running; False if it is no longer queued (cancelled meanwhile)."""
        now = time.time()
        with self._writer.begin() as conn:
            changed = conn.execute(
                runs.update().where(runs.c.id == run_id, runs.c.status == "queued")
                .values(status="running", started=now, updated=now, pid=pid, host=host,
                        device=device, node=node or host,
                        claimed=func.coalesce(runs.c.claimed, now))).rowcount
            if not changed:
                _require(conn, run_id)
        return bool(changed)

    def finish_run(self, run_id: str, status: str, *, error: str | None = None,
                   result: dict[str, Any] | None = None) -> bool:
        """End a run as done, failed or cancelled. A finished run is never changed again
        (a late "failed" from the reaper must not undo "done"); returns whether it changed."""
        if status not in FINISHED:
            raise ValueError(f"status must be one of {FINISHED}, got {status!r}")
        now = time.time()
        with self._writer.begin() as conn:
            if error and conn.dialect.name == "postgresql":
                # PostgreSQL text cannot hold NUL, which a worker log's tail may: refusing
                # it would leave the run "running" forever. SQLite keeps the text as is.
                error = error.replace("\x00", "\N{REPLACEMENT CHARACTER}")
            changed = conn.execute(
                runs.update().where(runs.c.id == run_id, runs.c.status.in_(ACTIVE))
                .values(status=status, finished=now, updated=now, error=error,
                        result=None if result is None else _dumps(_without_histories(result))),
            ).rowcount
            if not changed:
                _require(conn, run_id)
                return False
            conn.execute(events.insert().values(run_id=run_id, time=now, event=_dumps(
                {"event": "finished", "status": status, "error": error})))
        self._checkpoint()
        return True

    def record_event(self, run_id: str, event: dict[str, Any]) -> None:
        """Store one progress event of `engine.run`: the event itself, the progress summary,
        and an epoch row ("epoch" events) or a variant row ("variant" events)."""
        now = time.time()
        kind = event.get("event")
        with self._writer.begin() as conn:
            # FOR UPDATE: on PostgreSQL two writers would otherwise both read the old
            # progress and the later write would drop the earlier one's keys. SQLite's
            # BEGIN IMMEDIATE already serializes this, and it compiles no FOR UPDATE.
            old = conn.execute(select(runs.c.progress).where(runs.c.id == run_id)
                               .with_for_update()).first()
            if old is None:
                raise _not_found(run_id)
            progress = {**(_loads(old.progress) or {}), **_progress_update(event), "time": now}
            conn.execute(runs.update().where(runs.c.id == run_id)
                         .values(progress=_dumps(progress), updated=now))
            conn.execute(events.insert().values(run_id=run_id, time=now, event=_dumps(event)))
            if kind == "epoch":
                self._put_epoch(conn, run_id, event)
            elif kind == "variant":
                self._put_variant(conn, run_id, event)

    def request_cancel(self, run_id: str) -> None:
        """Flag the run; its worker stops at its next check (see `engine.jobs.cancel`)."""
        with self._writer.begin() as conn:
            if not conn.execute(runs.update().where(runs.c.id == run_id)
                                .values(cancel_requested=True)).rowcount:
                raise _not_found(run_id)

    def cancel_requested(self, run_id: str) -> bool:
        """Whether the user asked to cancel the run (what the worker polls)."""
        with self._db.connect() as conn:
            return bool(_require(conn, run_id).cancel_requested)

    def delete_run(self, run_id: str) -> None:
        """Delete the run's rows (epochs, variants and events cascade) and its folder."""
        with self._writer.begin() as conn:
            if _require(conn, run_id).status in ACTIVE:
                raise UserError(f"run {run_id!r} is still active; cancel it before deleting it.")
            conn.execute(runs.delete().where(runs.c.id == run_id))
        folder = self.run_dir(run_id)
        if folder.parent == self.artifacts:  # never follow an odd id out of the root
            shutil.rmtree(folder, ignore_errors=True)

    # --- reading -------------------------------------------------------------------------

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """Every column of the run (JSON decoded) plus `duration_s`; None if unknown."""
        with self._db.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        return None if row is None else _run_dict(row._mapping)

    def list_runs(self, *, limit: int = 200, status: str | None = None,
                  group: str | None = None, owner: str | None = None
                  ) -> list[dict[str, Any]]:
        """Runs newest first, without `result`, each with its baseline's `metrics` ({} until
        the baseline is stored): one query, enough for a table of runs."""
        baseline = and_(variants.c.run_id == runs.c.id, variants.c.name == "baseline")
        columns = [c for c in runs.c if c.name != "result"]
        query = (select(*columns, variants.c.metrics.label("metrics"))
                 .select_from(runs.outerjoin(variants, baseline))
                 .order_by(runs.c.created.desc()).limit(limit))
        if status is not None:
            query = query.where(runs.c.status == status)
        if group is not None:
            query = query.where(runs.c.group_id == group)
        if owner is not None:
            query = query.where(runs.c.owner == owner)
        with self._db.connect() as conn:
            rows = conn.execute(query).all()
        return [{**_run_dict(r._mapping), "metrics": _loads(r.metrics) or {}} for r in rows]

    def active_runs(self) -> list[dict[str, Any]]:
        """Queued and running runs, oldest first."""
        columns = [c for c in runs.c if c.name != "result"]
        query = select(*columns).where(runs.c.status.in_(ACTIVE)).order_by(runs.c.created)
        with self._db.connect() as conn:
            return [_run_dict(r._mapping) for r in conn.execute(query)]

    def history(self, run_id: str, variant: str = "baseline") -> dict[str, list[Any]]:
        """Per-epoch columns in epoch order, as the engine's history: epoch, train_loss,
        train_accuracy (or train_r2), val_loss, ..., lr, time_s. NaN reads back as None;
        {} before the first epoch."""
        query = (select(epochs.c.epoch, epochs.c.record)
                 .where(epochs.c.run_id == run_id, epochs.c.variant == variant)
                 .order_by(epochs.c.epoch))
        with self._db.connect() as conn:
            _require(conn, run_id)
            rows = conn.execute(query).all()
        return _columns([(r.epoch, json.loads(r.record)) for r in rows])

    def histories(self, run_id: str) -> dict[str, dict[str, list[Any]]]:
        """Every variant's per-epoch columns (training and fine-tuning), by variant name."""
        query = (select(epochs.c.variant, epochs.c.epoch, epochs.c.record)
                 .where(epochs.c.run_id == run_id).order_by(epochs.c.epoch))
        with self._db.connect() as conn:
            _require(conn, run_id)
            rows = conn.execute(query).all()
        grouped: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for r in rows:
            grouped.setdefault(r.variant, []).append((r.epoch, json.loads(r.record)))
        return {name: _columns(records) for name, records in grouped.items()}

    def variants(self, run_id: str) -> list[dict[str, Any]]:
        """The run's variants in the order they were made: name, position, technique,
        metrics, model_file (an absolute path or None)."""
        query = (select(variants.c.name, variants.c.position, variants.c.technique,
                        variants.c.metrics, variants.c.model_file)
                 .where(variants.c.run_id == run_id).order_by(variants.c.position))
        with self._db.connect() as conn:
            _require(conn, run_id)
            rows = conn.execute(query).all()
        return [{**r._mapping, "metrics": json.loads(r.metrics)} for r in rows]

    def events(self, run_id: str, *, after_id: int = 0) -> list[dict[str, Any]]:
        """Events newer than `after_id`, oldest first: the event's keys plus `id` and `time`
        (pass the last `id` back to poll for new ones)."""
        query = (select(events.c.id, events.c.time, events.c.event)
                 .where(events.c.run_id == run_id, events.c.id > after_id)
                 .order_by(events.c.id))
        with self._db.connect() as conn:
            _require(conn, run_id)
            rows = conn.execute(query).all()
        return [{**json.loads(r.event), "id": r.id, "time": r.time} for r in rows]

    def result(self, run_id: str) -> dict[str, Any]:
        """The run's result shaped like result.json, each variant's history read back from
        the epochs table and `model_file` absolute. For a run that did not finish (failed,
        killed, still running) it holds what exists: the recipe and the variants so far."""
        run = self.get_run(run_id)
        if run is None:
            raise _not_found(run_id)
        result = run["result"] or {"recipe": run["recipe"], "device": run["device"],
                                   "variants": [], "tuning": None, "diagnostics": {}}
        stored = {v["name"]: v for v in result.get("variants", [])}
        table = {v["name"]: v for v in self.variants(run_id)}
        with self._db.connect() as conn:
            rows = conn.execute(select(epochs.c.variant, epochs.c.epoch, epochs.c.record)
                                .where(epochs.c.run_id == run_id)
                                .order_by(epochs.c.variant, epochs.c.epoch)).all()
        trained: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for r in rows:
            trained.setdefault(r.variant, []).append((r.epoch, json.loads(r.record)))
        out = []
        for name in dict.fromkeys([*stored, *table, *trained]):  # ordered, no repeats
            row = table.get(name, {"technique": None, "metrics": {}, "model_file": None})
            variant = stored.get(name) or {"name": name, "technique": row["technique"],
                                           "metrics": row["metrics"]}
            model_file = row["model_file"] or self._model_path(run_id, variant.get("model_file"))
            out.append({**variant, "model_file": model_file,
                        "history": _columns(trained.get(name, []))})
        return {**result, "variants": out, "run_id": run_id, "status": run["status"],
                "error": run["error"]}

    def backup(self, path: str | Path) -> Path:
        """A consistent copy of a SQLite store at `path`, safe while workers write (SQLite's
        online backup). Copying the file with `cp` while a run writes may miss the newest
        events still in the write-ahead log; finished runs are always in the file itself,
        because `finish_run` checkpoints."""
        parsed = sa.make_url(self.url)
        if parsed.get_backend_name() != "sqlite":
            raise UserError("backup copies a SQLite store; back up a server store with its "
                            "own tools (pg_dump for PostgreSQL).")
        dest = Path(path).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        source = sqlite3.connect(parsed.database)
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
        return dest

    # --- workspaces ----------------------------------------------------------------------

    def workspace(self, owner: str) -> dict[str, Any]:
        """What the app session `owner` last had open (its selections, settings and the runs
        it watched), so a reload or a second tab opens the same; {} when none."""
        with self._db.connect() as conn:
            text = conn.execute(select(workspaces.c.state)
                                .where(workspaces.c.owner == owner[:64])).scalar()
        return _loads(text) or {}

    def save_workspace(self, owner: str, state: dict[str, Any]) -> None:
        values = {"state": _dumps(state), "updated": time.time()}
        with self._writer.begin() as conn:
            if not conn.execute(workspaces.update().where(workspaces.c.owner == owner[:64])
                                .values(**values)).rowcount:
                conn.execute(workspaces.insert().values(owner=owner[:64], **values))

    # --- helpers -------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Move committed pages from SQLite's write-ahead log into the database file, so a
        plain copy of the file holds every finished run. Passive: never waits on readers."""
        if self._db.dialect.name != "sqlite":
            return
        with contextlib.suppress(sa.exc.OperationalError), self._db.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    @staticmethod
    def _put_epoch(conn: Any, run_id: str, event: dict[str, Any]) -> None:
        variant = event.get("variant", "baseline")
        record = _dumps({k: v for k, v in event.items() if k not in ("event", "variant")})
        where = and_(epochs.c.run_id == run_id, epochs.c.variant == variant,
                     epochs.c.epoch == event["epoch"])
        # A repeated epoch replaces the old row: update-or-insert works on every backend.
        if not conn.execute(epochs.update().where(where).values(record=record)).rowcount:
            conn.execute(epochs.insert().values(run_id=run_id, variant=variant,
                                                epoch=event["epoch"], record=record))

    def _put_variant(self, conn: Any, run_id: str, event: dict[str, Any]) -> None:
        values = {"technique": event.get("technique"),
                  "metrics": _dumps(event.get("metrics") or {}),
                  "model_file": self._model_path(run_id, event.get("model_file"))}
        where = and_(variants.c.run_id == run_id, variants.c.name == event["name"])
        if not conn.execute(variants.update().where(where).values(**values)).rowcount:
            position = conn.execute(select(func.count()).select_from(variants)
                                    .where(variants.c.run_id == run_id)).scalar_one()
            conn.execute(variants.insert().values(run_id=run_id, name=event["name"],
                                                  position=position, **values))
