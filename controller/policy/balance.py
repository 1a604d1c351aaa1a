"""Load-balancing choices, client addresses, outlier ejection and health counting.

Pure functions over plain data: the gateway owns the counters, the random
generator and the outlier state, and passes them in. Nothing here reads a
clock; `now` is an argument.
"""
from __future__ import annotations

import bisect
import hashlib
import ipaddress
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache


@dataclass(frozen=True)
class Candidate:
    id: str
    in_flight: int
    weight: float = 1.0  # least-connections divides load by it; must be > 0


def _ordered(candidates: Iterable[Candidate]) -> list[Candidate]:
    # The ready set reaches us from dicts and sets whose order can change between
    # requests; sorting by id makes a counter or a seed mean the same pick.
    out = sorted(candidates, key=lambda c: c.id)
    if not out:
        raise ValueError("no candidates to choose from")
    return out


def least_connections(candidates: Sequence[Candidate], rand: random.Random) -> str:
    """Power of two choices: sample two, take the one with fewer in flight per weight.

    Two random choices avoid the herd effect of always-least (every gateway worker
    piling onto the same instance between updates) while still avoiding hot spots.
    Ties go to the smaller id so a seeded generator gives a reproducible answer.
    """
    ordered = _ordered(candidates)
    for c in ordered:
        if c.weight <= 0:
            raise ValueError(f"candidate {c.id} has weight {c.weight}; weights must be > 0")
    if len(ordered) == 1:
        return ordered[0].id
    a, b = rand.sample(ordered, 2)
    return min((a, b), key=lambda c: (c.in_flight / c.weight, c.id)).id


def stable_hash(text: str) -> int:
    """64-bit hash that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing with virtual nodes: adding one of n+1 instances moves ~1/(n+1) keys."""

    def __init__(self, ids: Iterable[str], vnodes: int = 100) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        points = sorted((stable_hash(f"{iid}#{i}"), iid) for iid in set(ids) for i in range(vnodes))
        if not points:
            raise ValueError("hash ring needs at least one id")
        self._hashes = [h for h, _ in points]
        self._ids = [iid for _, iid in points]

    def pick(self, key: str) -> str:
        i = bisect.bisect_right(self._hashes, stable_hash(key))
        return self._ids[i % len(self._ids)]


@lru_cache(maxsize=256)
def _ring(ids: tuple[str, ...]) -> HashRing:
    # Building a ring hashes 100 points per instance; the ready set rarely changes,
    # so each request reuses the ring of the same sorted id tuple.
    return HashRing(ids)


def ip_hash(candidates: Sequence[Candidate], client_ip: str) -> str:
    """The instance a client address maps to; stable while the ready set is."""
    return _ring(tuple(c.id for c in _ordered(candidates))).pick(client_ip)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@lru_cache(maxsize=64)
def _networks(trusted: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(t.strip(), strict=False) for t in trusted)


def _parse_ip(text: str) -> Address | None:
    """An address from an X-Forwarded-For item; tolerates ports ("1.2.3.4:80", "[::1]:80")."""
    t = text.strip()
    if t.startswith("[") and "]" in t:
        t = t[1:t.index("]")]
    elif t.count(":") == 1:
        t = t.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # "::ffff:10.0.0.1" is 10.0.0.1 for trust and hashing
    return addr


def _trusted(addr: Address | None, nets: tuple[Network, ...]) -> bool:
    return addr is not None and any(addr.version == n.version and addr in n for n in nets)


def client_ip(remote_addr: str, x_forwarded_for: str | None, trusted_proxies: Sequence[str]) -> str:
    """The address to treat as the client's.

    X-Forwarded-For is only believed when the peer is a trusted proxy, and then
    only up to the right-most address no trusted proxy vouches for: everything to
    its left was written by the client and can be forged. A malformed entry where
    we would stop means a proxy we trust wrote garbage, so the header is ignored.
    """
    nets = _networks(tuple(trusted_proxies))
    peer = _parse_ip(remote_addr)
    if not x_forwarded_for or not _trusted(peer, nets):
        return str(peer) if peer is not None else remote_addr
    hops = [h for h in (p.strip() for p in x_forwarded_for.split(",")) if h]
    last_trusted = peer
    for hop in reversed(hops):
        addr = _parse_ip(hop)
        if addr is None:
            return str(peer)
        if not _trusted(addr, nets):
            return str(addr)
        last_trusted = addr
    # Every hop is one of ours: the left-most is the nearest thing to a client.
    return str(last_trusted)


