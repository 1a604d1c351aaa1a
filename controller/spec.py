"""Deployment spec as plain data. Built only by `controller.loader` from validated YAML."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class GpuSpec:
    count: int = 0
    type: str | None = None


@dataclass(frozen=True)
class Resources:
    cpu: float | None = None
    memory_gb: float | None = None
    gpu: GpuSpec = field(default_factory=GpuSpec)
    storage_gb: float | None = None
    bandwidth_mbps: float | None = None


@dataclass(frozen=True)
class Autoscaling:
    enabled: bool = False
    target_concurrency: float | None = None
    target_cpu_utilization: float | None = None
    target_memory_utilization: float | None = None
    target_gpu_utilization: float | None = None
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    scale_down_delay_s: float = 30.0


@dataclass(frozen=True)
class Scaling:
    min_replicas: int = 0
    max_replicas: int = 1
    idle_timeout_s: float = 300.0
    autoscaling: Autoscaling = field(default_factory=Autoscaling)


@dataclass(frozen=True)
class HealthCheck:
    path: str
    interval_s: float = 30.0
    timeout_s: float = 5.0
    failure_threshold: int = 3


@dataclass(frozen=True)
class LoadBalancer:
    algorithm: str = "round-robin"  # round-robin | least-connections | ip-hash
    sticky_sessions: bool = False
    health_check: HealthCheck | None = None


@dataclass(frozen=True)
class Rollout:
    strategy: str = "rolling"  # rolling | blue-green | canary
    max_surge: str = "25%"
    max_unavailable: str = "25%"
    canary_steps: tuple[int, ...] = (10, 50, 100)
    step_pause_s: float = 30.0
    keep_old_s: float = 300.0
    # Canary analysis (spec.rollout.analysis); the error rate increase is a fraction here.
    min_requests: int = 20
    max_error_rate_increase: float = 0.05
    max_p99_ratio: float = 1.5
    p99_tolerance_ms: float = 50.0


@dataclass(frozen=True)
class AlertRule:
    """spec.alerts[i]: fires when `metric` stays above `above` for `for_s` seconds."""
    metric: str  # errorRate (%) | p95LatencyMs | restarts (per 10 min) | coldStartMs
    above: float
    for_s: float = 60.0
    webhook: str | None = None
    line: int = 0  # where the rule is written, for events and the dashboard

    @property
    def label(self) -> str:
        return f"{self.metric} > {self.above:g}"


@dataclass(frozen=True)
class Deployment:
    name: str
    model_id: str
    model_version: str
    command: str
    port: int
    description: str = ""
    environment: str = "development"
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # env name -> Pulumi config key; kept apart from `env` so secret values never
    # land in the spec, the store or a revision hash.
    secret_env: dict[str, str] = field(default_factory=dict)
    # env name -> line of its `{secret: KEY}` in the file, for FILE:LINE errors.
    secret_lines: dict[str, int] = field(default_factory=dict, compare=False, hash=False)
    access: str = "public"  # public | private: the endpoint needs a key (controller.auth)
    labels: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    scaling: Scaling = field(default_factory=Scaling)
    load_balancer: LoadBalancer = field(default_factory=LoadBalancer)
    rollout: Rollout = field(default_factory=Rollout)
    state: str = "running"  # running | stopped
    alerts: tuple[AlertRule, ...] = ()
    start_timeout_s: float = 300.0
    request_timeout_s: float = 300.0  # spec.requestTimeout: time to the response headers
    # spec.placement.nodeSelector: labels the instance's node must carry (several nodes).
    node_selector: dict[str, str] = field(default_factory=dict)
    # Streaming (gateway/tunnel.py, the gRPC health probe in controller/health.py).
    protocol: str = "http"  # http | h2c | grpc
    tunnel_timeout_s: float = 3600.0
    tunnel_idle_timeout_s: float = 300.0
    # Where it came from, for errors and revisions.
    source_file: str = ""
    source_line: int = 0
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @cached_property
    def revision(self) -> str:
        """Content hash of the document: equal specs give equal revisions."""
        blob = json.dumps(self.raw, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @cached_property
    def template_hash(self) -> str:
        """Hash of what an instance is made from: a change means new instances."""
        parts = {
            "image": self.image, "command": self.command, "port": self.port, "env": self.env,
            "secret_env": self.secret_env,
            "model": [self.model_id, self.model_version],
            "resources": [self.resources.cpu, self.resources.memory_gb, self.resources.gpu.count,
                          self.resources.gpu.type, self.resources.storage_gb],
        }
        if self.node_selector:  # absent when empty, so templates without it keep their hash
            parts["node_selector"] = self.node_selector
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
