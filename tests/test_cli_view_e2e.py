"""The operator's CLI against a real serve: describe, events (-f), top, wait, status words,
percentiles, cold-start phases, --output json, --version and shell completion."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PY, ROOT, deployment_yaml

AUTODEPLOY = str(Path(PY).parent / "autodeploy")
RAW_TIMESTAMP = re.compile(r"\b1\.\d+e\+09\b|\b17\d{8}(\.\d+)?\b")


def cli(*args: str, url: str | None = None, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [AUTODEPLOY, *args] + (["--url", url] if url else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert done.returncode == 0, f"{cmd}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    if "json" not in args:  # tables print human times, JSON keeps epoch seconds for scripts
        assert not RAW_TIMESTAMP.search(done.stdout), f"raw timestamp in:\n{done.stdout}"
    return done


@pytest.fixture
def served(serve):
    crash = f"{PY} -c 'import sys; print(\"boom: model weights missing\"); sys.exit(3)' ${{PORT}}"
    return serve({
        "hello.yaml": deployment_yaml("hello", min_replicas=1),
        "lazy.yaml": deployment_yaml("lazy", min_replicas=0, extra_spec="""
            alerts:
              - {metric: coldStartMs, above: 600000, for: 0s}
        """),
        "crashy.yaml": deployment_yaml("crashy", crash, min_replicas=1, extra_spec="""
            alerts:
              - {metric: restarts, above: 1, for: 0s}
        """),
    })


def test_status_shows_failing_with_the_last_error_and_percentiles(served):
    s = served
    s.wait_for(lambda: s.status("hello")["status"] == "Running", what="hello running")
    s.wait_for(lambda: s.status("crashy")["status"] == "Failing", what="crashy failing", timeout=30)
    for _ in range(20):
        assert s.get("/d/hello/whoami").status_code == 200
    s.wait_for(lambda: s.status("hello")["metrics"]["latency_ms"]["p95"] is not None, what="latency window")
    table = cli("status", url=s.url).stdout
    assert re.search(r"^crashy\s+Failing\s", table, re.M), table
    assert re.search(r"^hello\s+Running\s", table, re.M) and re.search(r"^lazy\s+Standby\s", table, re.M)
    assert re.search(r"crashy is failing: .*exited with code 3.* ... boom: model weights missing", table), table
    one = cli("status", "hello", url=s.url).stdout
    assert re.search(r"latency p50 [\d.]+ ms\s+p95 [\d.]+ ms\s+p99 [\d.]+ ms", one), one
    assert re.search(r"\d+(\.\d+)?m?s ago|just now", one), one  # "962ms ago" on a fast machine
    crashy = cli("status", "crashy", url=s.url).stdout
    assert "Failing: instance" in crashy and "boom: model weights missing" in crashy
    names = cli("status", "--output", "name", url=s.url).stdout.split()
    assert names == ["crashy", "hello", "lazy"]
    assert json.loads(cli("status", "-o", "json", url=s.url).stdout)["deployments"][0]["status"] == "Failing"
    # restarts: crashes and failed starts of the last 10 minutes, counted from the event log
    s.wait_for(lambda: any(e["kind"] == "alert-firing" and e["message"].startswith("restarts > 1")
                           for e in s.status("crashy")["events"]), what="the restarts alert", timeout=60)
    assert "alert firing: restarts > 1 for 0s" in cli("status", "crashy", url=s.url).stdout


def test_wait_starts_an_instance_and_prints_its_phases_then_describe_explains_the_cold_start(served):
    s = served
    done = cli("wait", "lazy", "--timeout", "60", url=s.url)
    out = done.stdout
    assert "sending a request to start an instance" in out
    for phase in ("queue", "placement", "create", "port", "health"):
        assert re.search(rf"^\s+\w+\s+{phase}\s+[\d.]+ ms$", out, re.M), out
    assert re.search(r"lazy is ready: instance \w+, start took [\d.]+ ms", out), out
    s.wait_for(lambda: (s.status("lazy").get("cold_starts") or [{}])[0].get("outcome") == "served",
               what="the first byte of the waking request")
    text = cli("describe", "lazy", url=s.url).stdout
    for head in ("Name:", "Status:", "Model:", "Endpoint:", "Revision:", "Replicas:", "Traffic:", "Cost:", "Alerts:",
                 "Instances:", "Cold starts (latest first):", "Rollout:", "Drift:", "Events (latest 10):"):
        assert head in text, (head, text)
    assert re.search(r"\(cold\): total [\d.]+ ms: queue [\d.]+ ms, placement [\d.]+ ms, create [\d.]+ ms, "
                     r"port [\d.]+ ms, health [\d.]+ ms, first byte [\d.]+ ms", text), text
    assert re.search(r"coldStartMs > 600000 ms for 0s: ok(, now [\d.e+]+ ms)?$", text, re.M), text
    data = json.loads(cli("describe", "lazy", "--output", "json", url=s.url).stdout)
    assert [p["phase"] for p in data["cold_starts"][0]["phases"]] == \
        ["queue", "placement", "create", "port", "health", "first_byte"]
    assert len(data["history"]) == 60 and sum(h["requests"] for h in data["history"][-2:]) >= 1
    metrics = s.get("/metrics").text
    assert re.search(r'autodeploy_cold_start_phase_seconds_count\{deployment="lazy",phase="first_byte"\} 1\.0',
                     metrics), metrics[-3000:]
    assert 'autodeploy_cold_start_phase_seconds_bucket{deployment="lazy",le="+Inf",phase="total"} 1.0' in metrics
    again = json.loads(cli("wait", "lazy", "--output", "json", url=s.url).stdout)
    assert again["ready"] is True and again["name"] == "lazy"


def test_wait_reports_a_failing_deployment_and_a_stopped_one(served):
    s = served
    s.wait_for(lambda: s.status("crashy")["status"] == "Failing", what="crashy failing", timeout=30)
    done = cli("wait", "crashy", "--timeout", "60", "--no-wake", url=s.url, check=False)
    assert done.returncode == 1 and "crashy is failing" in done.stderr and "exited with code 3" in done.stderr
    cli("stop", "lazy", url=s.url)
    stopped = cli("wait", "lazy", url=s.url, check=False)
    assert stopped.returncode == 1 and "autodeploy start lazy" in stopped.stderr
    assert s.status("lazy")["status"] == "Stopped"


def test_events_list_follow_and_json(served):
    s = served
    s.wait_for(lambda: s.status("hello")["status"] == "Running", what="hello running")
    listed = cli("events", "hello", url=s.url).stdout
    assert re.search(r"(ago|just now)\s+ready\s+hello/\w+\s+ready in", listed), listed
    every = json.loads(cli("events", "--output", "json", "-n", "500", url=s.url).stdout)
    assert {"crashy", "hello", "lazy"} <= {e["deployment"] for e in every}
    ids = [e["id"] for e in every]
    assert ids == sorted(ids)
    follow = subprocess.Popen([AUTODEPLOY, "events", "hello", "-f", "--output", "json", "--url", s.url,
                               "--interval", "0.2"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        seen = [json.loads(follow.stdout.readline())]  # the latest events come first
        cli("scale", "hello", "2", url=s.url)

        def scaled() -> bool:
            return any(e["kind"] == "scale" for e in seen) and any(
                e["kind"] == "start" and e["message"] == "minReplicas 2" for e in seen)

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not scaled():
            seen.append(json.loads(follow.stdout.readline()))
        assert scaled(), seen
        assert [e["id"] for e in seen] == sorted({e["id"] for e in seen})  # in order, none twice
    finally:
        follow.terminate()
        follow.wait(10)


def test_top_read_commands_in_json_version_and_bash_completion(served):
    """Read-only commands against one serve: top, --output json everywhere, --version, completion."""
    s = served
    s.wait_for(lambda: s.status("hello")["status"] == "Running", what="hello running")
    for _ in range(5):
        s.get("/d/hello/whoami")
    text = cli("top", "--once", url=s.url).stdout
    assert re.search(r"^hello\s+\w{8}\s+ready\s+[\d.]+\s+\d+\s", text, re.M), text
    for col in ("REQ/S", "IN FLIGHT", "P95", "GPU%"):
        assert col in text
    rows = json.loads(cli("top", "--once", "--output", "json", url=s.url).stdout)
    assert any(r["deployment"] == "hello" and r["state"] == "ready" for r in rows)
    assert json.loads(cli("history", "hello", "--output", "json", url=s.url).stdout)["revisions"][0]["number"] == 1
    assert json.loads(cli("rollout", "status", "hello", "-o", "json", url=s.url).stdout)["rollout"] is None
    assert json.loads(cli("diff", "--output", "json", url=s.url).stdout) == []
    assert "gpus" in json.loads(cli("gpus", "--output", "json").stdout)
    assert [t["role"] for t in json.loads(cli("token", "list", "-o", "json", url=s.url).stdout)] == ["admin"]
    assert json.loads(cli("key", "list", "--output", "json", url=s.url).stdout) == []
    assert re.search(r"^admin\s+admin\s+\S.* ago\s", cli("token", "list", url=s.url).stdout, re.M)

    assert re.fullmatch(r"autodeploy \d+\.\d+\.\d+\n", cli("--version").stdout)
    script = cli("completion", "bash").stdout
    probe = (f"source <({AUTODEPLOY} completion bash)\n"
             "COMP_WORDS=(autodeploy de); COMP_CWORD=1; _autodeploy; echo \"1:${COMPREPLY[*]}\"\n"
             "COMP_WORDS=(autodeploy describe --o); COMP_CWORD=2; _autodeploy; echo \"2:${COMPREPLY[*]}\"\n"
             "COMP_WORDS=(autodeploy describe h); COMP_CWORD=2; _autodeploy; echo \"3:${COMPREPLY[*]}\"\n"
             "COMP_WORDS=(autodeploy rollout status ''); COMP_CWORD=3; _autodeploy; echo \"4:${COMPREPLY[*]}\"\n")
    env = dict(os.environ, AUTODEPLOY_URL=s.url, PATH=str(Path(PY).parent) + os.pathsep + os.environ["PATH"])
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, timeout=60).stdout
    assert "1:delete describe" in out and "2:--output" in out and "3:hello" in out, (out, script[:400])
    assert "4:crashy hello lazy" in out, out
    zsh = cli("completion", "zsh").stdout
    assert zsh.startswith("autoload -U +X bashcompinit") and "complete -o default -F _autodeploy autodeploy" in zsh


def test_human_durations():
    from controller.humantime import ago, duration
    assert duration(250) == "4m 10s" and duration(0.85) == "850ms" and duration(3725) == "1h 2m"
    assert ago(1000.0, 1250.0) == "4m 10s ago" and ago(1250.0, 1000.0) == "in 4m 10s"
