"""The gateway's per-request choice (gateway.balancer): cookie first, then the algorithm."""
from __future__ import annotations

import itertools
import random
from collections import Counter

from controller.contracts import Address, RouteEntry
from gateway.balancer import RequestKey, choose, cookie_name


def addrs(*ids: str) -> list[Address]:
    return [Address(i, "127.0.0.1", 1000 + n, 1, slot=n) for n, i in enumerate(ids)]


def dep(algorithm: str, sticky: bool = False) -> RouteEntry:
    return RouteEntry(algorithm=algorithm, sticky=sticky, rr_slot=0)


def pick(d: RouteEntry, ready: list[Address], key: RequestKey = RequestKey(), busy: dict[str, int] | None = None,
         counter: itertools.count | None = None, seed: int = 1) -> str:
    counter = counter if counter is not None else itertools.count()
    return choose(d, ready, key, inflight=lambda a: (busy or {}).get(a.id, 0),
                  rr_next=lambda slot: next(counter), rand=random.Random(seed)).id


def test_round_robin_walks_instances_in_id_order():
    counter = itertools.count()
    ready = addrs("c", "a", "b")
    assert [pick(dep("round-robin"), ready, counter=counter) for _ in range(6)] == list("abcabc")


def test_least_connections_prefers_the_less_busy_of_two():
    ready = addrs("a", "b", "c")
    seen = Counter(pick(dep("least-connections"), ready, busy={"a": 9, "b": 0, "c": 0}, seed=s)
                   for s in range(300))
    assert seen["a"] == 0 and seen["b"] > 100 and seen["c"] > 100


def test_least_connections_breaks_ties_at_random_not_by_id():
    seen = Counter(pick(dep("least-connections"), addrs("a", "b", "c"), seed=s) for s in range(600))
    assert min(seen.values()) > 120, seen  # idle instances share light load


def test_ip_hash_maps_a_client_to_one_instance_whatever_the_order():
    ready = addrs("a", "b", "c")
    key = RequestKey(client_ip="203.0.113.7")
    first = pick(dep("ip-hash"), ready, key)
    assert all(pick(dep("ip-hash"), list(reversed(ready)), key, seed=s) == first for s in range(20))


def test_sticky_cookie_wins_while_its_instance_is_routable():
    ready = addrs("a", "b", "c")
    key = RequestKey(cookie="b")
    assert {pick(dep("least-connections", sticky=True), ready, key, busy={"b": 50}, seed=s) for s in range(20)} \
        == {"b"}
    assert pick(dep("round-robin", sticky=True), addrs("a", "c"), key) in ("a", "c")
    assert pick(dep("round-robin", sticky=False), ready, key) == "a"  # cookie ignored without stickySessions


def test_cookie_is_named_for_the_deployment():
    assert cookie_name("breezyvoice") == "autodeploy-breezyvoice"