def sticky_target(cookie_value: str | None, ready_ids: set[str]) -> str | None:
    """The instance a sticky-session cookie names, if it is still ready; else None (pick anew)."""
    if cookie_value and cookie_value in ready_ids:
        return cookie_value
    return None


def weighted_split(weights: Mapping[str, float], key: float) -> str:
    """Map `key` in [0, 1) onto revisions in proportion to their weights (canary traffic).

    A uniform key gives each name its share; a key derived from a client hash
    keeps each client on one side for a given split.
    """
    if not 0.0 <= key < 1.0:
        raise ValueError(f"key must be in [0, 1), got {key}")
    items = sorted((name, w) for name, w in weights.items() if w > 0)
    total = sum(w for _, w in items)
    if not items or total <= 0:
        raise ValueError("weighted_split needs at least one positive weight")
    acc = 0.0
    for name, w in items:
        acc += w / total
        if key < acc:
            return name
    return items[-1][0]  # float rounding left acc a hair below 1.0


@dataclass
class OutlierState:
    """Per-instance failure counters and ejections. The functions below never mutate it."""

    consecutive_5xx: dict[str, int] = field(default_factory=dict)
    consecutive_connect_failures: dict[str, int] = field(default_factory=dict)
    times_ejected: dict[str, int] = field(default_factory=dict)
    ejected_until: dict[str, float] = field(default_factory=dict)


def ejected(state: OutlierState, now: float) -> set[str]:
    """Instances that must get no traffic at `now`."""
    return {iid for iid, until in state.ejected_until.items() if now < until}


def outlier_update(state: OutlierState, instance_id: str, status: int | None, now: float,
                   consecutive_5xx: int = 5, consecutive_connect_failures: int = 1,
                   base_ejection_s: float = 30.0, *, total: int,
                   max_ejection_pct: float = 50.0, max_ejection_s: float = 300.0) -> OutlierState:
    """Record one response (`status`) or connect failure (None) and eject if a threshold is hit.

    Like Envoy: the n-th ejection of an instance lasts n x base_ejection_s (capped
    at max_ejection_s), so a flapping instance spends longer out each time. At
    most `max_ejection_pct` of the `total` instances are ejected at once: when
    many fail together the fault is more likely ours or upstream's than theirs,
    and ejecting them all would turn an error rate into an outage. A blocked
    ejection keeps its counter, so the next failure retries once room frees up.
    """
    s = OutlierState(dict(state.consecutive_5xx), dict(state.consecutive_connect_failures),
                     dict(state.times_ejected), dict(state.ejected_until))
    if status is None:
        s.consecutive_connect_failures[instance_id] = s.consecutive_connect_failures.get(instance_id, 0) + 1
    elif status >= 500:
        s.consecutive_5xx[instance_id] = s.consecutive_5xx.get(instance_id, 0) + 1
        s.consecutive_connect_failures.pop(instance_id, None)  # it did connect
    else:
        s.consecutive_5xx.pop(instance_id, None)
        s.consecutive_connect_failures.pop(instance_id, None)
        return s

    tripped = (s.consecutive_5xx.get(instance_id, 0) >= consecutive_5xx
               or s.consecutive_connect_failures.get(instance_id, 0) >= consecutive_connect_failures)
    out_now = ejected(s, now)
    if not tripped or instance_id in out_now:
        return s
    if len(out_now) + 1 > math.floor(total * max_ejection_pct / 100.0):
        return s
    n = s.times_ejected.get(instance_id, 0) + 1
    s.times_ejected[instance_id] = n
    s.ejected_until[instance_id] = now + min(base_ejection_s * n, max_ejection_s)
    s.consecutive_5xx.pop(instance_id, None)
    s.consecutive_connect_failures.pop(instance_id, None)
    return s


def outlier_forget(state: OutlierState, live_ids: Iterable[str]) -> OutlierState:
    """Drop entries of removed instances, so they do not hold ejection slots."""
    live = set(live_ids)
    return OutlierState(*({k: v for k, v in d.items() if k in live}
                          for d in (state.consecutive_5xx, state.consecutive_connect_failures,
                                    state.times_ejected, state.ejected_until)))


def health_update(failures: int, ok: bool, threshold: int) -> tuple[int, bool]:
    """New consecutive-failure count after one health check, and whether to replace the instance."""
    if ok:
        return 0, False
    n = failures + 1
    return n, n >= threshold
