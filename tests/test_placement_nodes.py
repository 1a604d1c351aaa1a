"""Placement across several nodes: exclusive GPUs per node, type matching, spread of a
deployment's replicas, packing of GPU fragments, nodeSelector, unreachable nodes."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.gpus import Gpu
from controller.policy.placement import (Holding, NodePlacement, NodeView, NoPlacement, gpu_type_matches,
                                         place_on_nodes)
from controller.spec import GpuSpec

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"


def gpus(*names: str) -> tuple[Gpu, ...]:
    # Declared GPUs: the same uuids on every node, as two stack entries "declared-0" would be.
    return tuple(Gpu(index=i, uuid=f"declared-{i}", name=n, memory_total_mb=0) for i, n in enumerate(names))


def run(nodes: list[NodeView], plan: list[tuple[str, GpuSpec]], selector: dict | None = None
        ) -> tuple[dict[str, Holding], list[NodePlacement | NoPlacement]]:
    """Place instances one after the other, as the controller does."""
    holdings: dict[str, Holding] = {}
    results = []
    for i, (dep, request) in enumerate(plan):
        result = place_on_nodes(nodes, holdings, dep, request, selector)
        results.append(result)
        if isinstance(result, NodePlacement):
            holdings[f"i{i}"] = Holding(result.node, dep, result.gpu_ids)
    return holdings, results


def test_replicas_of_one_deployment_spread_across_nodes() -> None:
    nodes = [NodeView("a"), NodeView("b"), NodeView("c")]
    holdings, _ = run(nodes, [("web", GpuSpec())] * 6)
    assert sorted(h.node for h in holdings.values()) == ["a", "a", "b", "b", "c", "c"]


def test_spread_counts_the_deployment_not_other_deployments_first() -> None:
    nodes = [NodeView("a"), NodeView("b")]
    holdings = {"x": Holding("a", "other", ()), "y": Holding("a", "other", ())}
    # b has fewer instances in all, but web's own count is what spreads it: 0 on both.
    assert place_on_nodes(nodes, holdings, "web", GpuSpec()) == NodePlacement("b", ())
    holdings["w"] = Holding("b", "web", ())
    assert place_on_nodes(nodes, holdings, "web", GpuSpec()) == NodePlacement("a", ())


def test_gpu_fragments_are_packed_so_a_whole_node_stays_free() -> None:
    nodes = [NodeView("a", gpus(*[H100] * 4)), NodeView("b", gpus(*[H100] * 4))]
    holdings = {"big": Holding("a", "train", ("declared-0", "declared-1", "declared-2"))}
    # One H100 for a new deployment: the last free GPU of a, not one of b's four.
    assert place_on_nodes(nodes, holdings, "small", GpuSpec(1, "H100")) == NodePlacement("a", ("declared-3",))
    holdings["s"] = Holding("a", "small", ("declared-3",))
    assert place_on_nodes(nodes, holdings, "big2", GpuSpec(4, "H100")) == \
        NodePlacement("b", ("declared-0", "declared-1", "declared-2", "declared-3"))


def test_gpu_type_picks_the_node_that_has_it() -> None:
    nodes = [NodeView("a", gpus(A100, A100)), NodeView("b", gpus(H100))]
    assert place_on_nodes(nodes, {}, "tts", GpuSpec(1, "H100")) == NodePlacement("b", ("declared-0",))


def test_node_selector_limits_the_nodes() -> None:
    nodes = [NodeView("a", labels={"zone": "us"}), NodeView("b", labels={"zone": "eu", "tier": "spot"})]
    assert place_on_nodes(nodes, {}, "web", GpuSpec(), {"zone": "eu"}) == NodePlacement("b", ())
    refused = place_on_nodes(nodes, {}, "web", GpuSpec(), {"zone": "ap"})
    assert isinstance(refused, NoPlacement) and refused.no_node
    assert "node a: labels do not match nodeSelector zone=ap" in refused.reason


def test_unreachable_nodes_take_nothing_and_say_so() -> None:
    nodes = [NodeView("a", reachable=False), NodeView("b")]
    assert place_on_nodes(nodes, {"x": Holding("b", "web", ())}, "web", GpuSpec()) == NodePlacement("b", ())
    refused = place_on_nodes([NodeView("a", reachable=False)], {}, "web", GpuSpec())
    assert refused == NoPlacement("node a: unreachable", no_node=True)


def test_no_free_gpu_anywhere_names_each_node() -> None:
    nodes = [NodeView("a", gpus(H100)), NodeView("b", gpus(H100))]
    holdings = {"x": Holding("a", "m", ("declared-0",)), "y": Holding("b", "m", ("declared-0",))}
    refused = place_on_nodes(nodes, holdings, "m", GpuSpec(1, "H100"))
    assert isinstance(refused, NoPlacement) and not refused.no_node
    assert refused.reason == ("node a: needs 1 x H100, 0 free of 1 matching (1 in use by instances x); "
                              "node b: needs 1 x H100, 0 free of 1 matching (1 in use by instances y)")


# --- properties

NAMES = ["a", "b", "c", "d"]
MODELS = [H100, A100]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[NodeView], list[tuple[str, GpuSpec]], dict[str, str]]:
    nodes = []
    for name in draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True)):
        nodes.append(NodeView(name, gpus(*draw(st.lists(st.sampled_from(MODELS), max_size=6))),
                              labels={"zone": draw(st.sampled_from(["eu", "us"]))},
                              reachable=draw(st.booleans()) or name == "a"))
    plan = [(draw(st.sampled_from(["web", "tts", "llm"])),
             GpuSpec(draw(st.integers(0, 3)), draw(st.sampled_from(["H100", "A100", None]))))
            for _ in range(draw(st.integers(1, 14)))]
    selector = draw(st.sampled_from([{}, {"zone": "eu"}]))
    return nodes, plan, selector


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_never_two_instances_on_one_gpu_and_never_a_node_over_its_gpus(cluster) -> None:
    nodes, plan, selector = cluster
    holdings, results = run(nodes, plan, selector)
    by_name = {n.name: n for n in nodes}
    pinned = [(h.node, u) for h in holdings.values() for u in h.gpu_ids]
    assert len(pinned) == len(set(pinned))
    for node in nodes:
        used = [u for h in holdings.values() if h.node == node.name for u in h.gpu_ids]
        assert len(used) <= len(node.gpus)
        assert set(used) <= {g.uuid for g in node.gpus}
    for (dep, request), result in zip(plan, results):
        if isinstance(result, NodePlacement):
            node = by_name[result.node]
            assert node.reachable and all(node.labels.get(k) == v for k, v in selector.items())
            names = {g.uuid: g.name for g in node.gpus}
            assert len(result.gpu_ids) == request.count
            assert all(request.type is None or gpu_type_matches(request.type, names[u]) for u in result.gpu_ids)
    assert run(nodes, plan, selector) == (holdings, results)  # deterministic


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_spread_a_replica_never_lands_where_its_deployment_has_more_than_on_a_node_that_fits(cluster) -> None:
    nodes, plan, selector = cluster
    holdings: dict[str, Holding] = {}
    for i, (dep, request) in enumerate(plan):
        result = place_on_nodes(nodes, holdings, dep, request, selector)
        if not isinstance(result, NodePlacement):
            continue
        mine = {n.name: sum(1 for h in holdings.values() if h.node == n.name and h.deployment == dep)
                for n in nodes}
        for other in nodes:
            alone = place_on_nodes([other], holdings, dep, request, selector)
            if isinstance(alone, NodePlacement):  # `other` could have taken it
                assert mine[result.node] <= mine[other.name]
        holdings[f"i{i}"] = Holding(result.node, dep, result.gpu_ids)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(1, 20))
def test_cpu_replicas_on_equal_nodes_differ_by_at_most_one_per_node(n_nodes: int, replicas: int) -> None:
    nodes = [NodeView(NAMES[i]) for i in range(n_nodes)]
    holdings, _ = run(nodes, [("web", GpuSpec())] * replicas)
    counts = [sum(1 for h in holdings.values() if h.node == n.name) for n in nodes]
    assert max(counts) - min(counts) <= 1 and sum(counts) == replicas
