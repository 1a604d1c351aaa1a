"""The SQLite store: WAL, instances, ledger, events, revisions."""
from __future__ import annotations

import sqlite3

from controller.drivers.base import Instance
from controller.store import Store


def make(tmp_path) -> Store:
    return Store(tmp_path / "state" / "autodeploy.db")


def inst(iid: str = "abcdefgh", started: float = 100.0) -> Instance:
    return Instance(id=iid, deployment="hello", revision="r1", host="127.0.0.1", port=1234, started_at=started,
                    pid=42, pid_create_time=99.5, gpu_ids=["GPU-1"], log_path="/tmp/x.log")


def test_database_uses_write_ahead_logging(tmp_path):
    make(tmp_path)
    mode = sqlite3.connect(tmp_path / "state" / "autodeploy.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_instances_round_trip_with_every_field(tmp_path):
    store = make(tmp_path)
    store.put_instance(inst(), "local", "starting", price_per_hour=3.6)
    store.set_phase("abcdefgh", "ready", ready_at=101.0)
    [row] = make(tmp_path).instances(driver="local")  # a second connection sees it
    assert row.instance == inst() and row.phase == "ready" and row.ready_at == 101.0 and row.price_per_hour == 3.6
    assert make(tmp_path).instances(driver="docker") == []


def test_removing_an_instance_books_its_cost_in_the_ledger(tmp_path):
    store = make(tmp_path)
    store.put_instance(inst(started=100.0), "local", "ready", price_per_hour=3.6)
    store.remove_instance("abcdefgh", stopped_at=110.0)
    assert store.instances() == []
    seconds, cost = store.booked_cost()["hello"]
    assert seconds == 10.0 and abs(cost - 0.01) < 1e-12
    store.remove_instance("abcdefgh", stopped_at=120.0)  # idempotent: booked once
    assert store.booked_cost()["hello"][0] == 10.0


def test_events_are_kept_in_order_per_deployment(tmp_path):
    store = make(tmp_path)
    for i in range(5):
        store.event("hello", "start", f"m{i}", "abcdefgh")
    store.event("other", "start", "x")
    assert [e.message for e in store.events("hello", limit=3)] == ["m2", "m3", "m4"]


def test_revisions_are_numbered_and_unchanged_content_is_not_a_new_revision(tmp_path):
    store = make(tmp_path)
    assert store.record_revision("hello", "aaa", "d/hello.yaml", {"a": 1}) == 1
    assert store.record_revision("hello", "aaa", "d/hello.yaml", {"a": 1}) == 1
    assert store.record_revision("hello", "bbb", "d/hello.yaml", {"a": 2}) == 2
    assert [(r.number, r.content) for r in store.revisions("hello")] == [(1, {"a": 1}), (2, {"a": 2})]


def test_a_write_that_fails_half_way_rolls_back_and_the_store_keeps_working(tmp_path):
    store = make(tmp_path)
    store.put_instance(inst(), "local", "ready", price_per_hour=3.6)
    # The ledger insert of remove_instance fails: the instance row must not be deleted either.
    sqlite3.connect(tmp_path / "state" / "autodeploy.db").execute("DROP TABLE ledger")
    try:
        store.remove_instance("abcdefgh", stopped_at=200.0)
    except sqlite3.OperationalError as exc:
        assert "ledger" in str(exc)
    else:
        raise AssertionError("removing without a ledger table should fail")
    assert [s.instance.id for s in store.instances()] == ["abcdefgh"]
    store.event("hello", "note", "still writable after the rollback")
    assert [e.message for e in store.events("hello")] == ["still writable after the rollback"]


def test_rows_are_read_by_column_name_whatever_the_column_order(tmp_path):
    path = tmp_path / "state" / "autodeploy.db"
    store = make(tmp_path)
    store.event("hello", "start", "first", "abcdefgh", at=5.0)
    store.record_revision("hello", "r1", "hello.yaml", {"a": 1}, at=6.0)
    # An older file whose events table has its columns in another order reads the same.
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE events RENAME TO events_old;"
                     "CREATE TABLE events (message TEXT NOT NULL, kind TEXT NOT NULL, instance TEXT,"
                     " deployment TEXT NOT NULL, at REAL NOT NULL, id INTEGER PRIMARY KEY AUTOINCREMENT);"
                     "INSERT INTO events (id, at, deployment, instance, kind, message)"
                     " SELECT id, at, deployment, instance, kind, message FROM events_old;"
                     "DROP TABLE events_old;")
    db.commit()
    [event] = make(tmp_path).events("hello")
    assert (event.at, event.deployment, event.instance, event.kind, event.message) == \
        (5.0, "hello", "abcdefgh", "start", "first")
    [row] = make(tmp_path).revisions("hello")
    assert (row.number, row.revision, row.applied_at, row.content) == (1, "r1", 6.0, {"a": 1})


