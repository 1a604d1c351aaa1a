#!/usr/bin/env python3
"""Change to serving: how long from saving a file (folder mode) or `git push` (git mode)
until the new deployment is in the status API, side by side in one run:

  1. folder mode, file written (the folder watcher, the reference)
  2. git mode, polling only (--git-interval 5s)
  3. git mode, the README's post-receive hook calling POST /api/git/sync

Run: .venv/bin/python bench/bench_git.py [--rounds 5] [--interval 5s]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from common import PY, ROOT, deployment, free_port, wait_http

sys.path.insert(0, str(ROOT))
from tests.gitrepo import Remote  # noqa: E402 - the tests' real bare repository helper

ECHO_CMD = f"{PY} {ROOT}/deployments/models/echo_model.py --port ${{PORT}}"


HEADERS: dict[str, str] = {}


def serve(tmp: Path, *source: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(tmp / f"serve-{port}.log", "wb")
    proc = subprocess.Popen([str(Path(PY).parent / "autodeploy"), "serve", *source, "--state-dir",
                             str(tmp / f"state-{port}"), "--port", str(port), "--project-dir", str(ROOT)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz")
    # The admin token serve wrote on its first start: for the status API, and for the push hook.
    token = (tmp / f"state-{port}" / "admin.token").read_text().strip()
    HEADERS["Authorization"] = f"Bearer {token}"
    os.environ["AUTODEPLOY_TOKEN"] = token
    return proc, url


def wait_for(url: str, name: str, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [d["name"] for d in requests.get(url + "/api/deployments", headers=HEADERS, timeout=10).json()["deployments"]]
        if name in names:
            return time.perf_counter()
        time.sleep(0.01)
    raise RuntimeError(f"{name} did not appear within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def hook(remote: Remote, url: str) -> None:
    readme = (ROOT / "README.md").read_text()
    text = readme.split("# hooks/post-receive in the bare repository serve follows\n")[1].split("```")[0]
    path = remote.bare / "hooks" / "post-receive"
    path.write_text("#!/bin/sh\n" + text.replace("http://deploy-host:8080", url))
    path.chmod(0o755)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--interval", default="5s")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="autodeploy-bench-git-"))
    results: dict[str, list[float]] = {}

    folder = tmp / "deployments"
    folder.mkdir()
    proc, url = serve(tmp, "--deployments", str(folder))
    try:
        times = []
        for i in range(args.rounds):
            t = time.perf_counter()
            (folder / f"f{i}.yaml").write_text(deployment(f"f{i}", ECHO_CMD))
            times.append(wait_for(url, f"f{i}") - t)
        results["folder, file written (watcher 0.5s)"] = times
    finally:
        stop(proc)

    for label, with_hook in ((f"git push, polling every {args.interval}", False),
                             ("git push + post-receive sync hook", True)):
        remote = Remote(tmp / ("hook" if with_hook else "poll"))
        remote.commit("start", seed_yaml=deployment("seed", ECHO_CMD))
        proc, url = serve(tmp, "--git-repo", remote.url, "--git-interval", args.interval)
        try:
            wait_for(url, "seed")
            if with_hook:
                hook(remote, url)
            times = []
            for i in range(args.rounds):
                remote.write(f"g{i}.yaml", deployment(f"g{i}", ECHO_CMD))
                t = time.perf_counter()
                remote.commit(f"add g{i}")
                times.append(wait_for(url, f"g{i}") - t)
                time.sleep(0.3)  # the next push lands at another point of the poll cycle
            results[label] = times
        finally:
            stop(proc)

    print(f"change -> in the status API, {args.rounds} rounds each  {'median':>10} {'max':>10}")
    for label, times in results.items():
        print(f"  {label:<45} {statistics.median(times) * 1e3:8.0f} ms {max(times) * 1e3:7.0f} ms")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
