"""What to do with the containers a node still runs when it comes back. Pure.

While a node was unreachable its instances were taken out of routing and replaced
elsewhere, so what it still runs on return is stale. A stale container is adopted
when its deployment still wants it: the deployment runs, the container runs the
current revision, and the deployment has fewer live instances than it wants (its
minReplicas, plus instances lost with the node that could not be replaced elsewhere).
Every other stale container is stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Stale:
    instance: str
    deployment: str
    revision: str
    running: bool


@dataclass(frozen=True)
class Want:
    revision: str  # the deployment's current revision
    wanted: int    # how many live instances it wants
    alive: int     # how many it has (starting or ready)


def returning_containers(stale: Sequence[Stale], wants: Mapping[str, Want]) -> tuple[list[str], list[str]]:
    """(instance ids to adopt, instance ids to stop); `wants` holds running deployments only."""
    adopt: list[str] = []
    stop: list[str] = []
    alive = {name: w.alive for name, w in wants.items()}
    for s in sorted(stale, key=lambda s: (s.deployment, s.instance)):
        want = wants.get(s.deployment)
        if want is not None and s.running and s.revision == want.revision and alive[s.deployment] < want.wanted:
            adopt.append(s.instance)
            alive[s.deployment] += 1
        else:
            stop.append(s.instance)
    return adopt, stop
