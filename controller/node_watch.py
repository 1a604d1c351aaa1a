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
from typing import TYPE_CHECKING, Any

from controller import errors
from controller.errors import AutoDeployError
from controller.health import is_ready
from controller.nodes import NodeBook, NodeState, nodes_status
from controller.policy.nodes import Stale, Want, returning_containers
from controller.policy.placement import Holding, NodeView, NoPlacement, place_on_nodes
from controller.spec import Deployment

if TYPE_CHECKING:
    from controller.core import Controller

log = logging.getLogger("autodeploy.nodes")

_LIVE = ("starting", "ready", "draining", "stopping")


def _book(ctrl: Controller) -> NodeBook | None:
    return getattr(ctrl.driver, "nodes", None)


def holdings(ctrl: Controller) -> dict[str, Holding]:
    """Where every live instance runs (caller holds the lock)."""
    return {r.id: Holding(r.node, r.deployment, tuple(r.gpu_ids))
            for rt in ctrl.deps.values() for r in rt.instances.values() if r.node and r.phase in _LIVE}


def place_instance(ctrl: Controller, spec: Deployment) -> tuple[str, list[str]]:
    """(node, GPU uuids) for a new instance of `spec`; raises 1009 or 1040 with the reason
    node by node, after recording an `unplaceable` event (caller holds the lock)."""
    book = _book(ctrl)
    assert book is not None
    placed = place_on_nodes(ctrl.node_watch.views(book), holdings(ctrl), spec.name, spec.resources.gpu,
                            spec.node_selector)
    if isinstance(placed, NoPlacement):
        ctrl._event(spec.name, "unplaceable", placed.reason)
        raise AutoDeployError(errors.NO_NODE if placed.no_node or not spec.resources.gpu.count
                              else errors.NO_FREE_GPU, placed.reason, retry_after=10.0)
    return placed.node, list(placed.gpu_ids)


class NodeWatch:
    def __init__(self) -> None:
        self._generation: dict[str, int] = {}
        # deployment -> instances lost with a node that could not be replaced elsewhere.
        self._unreplaced: dict[str, int] = {}

    def views(self, book: NodeBook) -> list[NodeView]:
        """Nodes as placement sees them: one that answers again takes nothing new until its
        stale containers are reconciled (else a replacement could start beside one that
        is about to be adopted)."""
        return [NodeView(s.name, s.gpus, dict(s.labels), s.reachable and self._generation.get(s.name, s.generation)
                         == s.generation) for s in book.all()]

    def step(self, ctrl: Controller) -> None:
        book = _book(ctrl)
        if book is None:
            return
        for state in book.all():
            seen = self._generation.setdefault(state.name, state.generation)
            if not state.reachable:
                self._lose(ctrl, state)
            elif state.generation != seen and self._returned(ctrl, state):
                self._generation[state.name] = state.generation  # placement may use it again

    def _lose(self, ctrl: Controller, node: NodeState) -> None:
        with ctrl._cv:
            lost = [r for rt in ctrl.deps.values() for r in rt.instances.values()
                    if r.node == node.name and r.phase in _LIVE]
            if not lost:
                return
            now = ctrl.clock()
            for rec in lost:
                serving = rec.phase in ("starting", "ready")
                rec.phase = "gone"  # a launch thread waiting on it gives up
                rt = ctrl.deps.get(rec.deployment)
                if rt is not None:
                    rt.instances.pop(rec.id, None)
                ctrl._event(rec.deployment, "lost", f"node {node.name} is unreachable ({node.error}): out of "
                            "routing; its container is reconciled when the node answers again", rec.id)
                ctrl.store.remove_instance(rec.id, now)
                if rt is None or rt.removed or rt.spec.state != "running" or not serving:
                    continue
                alive = len(rt.by_phase("ready")) + len(rt.by_phase("starting"))
                if alive >= rt.spec.scaling.max_replicas:
                    continue
                try:
                    ctrl._start(rt, f"replaces {rec.id}, lost with node {node.name}")
                except AutoDeployError as exc:
                    rt.last_error = exc.message
                    self._unreplaced[rt.spec.name] = self._unreplaced.get(rt.spec.name, 0) + 1
            ctrl._bump()

    def _returned(self, ctrl: Controller, node: NodeState) -> bool:
        """Adopt or stop what the node still runs; False when it could not be listed (the
        next step tries again)."""
        try:
            found = ctrl.driver.discover(node=node.name)
        except AutoDeployError as exc:
            log.warning("listing containers on node %s: %s", node.name, exc.message)
            return False
        with ctrl._cv:
            known = {i for rt in ctrl.deps.values() for i in rt.instances}
            # Another serve's containers on a shared engine are its business, not ours.
            owner = getattr(ctrl.driver, "owner", None)
            stale = {i.id: i for i in found if i.id not in known and (owner is None or i.owner in (None, owner))}
            wants = {}
            for name, rt in ctrl.deps.items():
                if rt.removed or rt.spec.state != "running":
                    continue
                alive = len(rt.by_phase("ready")) + len(rt.by_phase("starting"))
                wants[name] = Want(rt.spec.revision, min(rt.spec.scaling.max_replicas, max(
                    rt.spec.scaling.min_replicas, alive + self._unreplaced.get(name, 0))), alive)
            adopt, stop = returning_containers(
                [Stale(i.id, i.deployment, i.revision, i.port > 0) for i in stale.values()], wants)
        for iid in adopt:
            self._adopt(ctrl, node, stale[iid])
        for iid in stop:
            inst = stale[iid]
            ctrl._event(inst.deployment or f"node:{node.name}", "stale",
                        f"node {node.name} answers again; its container {inst.container_id} is not wanted: stopped",
                        inst.id or None)
            ctrl._spawn(ctrl.driver.stop, inst, ctrl.stop_timeout)
        return True

    def _adopt(self, ctrl: Controller, node: NodeState, inst: Any) -> None:
        from controller.core import Rec
        rt = ctrl.deps.get(inst.deployment)
        health = rt.spec.load_balancer.health_check if rt else None
        if rt is None or not is_ready(inst.host, inst.port, health.path if health else None,
                                      tcp_is_enough=ctrl.driver.tcp_accept_means_ready):
            ctrl._event(inst.deployment, "stale", f"node {node.name} answers again; container {inst.container_id} "
                        "is not ready: stopped", inst.id)
            ctrl._spawn(ctrl.driver.stop, inst, ctrl.stop_timeout)
            return
        with ctrl._cv:
            now = ctrl.clock()
            rec = Rec(id=inst.id, deployment=inst.deployment, revision=inst.revision, phase="ready",
                      created=inst.started_at, inst=inst, ready_at=now, last_activity=now,
                      number=rt.revision_number, gpu_ids=list(inst.gpu_ids), node=node.name)
            rt.instances[rec.id] = rec
            ctrl.store.put_instance(inst, ctrl.driver.name, "ready", ctrl._price(rt.spec, node.name), ready_at=now)
            if self._unreplaced.get(rt.spec.name):
                self._unreplaced[rt.spec.name] -= 1
            ctrl._event(inst.deployment, "adopted", f"node {node.name} answers again and {inst.deployment} still "
                        f"wants this instance: back in routing on {inst.host}:{inst.port}", inst.id)
            ctrl._bump()

    def status(self, ctrl: Controller) -> list[dict[str, Any]]:
        """Per node: reachable, GPUs free and used, instances (caller holds the lock)."""
        book = _book(ctrl)
        if book is None:
            return []
        return nodes_status(book, {iid: (h.node, h.deployment, h.gpu_ids) for iid, h in holdings(ctrl).items()})
