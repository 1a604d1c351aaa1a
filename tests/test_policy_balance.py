"""Load-balancing choices, client address trust, outlier ejection, health counting."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.policy.balance import (Candidate, HashRing, OutlierState, client_ip, ejected,
                                       health_update, ip_hash, least_connections, outlier_forget,
                                       outlier_update, stable_hash, sticky_target,
                                       weighted_split)


def cands(*loads: int) -> list[Candidate]:
    return [Candidate(f"i{n}", load) for n, load in enumerate(loads)]


# --- round robin -----------------------------------------------------------

def test_p2c_with_one_candidate_picks_it():
    assert least_connections(cands(7), random.Random(0)) == "i0"


def test_p2c_between_two_always_picks_the_less_loaded():
    rng = random.Random(1)
    assert {least_connections(cands(5, 1), rng) for _ in range(50)} == {"i1"}


def test_p2c_never_picks_the_most_loaded_of_three_or_more():
    rng = random.Random(2)
    picks = Counter(least_connections(cands(0, 3, 10), rng) for _ in range(3000))
    assert picks["i2"] == 0
    # The idle one wins every pair it is in: two of the three pairs.
    assert picks["i0"] > picks["i1"]


def test_p2c_ties_are_broken_by_id_so_a_seed_reproduces_the_choice():
    cs = cands(2, 2, 2, 2)
    a = [least_connections(cs, random.Random(7)) for _ in range(5)]
    b = [least_connections(list(reversed(cs)), random.Random(7)) for _ in range(5)]
    assert a == b
    assert least_connections(cands(1, 1), random.Random(3)) == "i0"


def test_p2c_divides_load_by_weight():
    cs = [Candidate("big", 4, weight=4.0), Candidate("small", 2, weight=1.0)]
    assert least_connections(cs, random.Random(0)) == "big"


def test_p2c_rejects_non_positive_weights():
    with pytest.raises(ValueError, match="weights must be > 0"):
        least_connections([Candidate("a", 0, 0.0), Candidate("b", 0)], random.Random(0))


# --- consistent hashing -----------------------------------------------------

def test_stable_hash_is_the_same_in_every_process():
    # Pinned: Python's hash() changes with PYTHONHASHSEED, so gunicorn workers
    # would disagree on where a client goes; blake2b does not.
    assert stable_hash("10.0.0.1") == 0x538ef646e14d03e6


def test_hash_ring_gives_the_same_instance_for_the_same_key():
    ring = HashRing(["a", "b", "c"])
    assert all(ring.pick(f"k{i}") == ring.pick(f"k{i}") for i in range(100))
    assert HashRing(["c", "b", "a"]).pick("k1") == ring.pick("k1")


def test_hash_ring_spreads_keys_over_all_instances():
    ring = HashRing(["a", "b", "c", "d"])
    counts = Counter(ring.pick(f"10.0.{i // 256}.{i % 256}") for i in range(10_000))
    assert set(counts) == {"a", "b", "c", "d"}
    assert all(1500 < n < 3500 for n in counts.values()), counts


def test_ip_hash_going_from_3_to_4_instances_moves_about_a_quarter_of_keys():
    keys = [f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}" for i in range(10_000)]
    three = cands(0, 0, 0)
    four = cands(0, 0, 0, 0)
    moved = sum(ip_hash(three, k) != ip_hash(four, k) for k in keys)
    # Ideal is 1/4; 100 virtual nodes keep it close. Modulo hashing would move ~3/4.
    assert 0.15 <= moved / len(keys) <= 0.35
    # Every moved key moved to the new instance: nothing shuffles between old ones.
    assert all(ip_hash(four, k) == "i3" for k in keys if ip_hash(three, k) != ip_hash(four, k))


def test_ip_hash_removing_an_instance_moves_only_its_keys():
    keys = [f"k{i}" for i in range(2000)]
    four = cands(0, 0, 0, 0)
    three = [c for c in four if c.id != "i2"]
    for k in keys:
        if ip_hash(four, k) != "i2":
            assert ip_hash(three, k) == ip_hash(four, k)


def test_hash_ring_needs_ids_and_vnodes():
    with pytest.raises(ValueError):
        HashRing([])
    with pytest.raises(ValueError):
        HashRing(["a"], vnodes=0)


# --- X-Forwarded-For trust ------------------------------------------------

PROXIES = ["10.0.0.0/8", "192.168.1.1"]


def test_xff_from_an_untrusted_peer_is_ignored():
    assert client_ip("203.0.113.9", "1.2.3.4", PROXIES) == "203.0.113.9"


def test_no_xff_means_the_peer_address():
    assert client_ip("10.1.1.1", None, PROXIES) == "10.1.1.1"
    assert client_ip("10.1.1.1", "", PROXIES) == "10.1.1.1"


def test_xff_from_a_trusted_proxy_gives_the_right_most_untrusted_address():
    # The client forged "6.6.6.6"; our proxy appended the address it saw.
    assert client_ip("10.0.0.5", "6.6.6.6, 198.51.100.7", PROXIES) == "198.51.100.7"


def test_xff_skips_every_trusted_hop_from_the_right():
    xff = "6.6.6.6, 198.51.100.7, 10.2.3.4, 192.168.1.1"
    assert client_ip("10.0.0.5", xff, PROXIES) == "198.51.100.7"


def test_xff_of_only_trusted_hops_gives_the_left_most():
    assert client_ip("10.0.0.5", "10.9.9.9, 192.168.1.1", PROXIES) == "10.9.9.9"


def test_xff_exact_address_trust_does_not_extend_to_its_neighbours():
    assert client_ip("192.168.1.2", "1.2.3.4", PROXIES) == "192.168.1.2"


def test_xff_with_garbage_where_trust_ends_falls_back_to_the_peer():
    assert client_ip("10.0.0.5", "1.2.3.4, not-an-ip", PROXIES) == "10.0.0.5"


def test_xff_accepts_ports_ipv6_and_mapped_addresses():
    assert client_ip("10.0.0.5", "198.51.100.7:4711", PROXIES) == "198.51.100.7"
    assert client_ip("10.0.0.5", "[2001:db8::1]:443", PROXIES) == "2001:db8::1"
    assert client_ip("::ffff:10.0.0.5", "198.51.100.7", PROXIES) == "198.51.100.7"
    assert client_ip("fd00::1", "198.51.100.7", ["fd00::/8"]) == "198.51.100.7"


def test_no_trusted_proxies_means_never_believing_xff():
    assert client_ip("10.0.0.5", "1.2.3.4", []) == "10.0.0.5"


# --- sticky sessions --------------------------------------------------------

def test_sticky_cookie_for_a_ready_instance_is_honoured():
    assert sticky_target("i1", {"i0", "i1"}) == "i1"


def test_sticky_cookie_for_a_gone_instance_or_no_cookie_picks_anew():
    assert sticky_target("i9", {"i0", "i1"}) is None
    assert sticky_target(None, {"i0"}) is None
    assert sticky_target("", {""}) is None


# --- weighted split ---------------------------------------------------------

def test_weighted_split_sends_each_side_its_share():
    n = 10_000
    counts = Counter(weighted_split({"old": 90, "new": 10}, k / n) for k in range(n))
    assert counts == {"old": 9000, "new": 1000}


def test_weighted_split_with_random_keys_is_close_to_the_weights():
    rng = random.Random(5)
    counts = Counter(weighted_split({"old": 50, "new": 50}, rng.random()) for _ in range(10_000))
    assert 0.45 <= counts["new"] / 10_000 <= 0.55


def test_weighted_split_zero_weight_gets_nothing():
    assert {weighted_split({"old": 100, "new": 0}, k / 100) for k in range(100)} == {"old"}


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(0.001, 1000), min_size=1),
       st.floats(0.0, 1.0, exclude_max=True))
def test_weighted_split_always_names_a_weighted_revision(weights, key):
    assert weighted_split(weights, key) in weights


def test_weighted_split_rejects_bad_input():
    with pytest.raises(ValueError):
        weighted_split({"a": 1}, 1.0)
    with pytest.raises(ValueError):
        weighted_split({"a": 0}, 0.5)


# --- outlier ejection -------------------------------------------------------

def fail(state: OutlierState, iid: str, now: float, status: int | None = 503, total: int = 4,
         times: int = 1) -> OutlierState:
    for _ in range(times):
        state = outlier_update(state, iid, status, now, total=total)
    return state


def test_five_consecutive_5xx_eject_for_the_base_time():
    s = fail(OutlierState(), "a", 100.0, times=4)
    assert ejected(s, 100.0) == set()
    s = fail(s, "a", 100.0)
    assert ejected(s, 100.0) == {"a"}
    assert ejected(s, 129.9) == {"a"}
    assert ejected(s, 130.0) == set()


def test_a_success_resets_the_5xx_count():
    s = fail(OutlierState(), "a", 0.0, times=4)
    s = outlier_update(s, "a", 200, 0.0, total=4)
    s = fail(s, "a", 0.0, times=4)
    assert ejected(s, 0.0) == set()


def test_4xx_is_the_client_fault_and_counts_as_success():
    s = fail(OutlierState(), "a", 0.0, times=4)
    s = outlier_update(s, "a", 404, 0.0, total=4)
    assert s.consecutive_5xx == {}


def test_one_connect_failure_ejects():
    s = fail(OutlierState(), "a", 0.0, status=None)
    assert ejected(s, 0.0) == {"a"}


def test_ejection_time_grows_with_each_ejection():
    s = fail(OutlierState(), "a", 0.0, status=None)
    assert ejected(s, 29.0) == {"a"} and ejected(s, 30.0) == set()
    s = fail(s, "a", 30.0, status=None)
    assert ejected(s, 89.0) == {"a"} and ejected(s, 90.0) == set()
    s = fail(s, "a", 90.0, status=None)
    assert ejected(s, 179.0) == {"a"} and ejected(s, 180.0) == set()


def test_ejection_time_is_capped():
    s, now, spans = OutlierState(), 0.0, []
    for _ in range(15):
        s = fail(s, "a", now, status=None)
        spans.append(s.ejected_until["a"] - now)
        now = s.ejected_until["a"]
    assert spans[:3] == [30.0, 60.0, 90.0]
    assert max(spans) == 300.0 and spans[-1] == 300.0


def test_at_most_half_of_the_instances_are_ejected_at_once():
    s = OutlierState()
    for iid in ["a", "b", "c", "d"]:
        s = fail(s, iid, 0.0, status=None, total=4)
    assert ejected(s, 0.0) == {"a", "b"}
    # Once an ejection ends, the next failure of a blocked instance ejects it.
    s = fail(s, "c", 30.0, status=None, total=4)
    assert ejected(s, 30.0) == {"c"}


def test_a_single_instance_is_never_ejected():
    s = fail(OutlierState(), "a", 0.0, status=None, total=1)
    assert ejected(s, 0.0) == set()


def test_outlier_update_does_not_mutate_its_input():
    s0 = OutlierState()
    fail(s0, "a", 0.0, status=None)
    assert s0 == OutlierState()


def test_forgetting_removed_instances_frees_their_ejection_slots():
    s = fail(OutlierState(), "a", 0.0, status=None, total=2)
    s = outlier_forget(s, ["b"])
    s = fail(s, "b", 0.0, status=None, total=2)
    assert ejected(s, 0.0) == {"b"}


# --- health checks ----------------------------------------------------------

def test_health_failures_count_up_to_the_threshold_then_replace():
    n, replace = health_update(0, False, 3)
    assert (n, replace) == (1, False)
    n, replace = health_update(n, False, 3)
    assert (n, replace) == (2, False)
    assert health_update(n, False, 3) == (3, True)


def test_a_passing_health_check_resets_the_count():
    assert health_update(2, True, 3) == (0, False)
