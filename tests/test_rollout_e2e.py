"""Rollouts end to end: a real `autodeploy serve` (2 gunicorn workers), real instance
processes, constant client traffic while a new revision replaces the old one.

Every response carries `Deploy-Revision` (the numbered revision that served it), so the
tests see which revision answered. "Failed" means anything but HTTP 200, or no answer.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from conftest import PY, deployment_yaml, echo_command, process_running

REV = "Deploy-Revision"
# The canary split is a shared low-discrepancy sequence across gunicorn workers
# (gateway/split.py): any run of consecutive requests lands within a few requests of
# the weight. 5 percentage points over >= 150 requests leaves room for the requests at
# the window's edges.
SPLIT_TOLERANCE = 0.05


@dataclass
class Traffic:
    """Client threads sending GET /d/<name>/whoami back to back until stopped."""
    url: str
    threads: int = 3
    results: list[tuple[float, int, str | None]] = field(default_factory=list)  # (done at, status, revision)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> "Traffic":
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                r = session.get(self.url, timeout=30)
                row = (time.monotonic(), r.status_code, r.headers.get(REV))
            except requests.RequestException:
                row = (time.monotonic(), 0, None)
            with self._lock:
                self.results.append(row)

    def stop(self) -> "Traffic":
        self._stop.set()
        for t in self._workers:
            t.join(timeout=35)
        return self

    def snapshot(self) -> list[tuple[float, int, str | None]]:
        with self._lock:
            return list(self.results)

    def failed(self) -> list[tuple[float, int, str | None]]:
        return [r for r in self.snapshot() if r[1] != 200]

    def revisions(self) -> list[str | None]:
        return [r[2] for r in self.snapshot()]


def rollout(s, name: str) -> dict:
    return s.get(f"/api/deployments/{name}/rollout").json()["rollout"] or {}


def wait_rollout(s, name: str, phases: tuple[str, ...], to_revision: int, timeout: float = 40.0) -> dict:
    return s.wait_for(lambda: (lambda r: r if r.get("to_revision") == to_revision and r.get("phase") in phases
                               else None)(rollout(s, name)), timeout, f"rollout of {name} to {phases}")


class Log(list):
    def __repr__(self) -> str:  # assertion messages show the whole event log, one per line
        return "\n" + "\n".join(self)


def events(s, name: str) -> Log:
    return Log(f"{e['kind']}: {e['message']}" for e in s.status(name)["events"])


def spec_v(name: str, version: str, command: str, rollout_yaml: str, min_replicas: int = 2) -> str:
    return deployment_yaml(name, command, min_replicas=min_replicas, max_replicas=4,
                           extra_spec=rollout_yaml).replace("version: v1", f"version: {version}")


def old_servers_weigh_nothing(s, name: str) -> bool:
    """HAProxy's backend gives every revision-1 server weight 0 and a revision-2 one weight > 0."""
    from gateway.haproxy_plane import runtime_dir
    from gateway.haproxy_runtime import RuntimeApi
    revision = {i["id"]: i["revision_number"] for i in s.instances(name)}
    stats = [st for st in RuntimeApi(str(runtime_dir(s.state_dir) / "haproxy.sock")).show_stat()
             if st.backend == f"be_{name}"]
    return (all(st.weight == 0 for st in stats if revision.get(st.name) == 1)
            and any(st.weight > 0 for st in stats if revision.get(st.name) == 2))


def start_with_traffic(serve, name: str, rollout_yaml: str, min_replicas: int = 2):
    s = serve({f"{name}.yaml": spec_v(name, "v1", echo_command(), rollout_yaml, min_replicas)})
    s.wait_for(lambda: s.status(name)["replicas"]["ready"] == min_replicas, what="initial instances ready")
    traffic = Traffic(f"{s.url}/d/{name}/whoami").start()
    s.wait_for(lambda: len(traffic.snapshot()) >= 20, what="traffic flowing")
    return s, traffic


