"""Several nodes against the controller harness (FakeDriver + FakeClock, real store,
fleet and policies): spread, a node lost (instances out, replaced elsewhere, booked),
a node returning (its stale instances stopped or adopted, nothing placed on it before
that), and 1040 when no node can take an instance. The same with real engines is
tests/test_nodes_e2e.py; here every step is milliseconds."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from conftest import deployment_yaml
from controller.drivers.base import Exit, Instance
from controller.errors import AutoDeployError
from controller.nodes import NodeBook, NodeState
from fakes import FakeDriver
from test_controller import Harness, make


class FakeNodeDriver(FakeDriver):
    """FakeDriver on two pretend Docker hosts, "a" and "b" (labels pool=a / pool=b)."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes = NodeBook([NodeState("a", "10.0.0.1", "ssh://a", {"pool": "a"}),
                               NodeState("b", "10.0.0.2", "ssh://b", {"pool": "b"})])
        self.now = 0.0

    def down(self, node: str) -> None:
        self.now += 1
        self.nodes.mark(node, False, "ping: connection refused", self.now)

    def up(self, node: str) -> None:
        self.now += 1
        self.nodes.mark(node, True, "", self.now)

    def poll(self, inst: Instance) -> Exit | None:
        if inst.node and not self.nodes.get(inst.node).reachable:
            return None  # as the docker driver: the node watch takes these out
        return super().poll(inst)

    def discover(self, node: str | None = None) -> list[Instance]:
        return [i for i in super().discover() if node is None or i.node == node]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = make(tmp_path, driver=FakeNodeDriver())
    yield harness
    harness.c.shutdown()
    harness.store.close()


def nodes_of(h: Harness, name: str) -> Counter:
    return Counter(r.node for r in h.recs(name) if r.phase.value == "ready")


def test_replicas_spread_over_both_nodes(h: Harness) -> None:
    h.apply(deployment_yaml("web", min_replicas=4, max_replicas=4))
    h.tick_until(lambda: nodes_of(h, "web") == {"a": 2, "b": 2}, "two ready on each node")
    assert {i["name"]: len(i["instances"]) for i in h.c.status()["nodes"]} == {"a": 2, "b": 2}


def test_a_lost_node_takes_its_instances_out_and_they_are_replaced_on_the_other(h: Harness) -> None:
    driver: FakeNodeDriver = h.driver  # type: ignore[assignment]
    h.apply(deployment_yaml("web", min_replicas=4, max_replicas=4))
    h.tick_until(lambda: nodes_of(h, "web") == {"a": 2, "b": 2}, "spread")
    on_b = {r.id for r in h.recs("web") if r.node == "b"}
    driver.down("b")
    h.c.tick()
    assert not on_b & {r.id for r in h.recs("web")}  # out of the table (and routing) in one pass
    with h.c.fleet:
        routed = {a.id for a in h.c.snapshot().deployments["web"].ready}
    assert not on_b & routed
    assert h.kinds("web").count("lost") == 2
    h.tick_until(lambda: nodes_of(h, "web") == {"a": 4}, "replacements on a")
    assert {n["name"]: n["reachable"] for n in h.c.status()["nodes"]} == {"a": True, "b": False}
    # Their time is booked, at the node it ran on.
    assert ("web", "b") in h.store.ledger_by_node()


def test_a_returning_node_stops_what_was_replaced_and_adopts_what_is_still_wanted(h: Harness) -> None:
    driver: FakeNodeDriver = h.driver  # type: ignore[assignment]
    h.apply(deployment_yaml("web", min_replicas=2, max_replicas=2),
            deployment_yaml("pinned", min_replicas=1, max_replicas=1,
                            extra_spec="placement: {nodeSelector: {pool: b}}"))
    h.tick_until(lambda: nodes_of(h, "web") == {"a": 1, "b": 1} and nodes_of(h, "pinned") == {"b": 1}, "placed")
    pinned = h.recs("pinned")[0].id
    web_b = next(r.id for r in h.recs("web") if r.node == "b")
    driver.down("b")
    h.tick_until(lambda: nodes_of(h, "web") == {"a": 2}, "web replaced on a")
    assert h.recs("pinned") == [] and "unplaceable" in h.kinds("pinned")
    driver.up("b")
    # Until its stale instances are reconciled, the returning node takes nothing new.
    assert [v.reachable for v in h.c.node_watch.views(driver.nodes)] == [True, False]
    h.tick_until(lambda: [r.id for r in h.recs("pinned")] == [pinned], "pinned adopted")
    h.tick_until(lambda: driver.procs[web_b].exit is not None, "stale web instance stopped")
    assert "adopted" in h.kinds("pinned") and "stale" in h.kinds("web")
    assert nodes_of(h, "web") == {"a": 2}
    assert [v.reachable for v in h.c.node_watch.views(driver.nodes)] == [True, True]


def test_no_node_matching_the_selector_is_error_1040(h: Harness) -> None:
    h.apply(deployment_yaml("gpuless", extra_spec="placement: {nodeSelector: {pool: c}}"))
    with pytest.raises(AutoDeployError) as err:
        h.c.acquire("gpuless", None, timeout=2)
    assert err.value.to_json()["code"] == 1040
    assert "node a: labels do not match nodeSelector pool=c" in err.value.message
