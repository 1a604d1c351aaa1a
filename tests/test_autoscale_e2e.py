"""Autoscaling end to end: a real `autodeploy serve`, real echo-model processes, real
concurrent HTTP load. Sizes are read from the status API; no timing is asserted."""
from __future__ import annotations

import threading
from collections.abc import Callable

import requests

from conftest import deployment_yaml

AUTOSCALING = ("    autoscaling: {enabled: true, targetConcurrency: 2, stableWindow: 6s, panicWindow: 2s,"
               " scaleDownDelay: 2s}\n")


def autoscaled(name: str, max_replicas: int = 3, idle: str = "3s") -> str:
    text = deployment_yaml(name, max_replicas=max_replicas, idle=idle)
    marker = f"    idleTimeout: {idle}\n"
    assert marker in text
    return text.replace(marker, marker + AUTOSCALING)


class Load:
    """`clients` threads sending GET `path` back to back until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.statuses = url, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                self.statuses.append(session.get(self.url, timeout=60).status_code)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


class SizeWatch:
    """Polls the status API in the background; remembers every instance count it saw."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.read, self.seen = read, [0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.seen.append(self.read())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_concurrent_load_grows_to_max_replicas_with_reasons(serve, data_plane):
    """Real concurrent requests reach the autoscaler through the data plane. The way back
    down (scale-down delay, scale to zero) is a decision: tests/test_controller.py."""
    s = serve({"auto.yaml": autoscaled("auto")})
    watch = SizeWatch(lambda: len(s.instances("auto")))
    try:
        # 8 clients of 300 ms requests against targetConcurrency 2 want 4 instances: capped at 3.
        heavy = Load(s.url + "/d/auto/slow?ms=300", clients=8)
        try:
            s.wait_for(lambda: sum(i["state"] == "ready" for i in s.instances("auto")) == 3, timeout=30,
                       what="3 ready instances under load")
        finally:
            heavy.stop()
    finally:
        watch.stop()
    assert set(heavy.statuses) == {200}
    assert max(watch.seen) == 3  # grew to maxReplicas and never above it

    events = s.status("auto")["events"]
    story = "\n".join(f"{e['kind']} {e['instance']}: {e['message']}" for e in reversed(events))
    decisions = [e["message"] for e in events if e["kind"] == "autoscale"]
    ups = [m for m in decisions if _sizes(m)[0] < _sizes(m)[1]]
    assert any("concurrency" in m and "target 2" in m for m in ups), story
    starts = [e["message"] for e in events if e["kind"] == "start"]
    assert any(m.startswith("autoscale") and "concurrency" in m for m in starts), story


def _sizes(message: str) -> tuple[int, int]:
    """'1 -> 3: concurrency ...' -> (1, 3)"""
    before, after = message.split(":", 1)[0].split(" -> ")
    return int(before), int(after)
