"""Nodes: the Docker hosts one controller places instances on, and what is known of each.

A `NodeBook` holds every node's reachability and GPU inventory. The docker driver writes
it (its watcher pings each engine; a failed engine call says so at once); the controller
reads it to place instances (`controller.policy.placement.place_on_nodes`) and to show
`autodeploy nodes`. The book only records what was observed: what to do about a node
that went away or came back is decided by `controller.node_watch` and the policies.
"""
from __future__ import annotations

import csv
import io
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from controller.gpus import Gpu
from controller.policy.placement import NodeView
from controller.stack import NodeConfig, Prices, StackConfig

# Written by `serve` into its state dir so that `autodeploy logs` reaches the right engine.
NODES_FILE = "nodes.json"
# nvidia-smi prints this for each GPU in the probe container (`--gpus all`).
PROBE_COMMAND = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class NodeState:
    name: str
    address: str
    docker_host: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    gpus: tuple[Gpu, ...] = ()
    gpu_source: str = "none"   # "stack config", "probe <image>", "nvml", "none"
    gpu_detail: str = ""       # why that source (e.g. the probe image is not on the node)
    reachable: bool = True
    error: str = ""            # what the engine last said when it stopped answering
    since: float = 0.0         # when `reachable` last changed
    generation: int = 0        # +1 each time the node comes back, so watchers see every return


class NodeBook:
    """Thread-safe table of NodeState by name; readers get immutable copies."""

    def __init__(self, states: Sequence[NodeState]) -> None:
        self._lock = threading.Lock()
        self._states = {s.name: s for s in states}
        self._order = [s.name for s in states]

    def names(self) -> list[str]:
        return list(self._order)

    def get(self, name: str) -> NodeState:
        with self._lock:
            return self._states[name]

    def all(self) -> list[NodeState]:
        with self._lock:
            return [self._states[n] for n in self._order]

    def views(self) -> list[NodeView]:
        return [NodeView(s.name, s.gpus, dict(s.labels), s.reachable) for s in self.all()]

    def mark(self, name: str, reachable: bool, error: str, now: float) -> bool:
        """Record a ping or a failed call; True when reachability changed."""
        with self._lock:
            old = self._states[name]
            if old.reachable == reachable:
                if not reachable and error and error != old.error:
                    self._states[name] = replace(old, error=error)
                return False
            self._states[name] = replace(old, reachable=reachable, error="" if reachable else error, since=now,
                                         generation=old.generation + (1 if reachable else 0))
            return True

    def set_gpus(self, name: str, gpus: Sequence[Gpu], source: str, detail: str = "") -> None:
        with self._lock:
            self._states[name] = replace(self._states[name], gpus=tuple(gpus), gpu_source=source, gpu_detail=detail)


def parse_probe_output(text: str) -> list[Gpu]:
    """nvidia-smi's CSV (index, uuid, name, memory.total in MiB) -> Gpu items."""
    out = []
    for row in csv.reader(io.StringIO(text)):
        cells = [c.strip() for c in row]
        if len(cells) != 4 or not cells[0].isdigit():
            continue
        memory = int(cells[3]) if cells[3].isdigit() else 0
        out.append(Gpu(index=int(cells[0]), uuid=cells[1], name=cells[2], memory_total_mb=memory))
    return out


def declared_gpus(node: NodeConfig) -> list[Gpu]:
    return [Gpu(index=g.index, uuid=g.uuid or f"declared-{g.index}", name=g.name, memory_total_mb=g.memory_mb or 0)
            for g in sorted(node.gpus, key=lambda g: g.index)]


class NodePrices:
    """USD per instance-hour by node: the node's own `prices`, else the stack's.

    `per_hour(gpu)` without a node is the stack's price, as `Prices` answers it."""

    def __init__(self, stack: StackConfig) -> None:
        self._default = stack.prices
        self._by_node: dict[str, Prices] = {n.name: n.prices for n in stack.nodes if n.prices is not None}

    def per_hour(self, gpu: Any, node: str | None = None) -> float:
        return (self._by_node.get(node or "") or self._default).per_hour(gpu)


def write_nodes_file(state_dir: Path, nodes: Sequence[NodeConfig]) -> None:
    data = {n.name: {"dockerHost": n.docker_host, "address": n.address,
                     "tls": None if n.tls is None else {"caCert": n.tls.ca_cert, "cert": n.tls.cert, "key": n.tls.key}}
            for n in nodes}
    (state_dir / NODES_FILE).write_text(json.dumps(data, indent=2))


def read_nodes_file(state_dir: Path) -> list[NodeConfig]:
    """The nodes a `serve` with this state dir used; [] when it wrote none."""
    from controller.stack import TlsPaths
    path = state_dir / NODES_FILE
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [NodeConfig(name=name, docker_host=v.get("dockerHost"), address=v.get("address") or "127.0.0.1",
                       tls=None if not v.get("tls") else TlsPaths(v["tls"]["caCert"], v["tls"]["cert"], v["tls"]["key"]))
            for name, v in data.items()]


def nodes_status(book: NodeBook, placed: Mapping[str, tuple[str, str, Sequence[str]]]) -> list[dict[str, Any]]:
    """What `autodeploy nodes` and the status API show. `placed`: instance id ->
    (node, deployment, GPU uuids) of every live instance."""
    out = []
    for s in book.all():
        mine = sorted((iid, dep, list(g)) for iid, (node, dep, g) in placed.items() if node == s.name)
        used = sorted({u for _, _, g in mine for u in g})
        out.append({
            "name": s.name, "address": s.address, "docker_host": s.docker_host, "labels": dict(s.labels),
            "reachable": s.reachable, "error": s.error or None, "since": s.since or None,
            "gpus": {"total": len(s.gpus), "used": len(used), "free": len(s.gpus) - len(used),
                     "source": s.gpu_source, "detail": s.gpu_detail or None,
                     "items": [{"index": g.index, "uuid": g.uuid, "name": g.name, "used": g.uuid in used}
                               for g in s.gpus]},
            "instances": [{"id": iid, "deployment": dep, "gpu_ids": g} for iid, dep, g in mine],
        })
    return out
