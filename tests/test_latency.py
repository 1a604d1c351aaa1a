"""Latency histograms and sliding windows (controller.latency): exact merging, bounded
percentile error, and windows that forget what is older than they are."""
from __future__ import annotations

import random

import pytest

from controller.latency import (MAX_BUCKET, SlidingWindow, add_hist, bucket_bounds, bucket_of, percentile)


def hist_of(values_ms: list[float]) -> dict[int, int]:
    h: dict[int, int] = {}
    for v in values_ms:
        add_hist(h, {bucket_of(v): 1})
    return h


def test_every_latency_falls_inside_its_bucket():
    for ms in (0.0, 0.05, 0.1, 0.2, 1.0, 7.3, 50.0, 999.0, 123456.0):
        low, high = bucket_bounds(bucket_of(ms))
        assert low <= ms < high or bucket_of(ms) == 0


def test_buckets_are_ordered_and_capped():
    values = [0.01 * 1.07 ** i for i in range(300)]
    buckets = [bucket_of(v) for v in values]
    assert buckets == sorted(buckets)
    assert bucket_of(1e12) == MAX_BUCKET


def test_percentiles_stay_within_five_percent_of_the_exact_ones():
    rng = random.Random(7)
    values = sorted(rng.lognormvariate(3.0, 1.0) for _ in range(20_000))
    h = hist_of(values)
    for q in (0.5, 0.95, 0.99):
        exact = values[int(q * len(values)) - 1]
        got = percentile(h, q)
        assert got is not None and abs(got - exact) / exact < 0.05, (q, got, exact)


def test_merging_histograms_gives_the_percentile_of_all_requests_not_an_average():
    fast, slow = hist_of([10.0] * 98), hist_of([1000.0] * 2)
    merged: dict[int, int] = {}
    add_hist(merged, fast)
    add_hist(merged, {str(k): v for k, v in slow.items()})  # keys that crossed JSON
    assert percentile(merged, 0.5) == pytest.approx(10.0, rel=0.1)
    assert percentile(merged, 0.99) == pytest.approx(1000.0, rel=0.1)


def test_empty_histogram_has_no_percentile_and_quantile_must_be_in_range():
    assert percentile({}, 0.5) is None
    with pytest.raises(ValueError):
        percentile({1: 1}, 0.0)


def test_window_counts_rates_and_errors_then_forgets_old_seconds():
    w = SlidingWindow(window_s=10.0)
    for t in range(10):
        w.add(100.0 + t, count=5, errors=1, hist={bucket_of(20.0): 5})
    v = w.view(109.5)
    assert (v.count, v.errors) == (50, 10)
    assert v.rate == pytest.approx(50 / 9.5)
    assert v.error_rate == pytest.approx(0.2)
    assert v.quantiles_ms()["p50"] == pytest.approx(20.0, rel=0.06)
    later = w.view(115.0)  # seconds 100..104 fell out of the window
    assert later.count == 25 and later.rate == pytest.approx(2.5)
    assert w.view(200.0).count == 0 and w.empty(200.0)


def test_window_span_is_at_least_a_second_while_it_fills():
    w = SlidingWindow(window_s=60.0)
    w.add(10.0, 3, 0, {})
    assert w.view(10.2).span_s == 1.0
    assert w.view(10.2).rate == 3.0