def test_a_revision_is_recorded_while_another_connection_writes(tmp_path):
    """record_revision reads, then writes: its transaction takes the write lock first, so a
    writer on another connection (the token store) makes it wait, not fail."""
    import threading
    store = make(tmp_path)
    other = sqlite3.connect(tmp_path / "state" / "autodeploy.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO events (at, deployment, instance, kind, message) VALUES (1, 'x', NULL, 'k', 'm')")
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    assert store.record_revision("hello", "r1", "hello.yaml", {"a": 1}) == 1
    assert store.record_revision("hello", "r2", "hello.yaml", {"a": 2}) == 2


def test_alert_states_round_trip_and_replace_per_deployment(tmp_path):
    from controller.store import AlertStateRow
    store = make(tmp_path)
    firing = AlertStateRow("errorRate", 50.0, 2.0, "http://127.0.0.1:9/h", "firing", 12.5, 10.0, 80.0)
    pending = AlertStateRow("p95LatencyMs", 200.0, 60.0, None, "pending", 11.0, 11.0, 250.0)
    store.save_alert_states("a", [firing, pending], at=13.0)
    store.save_alert_states("b", [pending], at=13.0)
    assert make(tmp_path).alert_states() == {"a": [firing, pending], "b": [pending]}  # another connection
    store.save_alert_states("a", [], at=14.0)
    assert store.alert_states() == {"b": [pending]}
    store.forget("b")
    assert store.alert_states() == {}


def test_alert_state_save_that_fails_rolls_back(tmp_path):
    import pytest
    from controller.store import AlertStateRow
    store = make(tmp_path)
    row = AlertStateRow("errorRate", 50.0, 2.0, None, "firing", 1.0, 1.0, 60.0)
    store.save_alert_states("a", [row])
    with pytest.raises(sqlite3.Error):
        store.save_alert_states("a", [row, AlertStateRow("errorRate", 5.0, 2.0, None, None, 1.0, 1.0, 6.0)])
    assert store.alert_states() == {"a": [row]}  # the DELETE of the failed save was rolled back


def test_chart_minutes_round_trip_keep_an_hour_per_deployment_and_a_total_cap(tmp_path, monkeypatch):
    from controller import store as store_mod
    from controller.store import HISTORY_MINUTES, MinuteRow
    store = make(tmp_path)
    store.save_minutes([MinuteRow("a", m, 10, 1, {"3": 10}) for m in range(1000, 1000 + HISTORY_MINUTES + 5)])
    rows = make(tmp_path).minutes()
    assert [r.minute for r in rows] == list(range(1005, 1000 + HISTORY_MINUTES + 5))  # the newest hour
    assert rows[0] == MinuteRow("a", 1005, 10, 1, {"3": 10})
    monkeypatch.setattr(store_mod, "HISTORY_ROWS_MAX", 70)
    store.save_minutes([MinuteRow("b", m, 1, 0, {}) for m in range(1050, 1070)])
    rows = store.minutes()
    assert len(rows) == 70 and min(r.minute for r in rows) == 1015  # the oldest minutes went first
    store.forget("b")
    assert {r.deployment for r in store.minutes()} == {"a"}