def test_rolling_update_replaces_every_instance_without_a_failed_request(serve, data_plane):
    s, traffic = start_with_traffic(serve, "roll", "rollout: {strategy: rolling}")
    old_ids = {i["id"] for i in s.instances("roll")}
    # The new revision takes a moment to load, so old instances must carry traffic meanwhile.
    (s.deployments / "roll.yaml").write_text(
        spec_v("roll", "v2", echo_command("--load-seconds 0.5"), "rollout: {strategy: rolling}"))
    done = wait_rollout(s, "roll", ("succeeded", "rolled_back"), 2)
    n = len(traffic.snapshot())
    s.wait_for(lambda: len(traffic.snapshot()) >= n + 20, what="traffic after the rollout")
    traffic.stop()
    assert done["phase"] == "succeeded", done
    assert traffic.failed() == []
    seen = traffic.revisions()
    assert seen[:5] == ["1"] * 5 and seen[-5:] == ["2"] * 5
    s.wait_for(lambda: all(i["revision_number"] == 2 for i in s.instances("roll")), what="old instances gone")
    new = s.instances("roll")
    assert len(new) == 2 and not {i["id"] for i in new} & old_ids
    log = events(s, "roll")
    assert any("new version: rolling rollout (" in e and "spec.model.version: v1 -> v2" in e for e in log), log
    assert any(e.startswith("rollout: revision 2 rolled out") for e in log), log
    # maxSurge 25% of 2 rounds up to 1, maxUnavailable rounds down to 0: one new at a time.
    assert any("maxSurge 1, maxUnavailable 0" in e for e in log), log


def test_blue_green_switches_all_at_once_keeps_old_set_then_stops_it(serve, data_plane):
    bg = "rollout: {strategy: blue-green, keepOldFor: 3s}"
    s, traffic = start_with_traffic(serve, "bg", bg)
    (s.deployments / "bg.yaml").write_text(spec_v("bg", "v2", echo_command("--load-seconds 0.5"), bg))
    switched = wait_rollout(s, "bg", ("switched", "succeeded", "rolled_back"), 2)
    assert switched["phase"] == "switched", switched
    assert switched["weights"] == {"old": 0.0, "new": 100.0}
    # While the old set is kept for a quick rollback it is up but gets no traffic.
    # The data plane applies the switch a moment after the controller decides it (HAProxy
    # through its Runtime API): once three answers in a row came from the new set, none
    # comes from the old one again.
    s.wait_for(lambda: [r[2] for r in traffic.snapshot()[-3:]] == ["2"] * 3, what="the data plane switched")
    if data_plane == "haproxy":  # weights go over the Runtime API one server at a time
        s.wait_for(lambda: old_servers_weigh_nothing(s, "bg"), what="HAProxy gives the old set weight 0")
    # Requests already in flight (one per client thread) may still come from the old set.
    before = len(traffic.snapshot()) + traffic.threads
    s.wait_for(lambda: len(traffic.snapshot()) >= before + 30, what="traffic after the switch")
    state = rollout(s, "bg")
    if state["phase"] == "switched":
        assert state["instances"]["old"]["ready"] == 2
        after = [r[2] for r in traffic.snapshot()[before:]]
        assert set(after) == {"2"}
    done = wait_rollout(s, "bg", ("succeeded", "rolled_back"), 2)
    traffic.stop()
    assert done["phase"] == "succeeded", done
    assert "kept" in done["reason"]
    assert traffic.failed() == []
    seen = traffic.revisions()
    first_new = seen.index("2")
    # Before the switch only the old set served: the new one started beside it unseen.
    assert set(seen[:first_new]) == {"1"}
    s.wait_for(lambda: [i["revision_number"] for i in s.instances("bg")] == [2, 2], what="old set stopped")


