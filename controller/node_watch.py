"""The controller's side of several nodes: place on them, and act when one goes or returns.

`place_instance` picks a node and its GPUs (`policy.placement.place_on_nodes`). `NodeWatch.step`
runs at the start of every reconcile pass and reads the driver's NodeBook:

* a node that does not answer loses its instances at once (out of routing, an event,
  their time booked in the ledger) and each lost instance that was serving or starting
  is replaced on another node, within maxReplicas;
* a node that answers again has its stale containers reconciled: adopted when their
  deployment still wants them, stopped when not (`policy.nodes.returning_containers`).

Kept apart from core.py so the hooks there stay one line each.
"""
from __future__ import annotations

import logging
from typing import Any

from controller import errors
from controller.errors import AutoDeployError
from controller.fleet import ALIVE, DRAINING, READY, STARTING, STOPPING, Fleet
from controller.nodes import NodeBook, NodeState, nodes_status
from controller.policy.nodes import Stale, Want, returning_containers
from controller.policy.placement import Holding, NodeView, NoPlacement, place_on_nodes
from controller.spec import Deployment

log = logging.getLogger("autodeploy.nodes")

_LIVE = (STARTING, READY, DRAINING, STOPPING)


def _book(fleet: Fleet) -> NodeBook | None:
    return getattr(fleet.driver, "nodes", None)


def holdings(fleet: Fleet) -> dict[str, Holding]:
    """Where every live instance runs (caller holds the lock)."""
    return {r.id: Holding(r.node, r.deployment, tuple(r.gpu_ids))
            for r in fleet.records() if r.node and r.phase in _LIVE}


def place_instance(fleet: Fleet, watch: "NodeWatch", spec: Deployment) -> tuple[str, list[str]]:
    """(node, GPU uuids) for a new instance of `spec`; raises 1009 or 1040 with the reason
    node by node, after recording an `unplaceable` event (caller holds the lock)."""
    book = _book(fleet)
    assert book is not None
    placed = place_on_nodes(watch.views(book), holdings(fleet), spec.name, spec.resources.gpu,
                            spec.node_selector)
    if isinstance(placed, NoPlacement):
        fleet.event(spec.name, "unplaceable", placed.reason)
        raise AutoDeployError(errors.NO_NODE if placed.no_node or not spec.resources.gpu.count
                              else errors.NO_FREE_GPU, placed.reason, retry_after=10.0)
    return placed.node, list(placed.gpu_ids)


class NodeWatch:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._generation: dict[str, int] = {}
        # deployment -> instances lost with a node that could not be replaced elsewhere.
        self._unreplaced: dict[str, int] = {}

    def views(self, book: NodeBook) -> list[NodeView]:
        """Nodes as placement sees them: one that answers again takes nothing new until its
        stale containers are reconciled (else a replacement could start beside one that
        is about to be adopted)."""
        return [NodeView(s.name, s.gpus, dict(s.labels), s.reachable and self._generation.get(s.name, s.generation)
                         == s.generation) for s in book.all()]

    def step(self, driver: Any) -> None:
        book = _book(self.fleet)
        if book is None:
            return
        for state in book.all():
            seen = self._generation.setdefault(state.name, state.generation)
            if not state.reachable:
                self._lose(state)
            elif state.generation != seen and self._returned(driver, state):
                self._generation[state.name] = state.generation  # placement may use it again

    def _lose(self, node: NodeState) -> None:
        fleet = self.fleet
        with fleet:
            lost = [r for r in fleet.records() if r.node == node.name and r.phase in _LIVE]
            if not lost:
                return
            for rec in lost:
                serving = rec.phase in ALIVE
                fleet.lost(rec, f"node {node.name} is unreachable ({node.error}): out of routing; its container "
                                "is reconciled when the node answers again")
                rt = fleet.deps.get(rec.deployment)
                if rt is None or not rt.serving() or not serving:
                    continue
                if len(rt.alive()) >= rt.spec.scaling.max_replicas:
                    continue
                try:
                    fleet.start(rt, f"replaces {rec.id}, lost with node {node.name}")
                except AutoDeployError as exc:
                    rt.last_error = exc.operator_message
                    self._unreplaced[rt.spec.name] = self._unreplaced.get(rt.spec.name, 0) + 1
            fleet.bump()

    def _returned(self, driver: Any, node: NodeState) -> bool:
        """Adopt or stop what the node still runs; False when it could not be listed (the
        next step tries again)."""
        fleet = self.fleet
        try:
            found = driver.discover(node=node.name)
        except Exception as exc:  # noqa: BLE001 - a raising listing is retried at the next step
            log.warning("listing containers on node %s: %s", node.name,
                        exc.message if isinstance(exc, AutoDeployError) else exc)
            return False
        with fleet:
            known = {i for rt in fleet.deps.values() for i in rt.instances}
            # Another serve's containers on a shared engine are its business, not ours.
            owner = getattr(driver, "owner", None)
            stale = {i.id: i for i in found if i.id not in known and (owner is None or i.owner in (None, owner))}
            wants = {}
            for name, rt in fleet.deps.items():
                if not rt.serving():
                    continue
                alive = len(rt.alive())
                wants[name] = Want(rt.spec.revision, min(rt.spec.scaling.max_replicas, max(
                    rt.spec.scaling.min_replicas, alive + self._unreplaced.get(name, 0))), alive)
            adopt, stop = returning_containers(
                [Stale(i.id, i.deployment, i.revision, i.port > 0) for i in stale.values()], wants)
        for iid in adopt:
            self._adopt(driver, node, stale[iid])
        for iid in stop:
            inst = stale[iid]
            fleet.stop_unowned(inst, inst.deployment or f"node:{node.name}",
                               f"node {node.name} answers again; its container {inst.container_id} is not wanted: "
                               "stopped")
        return True

    def _adopt(self, driver: Any, node: NodeState, inst: Any) -> None:
        fleet = self.fleet
        rt = fleet.deps.get(inst.deployment)
        health = rt.spec.load_balancer.health_check if rt else None
        if rt is None or not fleet.probes.ready(inst, health, driver.tcp_accept_means_ready, rt.spec.protocol):
            fleet.stop_unowned(inst, inst.deployment, f"node {node.name} answers again; container "
                               f"{inst.container_id} is not ready: stopped")
            return
        with fleet:
            if self._unreplaced.get(rt.spec.name):
                self._unreplaced[rt.spec.name] -= 1
            fleet.adopt(rt, inst, rt.revision_number, f"node {node.name} answers again and {inst.deployment} "
                        f"still wants this instance: back in routing on {inst.host}:{inst.port}",
                        node=node.name, stored=False)

    def status(self) -> list[dict[str, Any]]:
        """Per node: reachable, GPUs free and used, instances (caller holds the lock)."""
        book = _book(self.fleet)
        if book is None:
            return []
        return nodes_status(book, {iid: (h.node, h.deployment, h.gpu_ids)
                                   for iid, h in holdings(self.fleet).items()})
