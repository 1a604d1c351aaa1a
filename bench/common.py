"""Helpers shared by the benchmarks: start a real `autodeploy serve`, measure latencies."""
from __future__ import annotations

import http.client
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from controller.drivers.local import free_port

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "deployments" / "models" / "echo_model.py"
PY = sys.executable


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


class Serve:
    """`autodeploy serve` on a free port with the given deployment YAML texts."""

    def __init__(self, files: dict[str, str], *extra: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="autodeploy-bench-"))
        (self.tmp / "deployments").mkdir()
        for name, text in files.items():
            (self.tmp / "deployments" / name).write_text(text)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.tmp / "serve.log", "wb")
        self.proc = subprocess.Popen(
            [str(Path(PY).parent / "autodeploy"), "serve", "--deployments", str(self.tmp / "deployments"),
             "--state-dir", str(self.tmp / "state"), "--port", str(self.port), "--project-dir", str(ROOT), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_http(self.url + "/healthz")

    @property
    def headers(self) -> dict[str, str]:
        """The admin token serve wrote to its state dir, for API calls."""
        return {"Authorization": "Bearer " + (self.tmp / "state" / "admin.token").read_text().strip()}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


def deployment(name: str, command: str, max_replicas: int = 1, extra: str = "") -> str:
    return (f"apiVersion: autodeploy/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n"
            f"  model: {{id: echo, version: v1}}\n  command: '{command}'\n  port: 8080\n"
            f"  scaling: {{minReplicas: 0, maxReplicas: {max_replicas}, idleTimeout: 10m}}\n{extra}")


def latencies(host: str, port: int, path: str, n: int, headers: dict | None = None) -> list[float]:
    """n sequential GETs on one keep-alive connection; seconds each."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        out.append(time.perf_counter() - t)
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}")
    conn.close()
    return out


def spawn_echo(port: int) -> subprocess.Popen:
    env = dict(os.environ, PORT=str(port))
    return subprocess.Popen([PY, str(ECHO), "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def summary(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1e3:.3f} ms  p99 {percentile(values, 99) * 1e3:.3f} ms"


__all__ = ["Serve", "deployment", "latencies", "spawn_echo", "percentile", "free_port", "wait_http",
           "statistics", "ECHO", "PY", "summary"]