def test_canary_splits_traffic_by_weight_and_promotes(serve, data_plane):
    canary = ("rollout: {strategy: canary, steps: [30, 100], stepPause: 6s,\n"
              # This shared 2-core machine has latency noise far above the echo model's: compare
              # error rates here; p99 comparison is proven by the policy's unit tests.
              "          analysis: {minRequests: 10, p99ToleranceMs: 2000}}")
    s, traffic = start_with_traffic(serve, "can", canary)
    (s.deployments / "can.yaml").write_text(spec_v("can", "v2", echo_command(), canary))
    paused = wait_rollout(s, "can", ("paused", "succeeded", "rolled_back"), 2)
    assert paused["phase"] == "paused" and paused["step"] == 1, paused
    assert paused["weights"] == {"old": 70.0, "new": 30.0}
    start = len(traffic.snapshot())
    s.wait_for(lambda: len(traffic.snapshot()) >= start + 200, timeout=30, what="200 responses in the pause")
    window = traffic.snapshot()[start:start + 200]
    still = rollout(s, "can")
    assert still["phase"] == "paused" and still["started_at"] == paused["started_at"] and still["step"] == 1, \
        "the measurement window outlived the 6 s pause; the machine is too slow for this test"
    share = sum(1 for r in window if r[2] == "2") / len(window)
    assert abs(share - 0.30) <= SPLIT_TOLERANCE, share
    assert {r[2] for r in window} == {"1", "2"}
    done = wait_rollout(s, "can", ("succeeded", "rolled_back"), 2)
    assert done["phase"] == "succeeded", done
    # The data plane applies the promotion a moment after the controller records it (a
    # gateway worker's next sync; HAProxy's Runtime API commands): then only v2 answers.
    s.wait_for(lambda: traffic.revisions()[-3:] == ["2"] * 3, what="traffic on revision 2 only")
    traffic.stop()
    assert traffic.failed() == []
    log = events(s, "can")
    assert any("canary step 1/2 (30%): passed: error rate 0.000" in e for e in log), log
    described = subprocess.run([str(Path(PY).parent / "autodeploy"), "describe", "can", "--url", s.url],
                               capture_output=True, text=True, timeout=60,
                               env={"PATH": "/usr/bin:/bin", "AUTODEPLOY_TOKEN": s.token})
    assert re.search(r"^Rollout: canary \w+ 1 -> 2: succeeded, step 2/2, started .+ ago$", described.stdout, re.M), \
        described.stdout + described.stderr


def test_rolling_update_whose_instances_exit_rolls_back_by_itself(serve):
    s, traffic = start_with_traffic(serve, "bad", "rollout: {strategy: rolling}")
    crash = f"{PY} -c 'import sys; print(\"cannot load weights\"); sys.exit(3)'"
    (s.deployments / "bad.yaml").write_text(spec_v("bad", "v2", crash, "rollout: {strategy: rolling}"))
    done = wait_rollout(s, "bad", ("succeeded", "rolled_back"), 2)
    n = len(traffic.snapshot())
    s.wait_for(lambda: len(traffic.snapshot()) >= n + 20, what="traffic after the rollback")
    traffic.stop()
    assert done["phase"] == "rolled_back", done
    assert "new instance(s) failed" in done["reason"]
    assert traffic.failed() == []
    assert set(traffic.revisions()) == {"1"}
    dep = s.status("bad")
    assert dep["revision"]["number"] == 1
    log = events(s, "bad")
    assert any(e.startswith("failed: instance failed to start") and "exited with code 3" in e for e in log), log
    assert any(e.startswith("rollback: revision 2 rolled back to revision 1: rolling update: 1 new instance(s) "
                            "failed") for e in log), log
    # The file still says revision 2: the rollback is drift, so a reload does not retry it...
    assert dep["drift"]["changes"] == [{"field": "revision", "file": 2, "runtime": 1,
                                        "by": done["reason"]}]
    # ...and a new content of the file wins.
    (s.deployments / "bad.yaml").write_text(spec_v("bad", "v3", echo_command(), "rollout: {strategy: rolling}"))
    wait_rollout(s, "bad", ("succeeded",), 3)
    assert s.status("bad")["drift"] is None
    assert s.get("/d/bad/whoami").headers[REV] == "3"


def test_canary_failing_analysis_rolls_back_and_says_why(serve):
    canary = "rollout: {strategy: canary, steps: [50, 100], stepPause: 1s, analysis: {minRequests: 10}}"
    s, traffic = start_with_traffic(serve, "cb", canary, min_replicas=1)
    broken = echo_command("--error-status 500")
    (s.deployments / "cb.yaml").write_text(spec_v("cb", "v2", broken, canary, min_replicas=1))
    done = wait_rollout(s, "cb", ("succeeded", "rolled_back"), 2)
    assert done["phase"] == "rolled_back", done
    # The gateway ejects an instance after consecutive 5xx, so the canary may not reach
    # minRequests; its errors alone already decide the analysis.
    assert "canary step 1/2 (50%): analysis failed: " in done["reason"], done["reason"]
    assert "error rate 1.000 > old 0.000 + 0.05" in done["reason"] or \
        "errors in" in done["reason"] and "the error rate stays above old 0.000 + 0.05" in done["reason"]
    n = len(traffic.snapshot())
    s.wait_for(lambda: len(traffic.snapshot()) >= n + 30, what="traffic after the rollback")
    traffic.stop()
    after = traffic.snapshot()[n + 10:]  # requests sent after the rollback reached both workers
    assert {r[1] for r in after} == {200} and {r[2] for r in after} == {"1"}
    # Only the canary's share failed while it was analysed.
    failed = traffic.failed()
    assert failed and {r[2] for r in failed} == {"2"}
    assert any("rollback: revision 2 rolled back to revision 1: canary step 1/2" in e for e in events(s, "cb"))


