"""Prometheus metrics on the gateway's `/metrics`, correct across gunicorn workers.

Two sources, one page:
  * what every worker counts per request (requests, latency histogram, in flight,
    upstream failures, retries, ejections): prometheus-client in multiprocess mode.
    `autodeploy serve` points PROMETHEUS_MULTIPROC_DIR at <state-dir>/prometheus
    (emptied at start) before gunicorn starts, each worker writes its own mmap'd
    files there, and a scrape adds them up, whichever worker answers it. A worker
    that exits is marked dead (gateway/gunicorn_conf.py) so its in-flight gauge goes.
  * what only the controller knows (replicas, sliding-window rate / error ratio /
    p50 p95 p99 per deployment and instance, CPU / memory / GPU use, health, the
    autoscaler's wanted size): read from the status API over IPC at scrape time.

Without PROMETHEUS_MULTIPROC_DIR (the app used in-process) the metrics live in one
process's registry, which is then the whole truth.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("autodeploy.gateway")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class WeightedHistogram(Histogram):
    """A Histogram that also takes one observation standing for `weight` requests: the
    haproxy data plane samples its request log above a rate, each line carrying the number
    of requests it stands for (gateway.haproxy_config.LOG_LINES_PER_S)."""

    def observe_weighted(self, amount: float, weight: int) -> None:
        if weight == 1:
            self.observe(amount)
            return
        self._raise_if_not_observable()
        self._sum.inc(amount * weight)
        for i, bound in enumerate(self._upper_bounds):
            if amount <= bound:
                self._buckets[i].inc(weight)
                break


class GatewayMetrics:
    """The per-request metrics of one gateway worker; labelled children are cached."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode values go to files whatever the registry; the scrape
        # registry is built per request. Otherwise this registry is what a scrape reads.
        self.registry = CollectorRegistry()
        reg = None if self.multiprocess else self.registry
        self._requests = Counter("autodeploy_requests", "Requests proxied to instances, by response status.",
                                 ["deployment", "instance", "status"], registry=reg)
        self._latency = WeightedHistogram("autodeploy_request_duration_seconds",
                                  "Time from the request reaching the gateway to the end of the response.",
                                  ["deployment", "instance"], buckets=LATENCY_BUCKETS, registry=reg)
        self._inflight = Gauge("autodeploy_requests_in_flight", "Requests being proxied now.",
                               ["deployment", "instance"], multiprocess_mode="livesum", registry=reg)
        self._upstream = Counter("autodeploy_upstream_failures",
                                 "Requests that got no response from an instance (connect = never connected).",
                                 ["deployment", "instance", "kind"], registry=reg)
        self._retries = Counter("autodeploy_retries", "Requests sent to a second instance after the first failed.",
                                ["deployment", "reason"], registry=reg)
        self._ejections = Counter("autodeploy_outlier_ejections",
                                  "Times a gateway worker stopped sending to an instance after failures.",
                                  ["deployment", "instance"], registry=reg)
        self._gateway_errors = Counter("autodeploy_gateway_errors",
                                       "Requests the gateway answered itself with a coded error.",
                                       ["deployment", "code"], registry=reg)
        self._children: dict[tuple, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def started(self, deployment: str, instance: str) -> None:
        self._child(self._inflight, deployment, instance).inc()

    def finished(self, deployment: str, instance: str) -> None:
        self._child(self._inflight, deployment, instance).dec()

    def response(self, deployment: str, instance: str, status: int | None, elapsed: float | None,
                 weight: int = 1) -> None:
        """One response, or `weight` alike ones (a sampled request log line)."""
        self._child(self._requests, deployment, instance, str(status) if status is not None else "none").inc(weight)
        if elapsed is not None:
            self._child(self._latency, deployment, instance).observe_weighted(elapsed, weight)

    def set_in_flight(self, deployment: str, instance: str, count: int) -> None:
        """The haproxy data plane: in flight on an instance, as HAProxy counts it (`scur`)."""
        self._child(self._inflight, deployment, instance).set(count)

    def upstream_failure(self, deployment: str, instance: str, kind: str) -> None:
        self._child(self._upstream, deployment, instance, kind).inc()

    def retried(self, deployment: str, reason: str) -> None:
        self._child(self._retries, deployment, reason).inc()

    def ejected(self, deployment: str, instance: str) -> None:
        self._child(self._ejections, deployment, instance).inc()

    def gateway_error(self, deployment: str, code: int) -> None:
        self._child(self._gateway_errors, deployment, str(code)).inc()

    def render(self, status: Callable[[], dict], coldstarts: Callable[[], dict] | None = None) -> bytes:
        """The text exposition: every worker's counters plus the controller's view."""
        if self.multiprocess:
            from prometheus_client import multiprocess
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = CollectorRegistry()
            registry.register(_Forward(self.registry))
        registry.register(ControllerCollector(status, coldstarts))
        return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class ControllerCollector(Collector):
    """Gauges from the controller's status API, read once per scrape."""

    def __init__(self, status: Callable[[], dict], coldstarts: Callable[[], dict] | None = None) -> None:
        self.status = status
        self.coldstarts = coldstarts

    def collect(self) -> Iterator[Metric]:
        up = _gauge("autodeploy_controller_up", "1 when the controller answered this scrape.", [])
        try:
            data = self.status()
        except Exception as exc:  # noqa: BLE001 - a scrape still shows the workers' counters; logged
            log.warning("/metrics: controller status unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        d_lab, i_lab = ["deployment"], ["deployment", "instance"]
        fams = {
            "replicas": _gauge("autodeploy_replicas", "Instances by state.", ["deployment", "state"]),
            "desired": _gauge("autodeploy_autoscale_desired_replicas", "The autoscaler's last wanted size.", d_lab),
            "d_rate": _gauge("autodeploy_deployment_requests_per_second", "Request rate over the sliding window.",
                             d_lab),
            "d_err": _gauge("autodeploy_deployment_error_ratio", "Failed / all requests over the sliding window.",
                            d_lab),
            "d_lat": _gauge("autodeploy_deployment_latency_seconds", "Latency quantiles over the sliding window.",
                            ["deployment", "quantile"]),
            "d_inflight": _gauge("autodeploy_deployment_in_flight", "Requests in flight, all workers.", d_lab),
            "i_rate": _gauge("autodeploy_instance_requests_per_second", "Request rate over the sliding window.",
                             i_lab),
            "i_err": _gauge("autodeploy_instance_error_ratio", "Failed / all requests over the sliding window.",
                            i_lab),
            "i_lat": _gauge("autodeploy_instance_latency_seconds", "Latency quantiles over the sliding window.",
                            ["deployment", "instance", "quantile"]),
            "i_inflight": _gauge("autodeploy_instance_in_flight", "Requests in flight, all workers.", i_lab),
            "cpu": _gauge("autodeploy_instance_cpu_percent", "CPU use in percent of the instance's limit.", i_lab),
            "mem": _gauge("autodeploy_instance_memory_percent", "Memory use in percent of the instance's limit.",
                          i_lab),
            "mem_b": _gauge("autodeploy_instance_memory_bytes", "Memory in use.", i_lab),
            "gpu": _gauge("autodeploy_instance_gpu_percent", "GPU utilization (NVML) of the instance's GPUs.",
                          i_lab),
            "healthy": _gauge("autodeploy_instance_healthy", "0 while active health checks fail.", i_lab),
        }
        for dep in data.get("deployments", []):
            name = dep["name"]
            states: dict[str, int] = {}
            for inst in dep.get("instances", []):
                states[inst["state"]] = states.get(inst["state"], 0) + 1
            for state in ("starting", "ready", "draining", "stopping"):
                fams["replicas"].add_metric([name, state], states.get(state, 0))
            auto = dep.get("autoscaling") or {}
            if auto.get("desired") is not None:
                fams["desired"].add_metric([name], auto["desired"])
            m = dep.get("metrics") or {}
            _window(fams, "d", [name], m)
            for inst in dep.get("instances", []):
                labels = [name, inst["id"]]
                im = inst.get("metrics") or {}
                _window(fams, "i", labels, im)
                for key, fam in (("cpu_pct", "cpu"), ("mem_pct", "mem"), ("mem_bytes", "mem_b"), ("gpu_pct", "gpu")):
                    if im.get(key) is not None:
                        fams[fam].add_metric(labels, im[key])
                if "healthy" in inst:
                    fams["healthy"].add_metric(labels, 1 if inst["healthy"] else 0)
        yield from fams.values()
        if self.coldstarts is not None:
            yield from self._coldstarts()

    def _coldstarts(self) -> Iterator[Metric]:
        """autodeploy_cold_start_phase_seconds{deployment, phase}: queue, placement, create, port,
        health, first_byte and total of every instance start (controller/coldstart.py)."""
        try:
            data = self.coldstarts() if self.coldstarts is not None else {}
        except Exception as exc:  # noqa: BLE001 - the rest of the scrape stands; logged
            log.warning("/metrics: cold-start histograms unavailable: %s", exc)
            return
        fam = HistogramMetricFamily("autodeploy_cold_start_phase_seconds",
                                    "Time of each phase of an instance start (total: request to first byte).",
                                    labels=["deployment", "phase"])
        bounds = [f"{b:g}" for b in data.get("buckets", [])] + ["+Inf"]
        for series in data.get("series", []):
            fam.add_metric([series["deployment"], series["phase"]], list(zip(bounds, series["cumulative"])),
                           series["sum"])
        yield fam


def _window(fams: dict[str, GaugeMetricFamily], prefix: str, labels: list[str], m: dict) -> None:
    if not m:
        return
    fams[prefix + "_rate"].add_metric(labels, m.get("requests_per_s", 0.0))
    fams[prefix + "_err"].add_metric(labels, m.get("error_rate", 0.0))
    fams[prefix + "_inflight"].add_metric(labels, m.get("in_flight", 0))
    for q, key in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
        v = (m.get("latency_ms") or {}).get(key)
        if v is not None:
            fams[prefix + "_lat"].add_metric([*labels, q], v / 1000.0)
