"""SQLite (WAL) state: instances, events, the cost ledger and applied revisions.

Only the controller writes; the CLI and tests may read. One connection guarded by a
lock is plenty for the controller's write rate (a few rows per instance lifetime).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from controller.drivers.base import Instance

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
  id TEXT PRIMARY KEY, deployment TEXT NOT NULL, revision TEXT NOT NULL, driver TEXT NOT NULL,
  host TEXT NOT NULL, port INTEGER NOT NULL, pid INTEGER, pid_create_time REAL,
  container_id TEXT, gpu_ids TEXT NOT NULL DEFAULT '[]', log_path TEXT,
  started_at REAL NOT NULL, ready_at REAL, phase TEXT NOT NULL, price_per_hour REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, deployment TEXT NOT NULL,
  instance TEXT, kind TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_deployment ON events(deployment, id);
CREATE TABLE IF NOT EXISTS ledger (
  id INTEGER PRIMARY KEY AUTOINCREMENT, deployment TEXT NOT NULL, instance TEXT NOT NULL,
  started_at REAL NOT NULL, stopped_at REAL NOT NULL, seconds REAL NOT NULL,
  price_per_hour REAL NOT NULL, cost REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revisions (
  deployment TEXT NOT NULL, number INTEGER NOT NULL, revision TEXT NOT NULL, applied_at REAL NOT NULL,
  source_file TEXT NOT NULL, content TEXT NOT NULL,
  commit_sha TEXT, commit_author TEXT, commit_subject TEXT, PRIMARY KEY (deployment, number)
);
CREATE TABLE IF NOT EXISTS overrides (
  deployment TEXT PRIMARY KEY, base TEXT NOT NULL, data TEXT NOT NULL, at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    deployment: str
    instance: str | None
    kind: str
    message: str


@dataclass(frozen=True)
class StoredInstance:
    instance: Instance
    driver: str
    phase: str
    ready_at: float | None
    price_per_hour: float


# Columns added after the first release: (table, column, type). A database made before
# them gets them on open (ALTER TABLE ADD COLUMN keeps every row; old rows read NULL).
MIGRATIONS: tuple[tuple[str, str, str], ...] = (
    ("revisions", "commit_sha", "TEXT"),
    ("revisions", "commit_author", "TEXT"),
    ("revisions", "commit_subject", "TEXT"),
    ("instances", "node", "TEXT"),  # the Docker host it runs on (several nodes)
    ("ledger", "node", "TEXT"),     # ... and which node served the booked time
)


@dataclass(frozen=True)
class Commit:
    """The git commit a revision came from (a git source); folder revisions have none."""
    sha: str
    author: str
    subject: str

    def to_json(self) -> dict:
        return {"sha": self.sha, "short": self.sha[:12], "author": self.author, "subject": self.subject}


@dataclass(frozen=True)
class RevisionRow:
    deployment: str
    number: int
    revision: str
    applied_at: float
    source_file: str
    content: dict
    commit: Commit | None = None


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # Masks secret values in event messages (controller.secrets.Redactor, set by serve).
        self.redact: Callable[[str], str] = lambda text: text
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        for table, column, kind in MIGRATIONS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})").fetchall()}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @classmethod
    def open_checked(cls, path: Path, now: float | None = None) -> tuple["Store", str | None]:
        """Open the store after SQLite's integrity check; a corrupt file is moved aside (kept
        for inspection) and a new store started. Returns the store and what happened, if
        anything: the caller then finds running instances from the driver, not the store."""
        if not path.exists():
            return cls(path), None
        problem = None
        try:
            store = cls(path)
            rows = store._query("PRAGMA integrity_check")
            if [r[0] for r in rows] == ["ok"]:
                return store, None
            problem = "; ".join(str(r[0]) for r in rows[:3])
            store.close()
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            part = Path(str(path) + suffix)
            if part.exists():
                part.rename(Path(str(aside) + suffix))
        return cls(path), (f"{path.name} failed SQLite's integrity check ({problem}): moved to {aside.name}, "
                           "started a new store")

    @classmethod
    def read_only(cls, path: Path) -> "Store":
        """A reader for commands beside a running serve (`autodeploy logs`): writes nothing."""
        self = cls.__new__(cls)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")
        return self

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # instances -------------------------------------------------------------
    def put_instance(self, inst: Instance, driver: str, phase: str, price_per_hour: float,
                     ready_at: float | None = None) -> None:
        self._exec(
            "INSERT OR REPLACE INTO instances (id, deployment, revision, driver, host, port, pid, pid_create_time,"
            " container_id, gpu_ids, log_path, started_at, ready_at, phase, price_per_hour, node)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (inst.id, inst.deployment, inst.revision, driver, inst.host, inst.port, inst.pid,
             inst.pid_create_time, inst.container_id, json.dumps(inst.gpu_ids), inst.log_path,
             inst.started_at, ready_at, phase, price_per_hour, inst.node))

    def set_phase(self, instance_id: str, phase: str, ready_at: float | None = None) -> None:
        if ready_at is None:
            self._exec("UPDATE instances SET phase=? WHERE id=?", (phase, instance_id))
        else:
            self._exec("UPDATE instances SET phase=?, ready_at=? WHERE id=?", (phase, ready_at, instance_id))

    def remove_instance(self, instance_id: str, stopped_at: float) -> None:
        """Drop the row and book its running time in the ledger, in one transaction."""
        with self._lock:
            row = self._db.execute(
                "SELECT deployment, started_at, price_per_hour, node FROM instances WHERE id=?",
                (instance_id,)).fetchone()
            if row is None:
                return
            deployment, started_at, price, node = row
            seconds = max(0.0, stopped_at - started_at)
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO ledger (deployment, instance, started_at, stopped_at, seconds,"
                             " price_per_hour, cost, node) VALUES (?,?,?,?,?,?,?,?)",
                             (deployment, instance_id, started_at, stopped_at, seconds, price,
                              seconds * price / 3600.0, node))
            self._db.execute("DELETE FROM instances WHERE id=?", (instance_id,))
            self._db.execute("COMMIT")

    def instances(self, driver: str | None = None) -> list[StoredInstance]:
        sql = ("SELECT id, deployment, revision, driver, host, port, pid, pid_create_time, container_id, gpu_ids,"
               " log_path, started_at, ready_at, phase, price_per_hour, node FROM instances"
               + (" WHERE driver=?" if driver else "") + " ORDER BY started_at")
        rows = self._query(sql, (driver,) if driver else ())
        return [StoredInstance(
            instance=Instance(id=r[0], deployment=r[1], revision=r[2], host=r[4], port=r[5], pid=r[6],
                              pid_create_time=r[7], container_id=r[8], gpu_ids=json.loads(r[9]),
                              log_path=r[10], started_at=r[11], node=r[15]),
            driver=r[3], ready_at=r[12], phase=r[13], price_per_hour=r[14]) for r in rows]

    def ledger_by_node(self) -> dict[tuple[str, str | None], tuple[float, float]]:
        """(deployment, node) -> (instance-seconds, cost) of stopped instances; node None
        for instances of drivers without nodes."""
        rows = self._query("SELECT deployment, node, SUM(seconds), SUM(cost) FROM ledger GROUP BY deployment, node")
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    # events ----------------------------------------------------------------
    def event(self, deployment: str, kind: str, message: str, instance: str | None = None,
              at: float | None = None) -> None:
        self._exec("INSERT INTO events (at, deployment, instance, kind, message) VALUES (?,?,?,?,?)",
                   (time.time() if at is None else at, deployment, instance, kind, self.redact(message)))

    def events(self, deployment: str | None = None, limit: int = 50) -> list[Event]:
        if deployment:
            rows = self._query("SELECT * FROM events WHERE deployment=? ORDER BY id DESC LIMIT ?",
                               (deployment, limit))
        else:
            rows = self._query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [Event(*r) for r in reversed(rows)]

    def count_events(self, deployment: str, kinds: tuple[str, ...], since: float) -> int:
        marks = ",".join("?" * len(kinds))
        rows = self._query(f"SELECT COUNT(*) FROM events WHERE deployment=? AND kind IN ({marks}) AND at >= ?",
                           (deployment, *kinds, since))
        return int(rows[0][0])

    def events_after(self, after_id: int, deployment: str | None = None, limit: int = 200) -> list[Event]:
        """Events with an id above `after_id`, oldest first (`autodeploy events -f` pages with it)."""
        if deployment:
            rows = self._query("SELECT * FROM events WHERE deployment=? AND id>? ORDER BY id LIMIT ?",
                               (deployment, after_id, limit))
        else:
            rows = self._query("SELECT * FROM events WHERE id>? ORDER BY id LIMIT ?", (after_id, limit))
        return [Event(*r) for r in rows]

    # cost ------------------------------------------------------------------
    def booked_cost(self) -> dict[str, tuple[float, float]]:
        """deployment -> (instance-seconds, cost) of instances that have stopped."""
        rows = self._query("SELECT deployment, SUM(seconds), SUM(cost) FROM ledger GROUP BY deployment")
        return {r[0]: (r[1] or 0.0, r[2] or 0.0) for r in rows}

    # revisions ---------------------------------------------------------------
    def record_revision(self, deployment: str, revision: str, source_file: str, content: dict,
                        at: float | None = None, commit: Commit | None = None) -> int:
        """Store a newly applied revision; returns its number (unchanged content: the last number).
        `commit` is the git commit that brought this content (a git source)."""
        with self._lock:
            last = self._db.execute(
                "SELECT number, revision FROM revisions WHERE deployment=? ORDER BY number DESC LIMIT 1",
                (deployment,)).fetchone()
            if last and last[1] == revision:
                return int(last[0])
            number = (last[0] + 1) if last else 1
            self._db.execute(
                "INSERT INTO revisions (deployment, number, revision, applied_at, source_file, content,"
                " commit_sha, commit_author, commit_subject) VALUES (?,?,?,?,?,?,?,?,?)",
                (deployment, number, revision, time.time() if at is None else at, source_file,
                 json.dumps(content, default=str), commit.sha if commit else None,
                 commit.author if commit else None, commit.subject if commit else None))
            return number

    _REVISION_COLUMNS = ("deployment, number, revision, applied_at, source_file, content,"
                         " commit_sha, commit_author, commit_subject")

    def revisions(self, deployment: str) -> list[RevisionRow]:
        rows = self._query(f"SELECT {self._REVISION_COLUMNS} FROM revisions WHERE deployment=? ORDER BY number",
                           (deployment,))
        return [_revision_row(r) for r in rows]

    def revision_commit(self, deployment: str, number: int) -> Commit | None:
        rows = self._query("SELECT commit_sha, commit_author, commit_subject FROM revisions"
                           " WHERE deployment=? AND number=?", (deployment, number))
        if not rows or rows[0][0] is None:
            return None
        return Commit(rows[0][0], rows[0][1] or "", rows[0][2] or "")

    def set_instance_revision(self, instance_id: str, revision: str) -> None:
        """An in-place edit: the instance now runs the new revision (same instance template)."""
        self._exec("UPDATE instances SET revision=? WHERE id=?", (revision, instance_id))

    # runtime overrides (scale, stop, rollback, delete): drift from the files ----
    def set_override(self, deployment: str, base: str, data: dict, at: float | None = None) -> None:
        """`base` is the file's revision the override applies to; a new file content drops it."""
        self._exec("INSERT OR REPLACE INTO overrides VALUES (?,?,?,?)",
                   (deployment, base, json.dumps(data), time.time() if at is None else at))

    def override(self, deployment: str) -> tuple[str, dict, float] | None:
        rows = self._query("SELECT base, data, at FROM overrides WHERE deployment=?", (deployment,))
        return (rows[0][0], json.loads(rows[0][1]), rows[0][2]) if rows else None

    def overrides(self) -> dict[str, tuple[str, dict, float]]:
        rows = self._query("SELECT deployment, base, data, at FROM overrides ORDER BY deployment")
        return {r[0]: (r[1], json.loads(r[2]), r[3]) for r in rows}

    def clear_override(self, deployment: str) -> None:
        self._exec("DELETE FROM overrides WHERE deployment=?", (deployment,))

    def forget(self, deployment: str) -> None:
        """Delete a deployment's stored state (after `autodeploy delete`)."""
        with self._lock:
            # The audit trail (who did what, controller.auth) outlives what it audits.
            self._db.execute("DELETE FROM events WHERE deployment=? AND kind != 'audit'", (deployment,))
            for table in ("revisions", "ledger", "instances"):
                self._db.execute(f"DELETE FROM {table} WHERE deployment=?", (deployment,))


def _revision_row(r: tuple) -> RevisionRow:
    commit = Commit(r[6], r[7] or "", r[8] or "") if r[6] else None
    return RevisionRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), commit)
