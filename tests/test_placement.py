"""GPU placement: type matching, exclusive pins, clear reasons, stable multi-slot pins."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.gpus import Gpu
from controller.policy.placement import NoPlacement, Placement, gpu_type_matches, place, place_many
from controller.spec import GpuSpec

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"
T4 = "Tesla T4"


def gpus(*names: str) -> list[Gpu]:
    return [Gpu(index=i, uuid=f"GPU-{i}", name=n, memory_total_mb=81559) for i, n in enumerate(names)]


EIGHT_H100 = gpus(*[H100] * 8)


# --- gpu_type_matches

@pytest.mark.parametrize("wanted, model", [
    ("H100", H100),
    ("h100", H100),
    ("NVIDIA H100", H100),
    ("H100 80GB", H100),
    ("A100", A100),
    ("A100 40GB", A100),
    ("NVIDIA T4", T4),
    ("T4", T4),
    ("Tesla T4", T4),
    ("V100", "Tesla V100-SXM2-16GB"),
    ("RTX 4090", "NVIDIA GeForce RTX 4090"),
    ("NVIDIA H100 80GB HBM3", H100),
])
def test_type_matches_model_names_nvml_reports(wanted: str, model: str) -> None:
    assert gpu_type_matches(wanted, model)


@pytest.mark.parametrize("wanted, model", [
    ("H100", "NVIDIA H1000"),
    ("A10", A100),
    ("A100", "NVIDIA A10"),
    ("A100", H100),
    ("T4", "NVIDIA T40"),
    ("A100 80GB", A100),
    ("H100 PCIe", H100),
    ("", H100),
    ("NVIDIA", T4),
])
def test_type_does_not_match_other_models_or_partial_words(wanted: str, model: str) -> None:
    assert not gpu_type_matches(wanted, model)


# --- place

def test_zero_gpus_is_a_placement_without_gpus() -> None:
    assert place([], {}, GpuSpec(count=0, type="H100")) == Placement(())


def test_one_gpu_goes_to_the_lowest_free_index() -> None:
    assert place(EIGHT_H100, {}, GpuSpec(1, "H100")) == Placement(("GPU-0",))


def test_gpus_held_by_instances_are_skipped() -> None:
    assigned = {"abc": ["GPU-0"], "def": ["GPU-1", "GPU-3"]}
    assert place(EIGHT_H100, assigned, GpuSpec(2, "H100")) == Placement(("GPU-2", "GPU-4"))


def test_multi_gpu_request_gets_distinct_gpus() -> None:
    result = place(EIGHT_H100, {}, GpuSpec(4, "H100"))
    assert result == Placement(("GPU-0", "GPU-1", "GPU-2", "GPU-3"))


def test_inventory_order_does_not_change_the_pick() -> None:
    assert place(list(reversed(EIGHT_H100)), {}, GpuSpec(2, "H100")) == Placement(("GPU-0", "GPU-1"))


def test_untyped_request_takes_any_gpu() -> None:
    inventory = gpus(T4, A100)
    assert place(inventory, {"x": ["GPU-0"]}, GpuSpec(1, None)) == Placement(("GPU-1",))


def test_only_matching_gpus_are_used_in_a_mixed_inventory() -> None:
    inventory = gpus(T4, H100, A100, H100)
    assert place(inventory, {}, GpuSpec(2, "H100")) == Placement(("GPU-1", "GPU-3"))


def test_not_enough_free_gpus_names_the_holders() -> None:
    assigned = {f"inst{i}": [f"GPU-{i}"] for i in range(7)}
    result = place(EIGHT_H100, assigned, GpuSpec(2, "H100"))
    assert isinstance(result, NoPlacement)
    assert result.reason.startswith("needs 2 x H100, 1 free of 8 matching (7 in use by instances inst0, ")
    assert result.reason.endswith(", ...)")


def test_holders_are_listed_in_full_when_few() -> None:
    result = place(gpus(H100, H100), {"def": ["GPU-1"], "abc": ["GPU-0"]}, GpuSpec(1, "H100"))
    assert result == NoPlacement("needs 1 x H100, 0 free of 2 matching (2 in use by instances abc, def)")


def test_no_matching_type_lists_the_inventory() -> None:
    result = place(EIGHT_H100, {}, GpuSpec(1, "A100"))
    assert result == NoPlacement(f"no GPU matches type 'A100' (inventory: {H100} x8)")


def test_empty_inventory_says_so() -> None:
    assert place([], {}, GpuSpec(1, "H100")) == NoPlacement("no GPU matches type 'H100' (inventory: empty)")


def test_asking_for_more_than_exist_is_refused() -> None:
    result = place(gpus(H100), {}, GpuSpec(2, "H100"))
    assert result == NoPlacement("needs 2 x H100, 1 free of 1 matching")


def test_negative_count_is_refused() -> None:
    assert isinstance(place(EIGHT_H100, {}, GpuSpec(-1, "H100")), NoPlacement)


def test_a_gpu_listed_twice_is_handed_out_once() -> None:
    inventory = gpus(H100) + gpus(H100)
    assert place(inventory, {}, GpuSpec(2, "H100")) == NoPlacement("needs 2 x H100, 1 free of 1 matching")


def test_pins_to_gpus_outside_the_inventory_do_not_block() -> None:
    assert place(gpus(H100), {"old": ["GPU-gone"]}, GpuSpec(1, "H100")) == Placement(("GPU-0",))


# --- place_many

def test_place_many_pins_every_slot_exclusively() -> None:
    result = place_many(EIGHT_H100, {}, [("tts-0", GpuSpec(1, "H100")), ("tts-1", GpuSpec(1, "H100")),
                                         ("llm-0", GpuSpec(2, "H100"))])
    assert result == {"tts-0": Placement(("GPU-0",)), "tts-1": Placement(("GPU-1",)),
                      "llm-0": Placement(("GPU-2", "GPU-3"))}


def test_adding_a_slot_keeps_existing_pins() -> None:
    first = place_many(EIGHT_H100, {"other": ["GPU-1"]},
                       [("tts-0", GpuSpec(1, "H100")), ("llm-0", GpuSpec(2, "H100"))])
    previous = {k: list(v.gpu_ids) for k, v in first.items() if isinstance(v, Placement)}
    # The new slot sorts first and "other" left: neither may move the old pins.
    second = place_many(EIGHT_H100, previous,
                        [("aaa-0", GpuSpec(1, "H100")), ("tts-0", GpuSpec(1, "H100")),
                         ("llm-0", GpuSpec(2, "H100"))])
    assert second["tts-0"] == first["tts-0"]
    assert second["llm-0"] == first["llm-0"]
    assert second["aaa-0"] == Placement(("GPU-1",))


def test_a_slot_whose_request_changed_is_placed_again() -> None:
    result = place_many(EIGHT_H100, {"llm-0": ["GPU-5"]}, [("llm-0", GpuSpec(2, "H100"))])
    assert result == {"llm-0": Placement(("GPU-0", "GPU-1"))}


def test_a_previous_pin_on_a_gpu_held_by_another_is_moved() -> None:
    result = place_many(EIGHT_H100, {"other": ["GPU-0"], "tts-0": ["GPU-0"]}, [("tts-0", GpuSpec(1, "H100"))])
    assert result == {"tts-0": Placement(("GPU-1",))}


def test_slots_that_do_not_fit_get_a_reason_and_others_still_place() -> None:
    result = place_many(gpus(H100), {}, [("a-0", GpuSpec(1, "H100")), ("b-0", GpuSpec(1, "H100")),
                                         ("c-0", GpuSpec(0, None))])
    assert result["a-0"] == Placement(("GPU-0",))
    assert result["b-0"] == NoPlacement("needs 1 x H100, 0 free of 1 matching (1 in use by instances a-0)")
    assert result["c-0"] == Placement(())


def test_place_many_refuses_repeated_slot_keys() -> None:
    with pytest.raises(ValueError, match="a-0"):
        place_many(EIGHT_H100, {}, [("a-0", GpuSpec(1, "H100")), ("a-0", GpuSpec(1, "H100"))])


# --- properties

TYPES = ["H100", "A100", "T4", None]
MODELS = {"H100": H100, "A100": A100, "T4": T4}


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Gpu], dict[str, list[str]], list[tuple[str, GpuSpec]]]:
    models = draw(st.lists(st.sampled_from(sorted(MODELS.values())), max_size=8))
    inventory = gpus(*models)
    uuids = [g.uuid for g in inventory]
    # Existing holders: disjoint GPU sets, as the store guarantees.
    held = draw(st.lists(st.sampled_from(uuids), unique=True)) if uuids else []
    assigned: dict[str, list[str]] = {}
    for pos, uuid in enumerate(held):
        assigned.setdefault(f"inst{draw(st.integers(0, 3))}" if pos else "inst0", []).append(uuid)
    requests = [(f"slot-{i}", GpuSpec(draw(st.integers(0, 3)), draw(st.sampled_from(TYPES))))
                for i in range(draw(st.integers(0, 5)))]
    return inventory, assigned, requests


def _free_matching(inventory: list[Gpu], assigned: dict[str, list[str]], request: GpuSpec) -> int:
    taken = {u for pins in assigned.values() for u in pins}
    return sum(1 for g in inventory if g.uuid not in taken
               and (request.type is None or gpu_type_matches(request.type, g.name)))


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_place_is_exclusive_never_overcommits_and_is_deterministic(scenario) -> None:
    inventory, assigned, requests = scenario
    by_uuid = {g.uuid: g for g in inventory}
    taken = {u for pins in assigned.values() for u in pins}
    for _, request in requests:
        result = place(inventory, assigned, request)
        assert result == place(inventory, assigned, request)
        if isinstance(result, Placement):
            assert len(result.gpu_ids) == request.count
            assert len(set(result.gpu_ids)) == request.count
            assert not set(result.gpu_ids) & taken
            assert all(request.type is None or gpu_type_matches(request.type, by_uuid[u].name)
                       for u in result.gpu_ids)
        else:
            # Refused only when it really does not fit.
            assert _free_matching(inventory, assigned, request) < request.count


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_place_many_pins_are_disjoint_stable_and_survive_a_new_slot(scenario) -> None:
    inventory, assigned, requests = scenario
    result = place_many(inventory, assigned, requests)
    assert result == place_many(inventory, assigned, requests)
    pinned = [u for r in result.values() if isinstance(r, Placement) for u in r.gpu_ids]
    taken = {u for pins in assigned.values() for u in pins}
    assert len(pinned) == len(set(pinned))
    assert not set(pinned) & taken
    assert set(pinned) <= {g.uuid for g in inventory}

    previous = {**assigned, **{k: list(r.gpu_ids) for k, r in result.items() if isinstance(r, Placement)}}
    grown = place_many(inventory, previous, [("new-0", GpuSpec(1, None)), *requests])
    for key, outcome in result.items():
        if isinstance(outcome, Placement):
            assert grown[key] == outcome
