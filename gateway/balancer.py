"""The per-request choice of an instance among a deployment's routable ones.

Order of precedence:
  1. a route rule (`Deploy-Route-Rule`: an instance id, `random`, `round-robin`) —
     handled by the router before it gets here, so rules always override;
  2. the sticky-session cookie, when `stickySessions` is on and it names a routable
     instance;
  3. the deployment's algorithm: round-robin (one sequence across workers, via the
     shared counters), least-connections (power of two choices over the in-flight
     counts of every worker), ip-hash (consistent hashing of the client address).

The arithmetic is in `controller.policy.balance`; this module only gathers its
inputs (shared counters, the client address) and applies it.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controller.contracts import Address, RouteEntry
from controller.policy.balance import Candidate, ip_hash, least_connections, sticky_target

COOKIE_PREFIX = "autodeploy-"


def cookie_name(deployment: str) -> str:
    return COOKIE_PREFIX + deployment


@dataclass(frozen=True)
class RequestKey:
    """What about a request may steer it: the client's address and its sticky cookie."""
    client_ip: str = ""
    cookie: str | None = None


def choose(dep: RouteEntry, routable: Sequence[Address], key: RequestKey, *, inflight: Callable[[Address], int],
           rr_next: Callable[[int], int], rand: random.Random) -> Address:
    """One of `routable` (non-empty) for a request with no route rule."""
    if dep.sticky and key.cookie:
        pinned = sticky_target(key.cookie, {r.id for r in routable})
        if pinned is not None:
            return next(r for r in routable if r.id == pinned)
    algorithm = dep.algorithm
    if len(routable) == 1:
        return routable[0]
    if algorithm == "least-connections":
        # The policy breaks ties by id (reproducible tests). Under light load every count
        # is 0 and the lowest ids would get everything; a jitter below one request makes
        # ties random without ever outweighing a real difference in counts.
        picked = least_connections([Candidate(r.id, inflight(r) + rand.random() * 0.5)  # type: ignore[arg-type]
                                    for r in routable], rand)
    elif algorithm == "ip-hash":
        picked = ip_hash([Candidate(r.id, 0) for r in routable], key.client_ip)
    else:
        ordered = sorted(routable, key=lambda r: r.id)
        return ordered[rr_next(dep.rr_slot) % len(ordered)]
    return next(r for r in routable if r.id == picked)