def test_blue_green_rollback_during_keep_window_switches_back_to_the_kept_set(serve):
    bg = "rollout: {strategy: blue-green, keepOldFor: 5m}"
    s, traffic = start_with_traffic(serve, "qr", bg)
    old_ids = sorted(i["id"] for i in s.instances("qr"))
    (s.deployments / "qr.yaml").write_text(spec_v("qr", "v2", echo_command(), bg))
    wait_rollout(s, "qr", ("switched",), 2)
    out = subprocess.run([str(Path(PY).parent / "autodeploy"), "rollback", "qr",
                          "--url", s.url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "qr: rollout to revision 2 rolled back to revision 1"
    done = rollout(s, "qr")
    assert done["phase"] == "rolled_back" and done["reason"] == "manual rollback (by operator)"
    n = len(traffic.snapshot())
    s.wait_for(lambda: len(traffic.snapshot()) >= n + 30, what="traffic after the rollback")
    traffic.stop()
    assert traffic.failed() == []
    assert {r[2] for r in traffic.snapshot()[n + 10:]} == {"1"}
    # The kept set took the traffic back: no old instance had to start again.
    s.wait_for(lambda: sorted(i["id"] for i in s.instances("qr")) == old_ids, what="new set stopped")
    assert s.status("qr")["drift"]["changes"][0]["runtime"] == 1


def test_rollout_cut_by_a_controller_crash_resumes_on_restart_with_old_instances_serving(serve):
    import signal

    roll = "rollout: {strategy: rolling}"
    s = serve({"resume.yaml": spec_v("resume", "v1", echo_command(), roll)})
    s.wait_for(lambda: s.status("resume")["replicas"]["ready"] == 2, what="initial instances ready")
    old = {i["id"] for i in s.instances("resume")}
    (s.deployments / "resume.yaml").write_text(spec_v("resume", "v2", echo_command("--load-seconds 3"), roll))
    wait_rollout(s, "resume", ("progressing",), 2)
    # On a loaded machine the first new instance may already have replaced an old one, even
    # between this read and the kill: what must survive the crash is the old instances whose
    # processes still run once the controller is dead.
    pids = {i["id"]: i["pid"] for i in s.instances("resume") if i["revision_number"] == 1}
    s.terminate(signal.SIGKILL)  # the controller dies mid-rollout; its instances keep running
    alive = {iid for iid, pid in pids.items() if process_running(pid)}
    assert alive and alive <= old
    s2 = serve({}, state_dir=s.state_dir)
    adopted = {i["id"]: i["revision_number"] for i in s2.instances("resume")}
    # The old set kept serving: adopted as it was. One the dead controller had already begun
    # to stop may still be exiting at the kill; it must not be left running unowned.
    kept = {i for i in alive if i in adopted}
    assert kept and all(adopted[i] == 1 for i in kept), (alive, adopted)
    s2.wait_for(lambda: not any(process_running(pids[i]) for i in alive - kept),
                what="an old instance being stopped at the kill exits")
    first = s2.get("/d/resume/whoami")
    # The old set serves, and so may the new instance that was loading at the kill: it is
    # adopted as starting (not killed) and serves once ready.
    assert first.status_code == 200 and first.headers["Deploy-Revision"] in ("1", "2")
    done = wait_rollout(s2, "resume", ("succeeded", "rolled_back"), 2)
    assert done["phase"] == "succeeded", [(e["kind"], e["message"][:200]) for e in s2.status("resume")["events"]]
    assert any("resumed after a controller restart" in e for e in events(s2, "resume"))
    s2.wait_for(lambda: all(i["revision_number"] == 2 for i in s2.instances("resume")), what="old set replaced")
    assert s2.get("/d/resume/whoami").headers["Deploy-Revision"] == "2"
