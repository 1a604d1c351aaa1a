"""SQLite (WAL) state: instances, events, the cost ledger, applied revisions, alert
states and the dashboard's chart history (what a restarted controller must not forget).

Only the controller writes; the CLI and tests may read. One connection guarded by a
lock is plenty for the controller's write rate (a few rows per instance lifetime).
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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
CREATE TABLE IF NOT EXISTS alert_states (
  deployment TEXT NOT NULL, metric TEXT NOT NULL, above REAL NOT NULL, for_s REAL NOT NULL,
  webhook TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, since REAL, above_since REAL, value REAL,
  saved_at REAL NOT NULL, PRIMARY KEY (deployment, metric, above, for_s, webhook)
);
CREATE TABLE IF NOT EXISTS minute_samples (
  deployment TEXT NOT NULL, minute INTEGER NOT NULL, requests INTEGER NOT NULL, errors INTEGER NOT NULL,
  hist TEXT NOT NULL, PRIMARY KEY (deployment, minute)
);
"""
# Tables added after the first release (alert_states, minute_samples) need no migration
# step: CREATE TABLE IF NOT EXISTS above adds them to an older database on open.

# Retention of the dashboard's chart history: a deployment keeps its newest
# HISTORY_MINUTES minutes (the charts show the last hour), and the table holds at most
# HISTORY_ROWS_MAX rows in all (the oldest minutes go first).
HISTORY_MINUTES = 60
HISTORY_ROWS_MAX = 20_000
# Alert states: one row per rule of a deployment; at most ALERT_ROWS_MAX rows are kept
# for one deployment (a spec has far fewer rules).
ALERT_ROWS_MAX = 200


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


@dataclass(frozen=True)
class AlertStateRow:
    """One alert rule's state (`controller.policy.alerts.RuleState`) keyed by its rule identity."""
    metric: str
    above: float
    for_s: float
    webhook: str | None
    state: str
    since: float | None
    above_since: float | None
    value: float | None


