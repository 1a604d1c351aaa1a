"""GPU placement: which GPUs an instance gets. Pure functions over plain data.

Rules (the README repeats them):
* A GPU belongs to at most one instance at a time: placement never over-commits.
* A request for `count` GPUs of `type` gets `count` distinct GPUs whose model name
  matches `type` (see `gpu_type_matches`); `type` None or "" takes any GPU.
* Among the free matching GPUs the lowest indexes win. Nothing smarter (NVLink
  topology, memory headroom) on purpose: the same inputs always give the same pins,
  and a human can predict them from `autodeploy gpus`.
* `count` 0 is a placement with no GPUs; when the request cannot be met the answer is
  a `NoPlacement` whose reason says what is missing and who holds it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from controller.inventory import Gpu
from controller.spec import GpuSpec

# Brand words NVML puts in front of the model ("Tesla T4", "NVIDIA H100 ...") while
# users write "T4" or "NVIDIA T4" (the seeds' own spelling): they carry no model.
_BRAND_TOKENS = frozenset({"nvidia", "tesla"})
_TOKEN_SPLIT = re.compile(r"[^a-z0-9]+")
# How many instance ids a NoPlacement reason names before it says "...".
_MAX_HOLDERS_NAMED = 5


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN_SPLIT.split(text.lower()) if t]


def _model_tokens(text: str) -> frozenset[str]:
    tokens = _tokens(text)
    stripped = [t for t in tokens if t not in _BRAND_TOKENS]
    # "NVIDIA" alone still has to mean something: then the brand is the model.
    return frozenset(stripped or tokens)


def gpu_type_matches(wanted: str, model_name: str) -> bool:
    """True when every word of `wanted` is a whole word of `model_name`.

    Words are the case-insensitive alphanumeric runs, brand words (NVIDIA, Tesla)
    aside, so "H100" matches "NVIDIA H100 80GB HBM3", "A100" matches
    "NVIDIA A100-SXM4-40GB", "NVIDIA T4" matches "Tesla T4", and "A100 80GB" matches
    "NVIDIA A100-SXM4-80GB". Whole words keep "A10" from matching "A100" and "H100"
    from matching "H1000".
    """
    want = _model_tokens(wanted)
    if not want:
        return False
    # Brand words stay on the model side so a bare "NVIDIA" still matches.
    return want <= frozenset(_tokens(model_name))


def match_specificity(wanted: str) -> int:
    """How many model words `wanted` names: among several matching keys the most
    specific wins (a price for "A100 80GB" beats one for "A100")."""
    return len(_model_tokens(wanted))


@dataclass(frozen=True)
class Placement:
    gpu_ids: tuple[str, ...]


@dataclass(frozen=True)
class NoPlacement:
    reason: str
    # True when no node was even a candidate (all unreachable, or none matches the
    # nodeSelector): error 1040 rather than 1009, since freeing a GPU would not help.
    no_node: bool = False


def _wants(request: GpuSpec, gpu: Gpu) -> bool:
    return not request.type or gpu_type_matches(request.type, gpu.name)


def _describe_request(request: GpuSpec) -> str:
    return f"{request.count} x {request.type}" if request.type else f"{request.count} x GPU (any type)"


def _describe_inventory(inventory: Sequence[Gpu]) -> str:
    if not inventory:
        return "empty"
    counts: dict[str, int] = {}
    for gpu in inventory:
        counts[gpu.name] = counts.get(gpu.name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


def _unique_by_uuid(inventory: Sequence[Gpu]) -> list[Gpu]:
    # A GPU listed twice must not be handed out twice.
    seen: set[str] = set()
    out: list[Gpu] = []
    for gpu in sorted(inventory, key=lambda g: (g.index, g.uuid)):
        if gpu.uuid not in seen:
            seen.add(gpu.uuid)
            out.append(gpu)
    return out


def place(inventory: Sequence[Gpu], assigned: Mapping[str, Sequence[str]],
          request: GpuSpec) -> Placement | NoPlacement:
    """Pick `request.count` free GPUs of `request.type`, lowest index first.

    `assigned` maps instance id -> the GPU uuids it holds; those are not free.
    """
    if request.count < 0:
        return NoPlacement(f"gpu.count must be 0 or more, got {request.count}")
    if request.count == 0:
        return Placement(())
    gpus = _unique_by_uuid(inventory)
    matching = [g for g in gpus if _wants(request, g)]
    if not matching:
        return NoPlacement(f"no GPU matches type {request.type!r} "
                           f"(inventory: {_describe_inventory(gpus)})")
    holder: dict[str, str] = {}
    for instance_id in sorted(assigned):
        for uuid in assigned[instance_id]:
            holder.setdefault(uuid, instance_id)
    free = [g for g in matching if g.uuid not in holder]
    if len(free) < request.count:
        holders = sorted({holder[g.uuid] for g in matching if g.uuid in holder})
        named = ", ".join(holders[:_MAX_HOLDERS_NAMED])
        more = ", ..." if len(holders) > _MAX_HOLDERS_NAMED else ""
        in_use = len(matching) - len(free)
        held = f" ({in_use} in use by instances {named}{more})" if in_use else ""
        return NoPlacement(f"needs {_describe_request(request)}, {len(free)} free of "
                           f"{len(matching)} matching{held}")
    return Placement(tuple(g.uuid for g in free[:request.count]))


def _still_valid(pins: Sequence[str], request: GpuSpec, by_uuid: Mapping[str, Gpu],
                 taken: set[str]) -> bool:
    return (len(pins) == request.count and len(set(pins)) == len(pins)
            and all(u in by_uuid and u not in taken and _wants(request, by_uuid[u]) for u in pins))


def place_many(inventory: Sequence[Gpu], assigned: Mapping[str, Sequence[str]],
               requests: Sequence[tuple[str, GpuSpec]]) -> dict[str, Placement | NoPlacement]:
    """Pin every slot (e.g. "breezyvoice-0") at once, each slot exclusive.

    `assigned` may carry the slots' previous pins under the slot keys: a slot keeps its
    pins while they still fit its request, so adding a slot never moves existing ones.
    Entries of `assigned` whose key is not a requested slot are other holders and stay
    in use. Slots that keep their pins are settled first, then new (or no longer
    fitting) slots are placed in request order, so equal inputs give equal pins.
    """
    keys = [key for key, _ in requests]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"slot keys must be unique, repeated: {', '.join(dupes)}")
    slots = set(keys)
    by_uuid = {g.uuid: g for g in _unique_by_uuid(inventory)}
    held: dict[str, list[str]] = {k: list(v) for k, v in assigned.items() if k not in slots}
    taken = {u for pins in held.values() for u in pins}

    result: dict[str, Placement | NoPlacement] = {}
    for key, request in requests:
        previous = assigned.get(key)
        if previous is not None and request.count > 0 and _still_valid(previous, request, by_uuid, taken):
            result[key] = Placement(tuple(previous))
            held[key] = list(previous)
            taken.update(previous)
    for key, request in requests:
        if key in result:
            continue
        outcome = place(inventory, held, request)
        if isinstance(outcome, Placement):
            held[key] = list(outcome.gpu_ids)
        result[key] = outcome
    # Callers read the answer in request order.
    return {key: result[key] for key in keys}


# --- several nodes ------------------------------------------------------------------------
#
# Rules (the README repeats them):
# * Only reachable nodes whose labels carry every key/value of the deployment's
#   nodeSelector are candidates; GPUs are exclusive per node (uuids may repeat across
#   nodes: two machines may both declare "declared-0").
# * Spread: a replica goes to a candidate that holds the fewest replicas of its
#   deployment, so losing one node loses as few of them as possible.
# * Pack: among those, a GPU request goes to the node left with the fewest free GPUs
#   of its type (best fit), keeping whole free nodes for larger requests; then the node
#   with the fewest instances of any deployment; then the name, so equal inputs give
#   equal answers.

@dataclass(frozen=True)
class NodeView:
    """What placement knows of one node."""
    name: str
    gpus: tuple[Gpu, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    reachable: bool = True


@dataclass(frozen=True)
class Holding:
    """One instance placed on a node: its deployment and the GPU uuids it holds there."""
    node: str
    deployment: str
    gpu_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodePlacement:
    node: str
    gpu_ids: tuple[str, ...]


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _describe_selector(selector: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))


def place_on_nodes(nodes: Sequence[NodeView], holdings: Mapping[str, Holding], deployment: str,
                   request: GpuSpec, selector: Mapping[str, str] | None = None) -> NodePlacement | NoPlacement:
    """Pick the node (and its GPUs) for one new instance of `deployment`.

    `holdings` maps instance id -> where it runs; those GPUs are not free on that node.
    A NoPlacement says, node by node, why none could take it.
    """
    selector = selector or {}
    if not nodes:
        return NoPlacement("no nodes are configured", no_node=True)
    reasons: list[str] = []
    candidates = 0
    options: list[tuple[tuple[int, int, int, str], NodePlacement]] = []
    for node in sorted(nodes, key=lambda n: n.name):
        if not node.reachable:
            reasons.append(f"node {node.name}: unreachable")
            continue
        if not selector_matches(selector, node.labels):
            reasons.append(f"node {node.name}: labels do not match nodeSelector {_describe_selector(selector)}")
            continue
        candidates += 1
        on_node = {iid: h for iid, h in holdings.items() if h.node == node.name}
        outcome = place(node.gpus, {iid: h.gpu_ids for iid, h in on_node.items()}, request)
        if isinstance(outcome, NoPlacement):
            reasons.append(f"node {node.name}: {outcome.reason}")
            continue
        mine = sum(1 for h in on_node.values() if h.deployment == deployment)
        left = 0
        if request.count > 0:
            held = {u for h in on_node.values() for u in h.gpu_ids} | set(outcome.gpu_ids)
            left = sum(1 for g in _unique_by_uuid(node.gpus) if _wants(request, g) and g.uuid not in held)
        options.append(((mine, left, len(on_node), node.name), NodePlacement(node.name, outcome.gpu_ids)))
    if not options:
        return NoPlacement("; ".join(reasons), no_node=candidates == 0)
    return min(options, key=lambda o: o[0])[1]


def place_slots_on_nodes(nodes: Sequence[NodeView],
                         requests: Sequence[tuple[str, str, GpuSpec, Mapping[str, str]]],
                         pins: Mapping[str, Sequence[str]] | None = None,
                         placements: Mapping[str, str] | None = None) -> dict[str, NodePlacement | NoPlacement]:
    """Place every slot (key, deployment, GPU request, nodeSelector) of a Pulumi stack.

    A slot keeps its previous node (`placements`: slot -> node) while that node still
    exists and matches, and its previous GPUs (`pins`) while they still fit there, so
    adding a replica on another node moves nothing. The other slots are then placed in
    request order with `place_on_nodes`, as the controller places instances.
    """
    keys = [key for key, *_ in requests]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"slot keys must be unique, repeated: {', '.join(dupes)}")
    pins, placements = pins or {}, placements or {}
    by_node = {n.name: n for n in nodes}
    held: dict[str, Holding] = {}
    result: dict[str, NodePlacement | NoPlacement] = {}
    for key, deployment, request, selector in requests:
        node = by_node.get(placements.get(key, ""))
        if node is None or not node.reachable or not selector_matches(selector, node.labels):
            continue
        taken = {u for h in held.values() if h.node == node.name for u in h.gpu_ids}
        node_gpus = {g.uuid: g for g in _unique_by_uuid(node.gpus)}
        previous = list(pins.get(key, ()))
        if request.count == 0:
            gpu_ids: tuple[str, ...] = ()
        elif _still_valid(previous, request, node_gpus, taken):
            gpu_ids = tuple(previous)
        else:
            outcome = place(node.gpus, {k: h.gpu_ids for k, h in held.items() if h.node == node.name}, request)
            if isinstance(outcome, NoPlacement):
                continue  # placed afresh below
            gpu_ids = outcome.gpu_ids
        result[key] = NodePlacement(node.name, gpu_ids)
        held[key] = Holding(node.name, deployment, gpu_ids)
    for key, deployment, request, selector in requests:
        if key in result:
            continue
        outcome = place_on_nodes(nodes, held, deployment, request, selector)
        if isinstance(outcome, NodePlacement):
            held[key] = Holding(outcome.node, deployment, outcome.gpu_ids)
        result[key] = outcome
    return {key: result[key] for key in keys}
