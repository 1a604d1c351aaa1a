"""Metrics end to end: Prometheus text on /metrics adds up every gunicorn worker's
counts, and the status API shows sliding-window rates, errors and percentiles."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import requests

from conftest import deployment_yaml

SAMPLE = re.compile(r'^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m["name"] == name:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            out.append((labels, float(m["value"])))
    return out


def worker_pids_with_counts(s) -> set[str]:
    """Each gunicorn worker writes its own counter file: counter_<pid>.db."""
    return {p.stem.split("_")[-1] for p in (s.state_dir / "prometheus").glob("counter_*.db")}


def test_metrics_add_up_request_counts_across_gateway_workers(serve):
    s = serve({"hello.yaml": deployment_yaml("hello")}, "--workers", "2")
    sent = 0
    with ThreadPoolExecutor(16) as pool:
        # Fresh connections, many at once: the kernel hands them to both workers. Go on
        # until both have counted something (almost always the first batch).
        for _ in range(20):
            codes = list(pool.map(lambda _: requests.get(s.url + "/d/hello/slow?ms=50", timeout=30).status_code,
                                  range(32)))
            assert set(codes) == {200}
            sent += len(codes)
            if len(worker_pids_with_counts(s)) >= 2:
                break
    assert len(worker_pids_with_counts(s)) >= 2
    for _ in range(4):  # whichever worker answers the scrape, the totals are the same
        text = s.get("/metrics").text
        counted = samples(text, "autodeploy_requests_total")
        assert sum(v for labels, v in counted if labels["deployment"] == "hello" and labels["status"] == "200") \
            == sent
        hist = samples(text, "autodeploy_request_duration_seconds_count")
        assert sum(v for _, v in hist) == sent
    assert "\nautodeploy_controller_up 1.0\n" in text
    ready = samples(text, "autodeploy_replicas")
    assert ({"deployment": "hello", "state": "ready"}, 1.0) in ready


def test_status_api_and_metrics_show_window_rates_errors_and_percentiles(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")}, "--workers", "2")
    with ThreadPoolExecutor(8) as pool:
        ok = list(pool.map(lambda _: s.get("/d/hello/slow?ms=60").status_code, range(30)))
        bad = list(pool.map(lambda _: s.get("/d/hello/status/500").status_code, range(10)))
    assert set(ok) == {200} and set(bad) == {500}
    # Workers report with their next sync (a quarter of a second): wait for all 40.
    dep = s.wait_for(lambda: (d := s.status("hello"))["metrics"]["requests"] == 40 and d, timeout=10,
                     what="40 requests in the status window")
    m = dep["metrics"]
    assert m["errors"] == 10 and m["error_rate"] == 0.25
    assert m["requests_per_s"] > 0
    lat = m["latency_ms"]
    assert set(lat) == {"p50", "p95", "p99"}
    assert lat["p50"] <= lat["p95"] <= lat["p99"]
    assert lat["p95"] >= 50  # most requests slept 60 ms; buckets are +-5 %
    inst = dep["instances"][0]
    assert inst["metrics"]["requests"] == 40 and inst["metrics"]["latency_ms"]["p99"] == lat["p99"]
    assert inst["metrics"]["mem_bytes"] is None or inst["metrics"]["mem_bytes"] > 0
    assert inst["healthy"] is True

    text = s.get("/metrics").text
    quantiles = {labels["quantile"]: v for labels, v in samples(text, "autodeploy_deployment_latency_seconds")}
    assert set(quantiles) == {"0.5", "0.95", "0.99"}
    assert abs(quantiles["0.99"] - lat["p99"] / 1000) < 1e-6
    errors = {labels["status"]: v for labels, v in samples(text, "autodeploy_requests_total")}
    assert errors == {"200": 30.0, "500": 10.0}
    assert samples(text, "autodeploy_deployment_error_ratio") == [({"deployment": "hello"}, 0.25)]
