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