@dataclass(frozen=True)
class MinuteRow:
    """One minute of a deployment's traffic (`controller.history.MinuteSeries`)."""
    deployment: str
    minute: int  # unix seconds // 60
    requests: int
    errors: int
    hist: dict


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        # Masks secret values in event messages (controller.secrets.Redactor, set by serve).
        self.redact: Callable[[str], str] = lambda text: text
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row  # columns by name
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        for table, column, kind in MIGRATIONS:
            have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})").fetchall()}
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
            found = store.integrity_problems()
            if not found:
                return store, None
            problem = "; ".join(found[:3])
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
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=5000")
        return self

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity check finds; empty when the file is sound."""
        rows = [str(r[0]) for r in self._query("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed when the block ends, rolled back when it raises. It takes
        the write lock up front (IMMEDIATE): a read-then-write transaction that upgrades
        later fails at once with "database is locked" when another connection (the token
        store) wrote meanwhile, while waiting for the lock here honours busy_timeout."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
        with self._tx() as db:
            row = db.execute("SELECT deployment, started_at, price_per_hour, node FROM instances WHERE id=?",
                             (instance_id,)).fetchone()
            if row is None:
                return
            seconds = max(0.0, stopped_at - row["started_at"])
            db.execute("INSERT INTO ledger (deployment, instance, started_at, stopped_at, seconds,"
                       " price_per_hour, cost, node) VALUES (?,?,?,?,?,?,?,?)",
                       (row["deployment"], instance_id, row["started_at"], stopped_at, seconds, row["price_per_hour"],
                        seconds * row["price_per_hour"] / 3600.0, row["node"]))
            db.execute("DELETE FROM instances WHERE id=?", (instance_id,))

    def instances(self, driver: str | None = None) -> list[StoredInstance]:
        sql = ("SELECT id, deployment, revision, driver, host, port, pid, pid_create_time, container_id, gpu_ids,"
               " log_path, started_at, ready_at, phase, price_per_hour, node FROM instances"
               + (" WHERE driver=?" if driver else "") + " ORDER BY started_at")
        rows = self._query(sql, (driver,) if driver else ())
        return [StoredInstance(
            instance=Instance(id=r["id"], deployment=r["deployment"], revision=r["revision"], host=r["host"],
                              port=r["port"], pid=r["pid"], pid_create_time=r["pid_create_time"],
                              container_id=r["container_id"], gpu_ids=json.loads(r["gpu_ids"]),
                              log_path=r["log_path"], started_at=r["started_at"], node=r["node"]),
            driver=r["driver"], ready_at=r["ready_at"], phase=r["phase"], price_per_hour=r["price_per_hour"])
            for r in rows]

    def ledger_by_node(self) -> dict[tuple[str, str | None], tuple[float, float]]:
        """(deployment, node) -> (instance-seconds, cost) of stopped instances; node None
        for instances of drivers without nodes."""
        rows = self._query("SELECT deployment, node, SUM(seconds) AS seconds, SUM(cost) AS cost FROM ledger"
                           " GROUP BY deployment, node")
        return {(r["deployment"], r["node"]): (r["seconds"], r["cost"]) for r in rows}

    # events ----------------------------------------------------------------
    def event(self, deployment: str, kind: str, message: str, instance: str | None = None,
              at: float | None = None) -> None:
        self._exec("INSERT INTO events (at, deployment, instance, kind, message) VALUES (?,?,?,?,?)",
                   (time.time() if at is None else at, deployment, instance, kind, self.redact(message)))

    def events(self, deployment: str | None = None, limit: int = 50) -> list[Event]:
        if deployment:
            rows = self._query(f"SELECT {_EVENT_COLUMNS} FROM events WHERE deployment=? ORDER BY id DESC LIMIT ?",
                               (deployment, limit))
        else:
            rows = self._query(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [_event(r) for r in reversed(rows)]

    def count_events(self, deployment: str, kinds: tuple[str, ...], since: float) -> int:
        marks = ",".join("?" * len(kinds))
        rows = self._query(f"SELECT COUNT(*) AS n FROM events WHERE deployment=? AND kind IN ({marks}) AND at >= ?",
                           (deployment, *kinds, since))
        return int(rows[0]["n"])

    def events_after(self, after_id: int, deployment: str | None = None, limit: int = 200) -> list[Event]:
        """Events with an id above `after_id`, oldest first (`autodeploy events -f` pages with it)."""
        if deployment:
            rows = self._query(f"SELECT {_EVENT_COLUMNS} FROM events WHERE deployment=? AND id>? ORDER BY id LIMIT ?",
                               (deployment, after_id, limit))
        else:
            rows = self._query(f"SELECT {_EVENT_COLUMNS} FROM events WHERE id>? ORDER BY id LIMIT ?",
                               (after_id, limit))
        return [_event(r) for r in rows]

    # cost ------------------------------------------------------------------
    def booked_cost(self) -> dict[str, tuple[float, float]]:
        """deployment -> (instance-seconds, cost) of instances that have stopped."""
        rows = self._query("SELECT deployment, SUM(seconds) AS seconds, SUM(cost) AS cost FROM ledger"
                           " GROUP BY deployment")
        return {r["deployment"]: (r["seconds"] or 0.0, r["cost"] or 0.0) for r in rows}

    # revisions ---------------------------------------------------------------
    def record_revision(self, deployment: str, revision: str, source_file: str, content: dict,
                        at: float | None = None, commit: Commit | None = None) -> int:
        """Store a newly applied revision; returns its number (unchanged content: the last number).
        `commit` is the git commit that brought this content (a git source)."""
        with self._tx() as db:
            last = db.execute(
                "SELECT number, revision FROM revisions WHERE deployment=? ORDER BY number DESC LIMIT 1",
                (deployment,)).fetchone()
            if last and last["revision"] == revision:
                return int(last["number"])
            number = (last["number"] + 1) if last else 1
            db.execute(
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
        if not rows or rows[0]["commit_sha"] is None:
            return None
        return Commit(rows[0]["commit_sha"], rows[0]["commit_author"] or "", rows[0]["commit_subject"] or "")

    def set_instance_revision(self, instance_id: str, revision: str) -> None:
        """An in-place edit: the instance now runs the new revision (same instance template)."""
        self._exec("UPDATE instances SET revision=? WHERE id=?", (revision, instance_id))

    # runtime overrides (scale, stop, rollback, delete): drift from the files ----
    def set_override(self, deployment: str, base: str, data: dict, at: float | None = None) -> None:
        """`base` is the file's revision the override applies to; a new file content drops it."""
        self._exec("INSERT OR REPLACE INTO overrides (deployment, base, data, at) VALUES (?,?,?,?)",
                   (deployment, base, json.dumps(data), time.time() if at is None else at))

    def override(self, deployment: str) -> tuple[str, dict, float] | None:
        rows = self._query("SELECT base, data, at FROM overrides WHERE deployment=?", (deployment,))
        return (rows[0]["base"], json.loads(rows[0]["data"]), rows[0]["at"]) if rows else None

    def overrides(self) -> dict[str, tuple[str, dict, float]]:
        rows = self._query("SELECT deployment, base, data, at FROM overrides ORDER BY deployment")
        return {r["deployment"]: (r["base"], json.loads(r["data"]), r["at"]) for r in rows}

    def clear_override(self, deployment: str) -> None:
        self._exec("DELETE FROM overrides WHERE deployment=?", (deployment,))

    # alert states and chart history: what a restarted controller picks up ------
    def save_alert_states(self, deployment: str, rows: list[AlertStateRow], at: float | None = None) -> None:
        """Replace `deployment`'s alert states with `rows` (empty: it has none), in one transaction."""
        rows = rows[:ALERT_ROWS_MAX]
        with self._tx() as db:
            db.execute("DELETE FROM alert_states WHERE deployment=?", (deployment,))
            db.executemany(
                "INSERT OR REPLACE INTO alert_states (deployment, metric, above, for_s, webhook, state, since,"
                " above_since, value, saved_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(deployment, r.metric, r.above, r.for_s, r.webhook or "", r.state, r.since, r.above_since, r.value,
                  time.time() if at is None else at) for r in rows])

    def alert_states(self) -> dict[str, list[AlertStateRow]]:
        rows = self._query("SELECT deployment, metric, above, for_s, webhook, state, since, above_since, value"
                           " FROM alert_states ORDER BY deployment, metric, above")
        out: dict[str, list[AlertStateRow]] = {}
        for r in rows:
            out.setdefault(r["deployment"], []).append(AlertStateRow(
                metric=r["metric"], above=r["above"], for_s=r["for_s"], webhook=r["webhook"] or None,
                state=r["state"], since=r["since"], above_since=r["above_since"], value=r["value"]))
        return out

    def save_minutes(self, rows: list[MinuteRow]) -> None:
        """Upsert minutes of chart history, then apply the retention (module docstring: HISTORY_*)."""
        if not rows:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO minute_samples (deployment, minute, requests, errors, hist)"
                " VALUES (?,?,?,?,?)",
                [(r.deployment, r.minute, r.requests, r.errors, json.dumps(r.hist)) for r in rows])
            for dep in {r.deployment for r in rows}:
                db.execute("DELETE FROM minute_samples WHERE deployment=? AND minute <= "
                           "(SELECT MAX(minute) FROM minute_samples WHERE deployment=?) - ?",
                           (dep, dep, HISTORY_MINUTES))
            db.execute("DELETE FROM minute_samples WHERE rowid IN (SELECT rowid FROM minute_samples"
                       " ORDER BY minute DESC LIMIT -1 OFFSET ?)", (HISTORY_ROWS_MAX,))

    def minutes(self) -> list[MinuteRow]:
        rows = self._query("SELECT deployment, minute, requests, errors, hist FROM minute_samples"
                           " ORDER BY deployment, minute")
        return [MinuteRow(deployment=r["deployment"], minute=r["minute"], requests=r["requests"], errors=r["errors"],
                          hist=json.loads(r["hist"])) for r in rows]

    def forget(self, deployment: str) -> None:
        """Delete a deployment's stored state (after `autodeploy delete`)."""
        with self._tx() as db:
            # The audit trail (who did what, controller.auth) outlives what it audits.
            db.execute("DELETE FROM events WHERE deployment=? AND kind != 'audit'", (deployment,))
            for table in ("revisions", "ledger", "instances", "alert_states", "minute_samples"):
                db.execute(f"DELETE FROM {table} WHERE deployment=?", (deployment,))


_EVENT_COLUMNS = "id, at, deployment, instance, kind, message"


def _event(r: sqlite3.Row) -> Event:
    return Event(id=r["id"], at=r["at"], deployment=r["deployment"], instance=r["instance"], kind=r["kind"],
                 message=r["message"])


def _revision_row(r: sqlite3.Row) -> RevisionRow:
    commit = Commit(r["commit_sha"], r["commit_author"] or "", r["commit_subject"] or "") if r["commit_sha"] else None
    return RevisionRow(deployment=r["deployment"], number=r["number"], revision=r["revision"],
                       applied_at=r["applied_at"], source_file=r["source_file"], content=json.loads(r["content"]),
                       commit=commit)
