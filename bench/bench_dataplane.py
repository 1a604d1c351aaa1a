#!/usr/bin/env python3
"""The data planes side by side, in one run, in front of the same backend.

Columns: direct to the backend; HAProxy alone as a plain reverse proxy; nginx as a plain
reverse proxy; the project in haproxy mode; the project in python mode. The backend is
nginx answering a 100-byte body (fast, so the proxies are what is measured), started by
the bench for the references and by the controller as a deployment's instance for the
project columns (same program, same config).

  1. warm throughput at 32 connections (wrk, keep-alive)
  2. added p50 at 1 connection over direct (sequential keep-alive GETs)
  3. cold start: bare spawn of an instance until it answers vs the first request at zero
  4. a burst of 50 concurrent requests at zero: instances started
  5. 1,000 server-sent-event streams held 10 s while a normal request answers
  6. 500 slowloris sockets while normal requests answer
  7. a hung instance: status and time to the answer with spec.requestTimeout 2s

Needs haproxy, nginx and wrk (apt-get install haproxy nginx wrk).
Run: .venv/bin/python bench/bench_dataplane.py [--seconds 5] [--streams 1000] [--slowloris 500]
"""
from __future__ import annotations

import argparse
import http.client
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import psutil
import requests

from common import ECHO, PY, Serve, deployment, free_port, latencies, percentile, wait_http

BODY = "x" * 100
PLANES = ("haproxy", "python")
NGINX_BACKEND = """worker_processes 1;
daemon off;
pid {dir}/nginx-@PORT@.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:@PORT@;
    location / {{ default_type text/plain; return 200 "{body}"; }}
  }}
}}
"""
NGINX_PROXY = """worker_processes 1;
daemon off;
pid {dir}/nginx-proxy.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""
HAPROXY_PLAIN = """global
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-no-delay
frontend f
    bind 127.0.0.1:{port}
    default_backend b
backend b
    server s 127.0.0.1:{backend}
"""


def wrk(url: str, seconds: float, conns: int = 32, proxy: list[psutil.Process] | None = None) -> tuple[float, float]:
    """Requests/s, and the CPU seconds per request the `proxy` processes spent (NaN without)."""
    before = cpu_seconds(proxy)
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds:g}s", url], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    used = cpu_seconds(proxy) - before
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not m or not n or errors:
        raise RuntimeError(f"wrk {url}: {out}")
    return float(m.group(1)), (used / int(n.group(1)) if proxy else math.nan)


def cpu_seconds(procs: list[psutil.Process] | None) -> float:
    total = 0.0
    for p in procs or []:
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def haproxy_processes(master_pid: int) -> list[psutil.Process]:
    """A master-worker HAProxy: the master and its workers (the CPU a request costs it)."""
    master = psutil.Process(master_pid)
    return [master, *master.children(recursive=True)]


def backend_command(workdir: Path) -> str:
    template = workdir / "backend.conf.in"
    template.write_text(NGINX_BACKEND.format(dir=workdir, body=BODY))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return f"sed s/@PORT@/${{PORT}}/g {template} > {workdir}/backend-${{PORT}}.conf && " \
           f"exec {nginx} -p {workdir} -c {workdir}/backend-${{PORT}}.conf"


def spawn(command: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(["/bin/sh", "-c", command.replace("${PORT}", str(port))], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    proc.wait()


def bare_cold_start(command: str) -> float:
    port = free_port()
    t = time.perf_counter()
    proc = spawn(command, port)
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.001)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/health")
    conn.getresponse().read()
    elapsed = time.perf_counter() - t
    kill(proc)
    return elapsed


def normal_latencies(url: str, n: int = 20) -> tuple[float, float, int]:
    """p50 and max seconds of n sequential fresh requests, and how many were not 200."""
    out, bad = [], 0
    for _ in range(n):
        t = time.perf_counter()
        try:
            bad += requests.get(url, timeout=30).status_code != 200
        except requests.RequestException:
            bad += 1
        out.append(time.perf_counter() - t)
    return percentile(out, 50), max(out), bad


def hold(port: int, payloads: list[bytes], stack: ExitStack) -> list[socket.socket]:
    socks = []
    for p in payloads:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        stack.callback(s.close)
        s.sendall(p)
        socks.append(s)
    return socks


def cold_and_burst(serve: Serve, args: argparse.Namespace) -> dict:
    """First requests at zero of deployments cold0..coldN, then a burst of 50 at zero."""
    r: dict = {}
    cold = []
    for i in range(args.cold_starts):
        t = time.perf_counter()
        resp = requests.get(f"{serve.url}/d/cold{i}/health", timeout=60)
        cold.append(time.perf_counter() - t)
        assert resp.status_code == 200, resp.text
    r["cold"] = percentile(cold, 50)
    with ThreadPoolExecutor(50) as pool:
        burst = list(pool.map(lambda _: requests.get(serve.url + "/d/burst/whoami", timeout=60), range(50)))
    r["burst_ok"] = sum(x.status_code == 200 for x in burst)
    r["burst_started"] = len(requests.get(serve.url + "/api/deployments/burst", headers=serve.headers,
                                          timeout=10).json()["instances"])
    return r


def held(serve: Serve, args: argparse.Namespace) -> dict:
    """Streams, slow clients and a hung instance, each while normal requests are timed."""
    r: dict = {}
    port = serve.port
    assert requests.get(serve.url + "/d/sse/health", timeout=60).status_code == 200
    assert requests.get(serve.url + "/d/other/health", timeout=60).status_code == 200
    time.sleep(1.0)
    n_events = 20
    last = [f'"i": {n_events - 1}'.encode(), b'"i":%d' % (n_events - 1)]
    with ExitStack() as stack:
        socks = hold(port, [f"GET /d/sse/stream?n={n_events}&ms=500 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                            for _ in range(args.streams)], stack)
        time.sleep(2.0)
        r["sse_normal"] = normal_latencies(serve.url + "/d/other/health")
        deadline = time.monotonic() + 30
        complete = 0
        for sock in socks:  # every stream should end with its last event
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            try:
                while not any(x in data for x in last):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            complete += any(x in data for x in last)
        r["sse_complete"] = complete
    with ExitStack() as stack:
        hold(port, [b"GET /d/other/health HTTP/1.1\r\nHost: x\r\nX-Slow: " for _ in range(args.slowloris)], stack)
        time.sleep(1.0)
        r["slowloris_normal"] = normal_latencies(serve.url + "/d/other/health")
    assert requests.get(serve.url + "/d/hung/health", timeout=60).status_code == 200
    time.sleep(1.0)
    t = time.perf_counter()
    resp = requests.get(serve.url + "/d/hung/slow?ms=20000", timeout=60)
    r["hung"] = (resp.status_code, resp.json().get("code") if resp.headers.get("Content-Type", "").startswith(
        "application/json") else None, time.perf_counter() - t)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--cold-starts", type=int, default=5)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--slowloris", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for tool in ("wrk", "nginx", "haproxy"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            raise SystemExit(f"{tool} is needed: apt-get install haproxy nginx wrk")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    work = Path(tempfile.mkdtemp(prefix="autodeploy-bench-dp-"))
    (work / "tmp").mkdir()
    backend = backend_command(work)
    echo = f"{PY} {ECHO} --port ${{PORT}}"
    files = {"static.yaml": deployment("static", backend),
             "burst.yaml": deployment("burst", f"{echo} --load-seconds 0.5", max_replicas=5),
             "sse.yaml": deployment("sse", echo), "other.yaml": deployment("other", echo),
             "hung.yaml": deployment("hung", echo, extra="  requestTimeout: 2s\n")}
    for i in range(args.cold_starts):
        files[f"cold{i}.yaml"] = deployment(f"cold{i}", backend)

    results: dict[str, dict] = {}
    procs: list[subprocess.Popen] = []
    serves: dict[str, Serve] = {}
    try:
        # Cold starts first: the warm runs below leave tens of thousands of sockets in
        # TIME_WAIT, which slows every later readiness check that reads /proc/net/tcp.
        bare = [bare_cold_start(backend) for _ in range(args.cold_starts)]
        for plane in PLANES:
            serves[plane] = Serve(files, "--data-plane", plane, "--graceful-timeout", "3")
            results[f"project {plane}"] = {**cold_and_burst(serves[plane], args), "bare": percentile(bare, 50)}
        bport = free_port()
        procs.append(spawn(backend, bport))
        wait_http(f"http://127.0.0.1:{bport}/")
        hport, nport = free_port(), free_port()
        (work / "haproxy.cfg").write_text(HAPROXY_PLAIN.format(port=hport, backend=bport))
        procs.append(subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-f", str(work / "haproxy.cfg")],
                                      start_new_session=True))
        (work / "proxy.conf").write_text(NGINX_PROXY.format(dir=work, port=nport, backend=bport))
        procs.append(subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(work), "-c",
                                       str(work / "proxy.conf")], start_new_session=True))
        targets = {"direct": f"http://127.0.0.1:{bport}/", "HAProxy alone": f"http://127.0.0.1:{hport}/",
                   "nginx proxy": f"http://127.0.0.1:{nport}/"}
        for plane in PLANES:
            url = serves[plane].url + "/d/static/"
            assert requests.get(url, timeout=60).status_code == 200  # cold start the backend instance
            targets[f"project {plane}"] = url
        time.sleep(1.0)  # HAProxy has its server: warm traffic no longer passes the activator
        proxies = {"HAProxy alone": haproxy_processes(procs[1].pid)}
        if "haproxy" in serves:
            pid_file = serves["haproxy"].tmp / "state" / "haproxy" / "haproxy.pid"
            proxies["project haproxy"] = haproxy_processes(int(pid_file.read_text().split()[0]))
        for name, url in targets.items():
            wait_http(url)
            results.setdefault(name, {}).update(lat=[], tput=[], cpu=[])
        # Interleaved rounds, medians reported: this shared machine's load drifts by 2x
        # within a minute, and every column should see the same drift.
        for _ in range(args.rounds):
            for name, url in targets.items():
                host, port = url.split("/")[2].split(":")
                latencies(host, int(port), "/" + url.split("/", 3)[3], 200)
                results[name]["lat"] += latencies(host, int(port), "/" + url.split("/", 3)[3], args.requests)
                rps, cpu = wrk(url, args.seconds, proxy=proxies.get(name))
                results[name]["tput"].append(rps)
                results[name]["cpu"].append(cpu)
        for name in targets:
            results[name]["tput"] = percentile(results[name]["tput"], 50)
            results[name]["cpu"] = percentile(results[name]["cpu"], 50)
        for plane in PLANES:
            results[f"project {plane}"].update(held(serves[plane], args))
    finally:
        for p in procs:
            kill(p)
        for serve in serves.values():
            serve.close()

    cols = ["direct", "HAProxy alone", "nginx proxy"] + [f"project {p}" for p in PLANES]
    direct_p50 = percentile(results["direct"]["lat"], 50)

    def row(label: str, cells: list[str]) -> None:
        print(f"{label:34}" + "".join(f"{c:>18}" for c in cells))

    print(f"host: {os.cpu_count()} cores, shared by wrk, the proxies and the backend; backend: nginx, "
          f"{len(BODY)}-byte body")
    row("", cols)
    row("32 connections, requests/s", [f"{results[c]['tput']:.0f}" for c in cols])
    row("  vs HAProxy alone", [f"{results[c]['tput'] / results['HAProxy alone']['tput']:.2f}x" for c in cols])
    # CPU per request of HAProxy itself: what the project's rules cost, whatever else the
    # shared cores are doing (the throughput ratio moves with the host's noise).
    row("HAProxy CPU per request", [f"{results[c]['cpu'] * 1e6:.1f} us" if not math.isnan(results[c]['cpu'])
                                    else "" for c in cols])
    alone_cpu = results["HAProxy alone"]["cpu"]
    row("  vs HAProxy alone, by CPU", [f"{alone_cpu / results[c]['cpu']:.2f}x" if not math.isnan(results[c]['cpu'])
                                   else "" for c in cols])
    row("1 connection, p50", [f"{percentile(results[c]['lat'], 50) * 1e3:.3f} ms" for c in cols])
    row("  added over direct", [f"{(percentile(results[c]['lat'], 50) - direct_p50) * 1e3:+.3f} ms" for c in cols])
    row("1 connection, p99", [f"{percentile(results[c]['lat'], 99) * 1e3:.3f} ms" for c in cols])
    print()
    proj = [c for c in cols if c.startswith("project")]
    row("", ["bare spawn"] + proj)
    row(f"cold start, median of {args.cold_starts}", [f"{results[proj[0]]['bare'] * 1e3:.1f} ms"] +
        [f"{results[c]['cold'] * 1e3:.1f} ms" for c in proj])
    row("  overhead over bare spawn", [""] + [f"{(results[c]['cold'] - results[c]['bare']) * 1e3:+.1f} ms"
                                                for c in proj])
    row("burst of 50 at zero", [""] + [f"{results[c]['burst_ok']}/50, {results[c]['burst_started']} inst"
                                       for c in proj])
    row(f"{args.streams} SSE streams held 10 s", [""] + [f"{results[c]['sse_complete']} complete" for c in proj])
    row("  normal request p50 / max", [""] + [
        f"{results[c]['sse_normal'][0] * 1e3:.0f}/{results[c]['sse_normal'][1] * 1e3:.0f} ms"
        + (f" {results[c]['sse_normal'][2]} bad" if results[c]['sse_normal'][2] else "") for c in proj])
    row(f"{args.slowloris} slowloris sockets", [""] * (1 + len(proj)))
    row("  normal request p50 / max", [""] + [
        f"{results[c]['slowloris_normal'][0] * 1e3:.0f}/{results[c]['slowloris_normal'][1] * 1e3:.0f} ms"
        + (f" {results[c]['slowloris_normal'][2]} bad" if results[c]['slowloris_normal'][2] else "") for c in proj])
    row("hung instance, requestTimeout 2s", [""] + [
        f"{results[c]['hung'][0]} ({results[c]['hung'][1]}) {results[c]['hung'][2]:.1f} s" for c in proj])


if __name__ == "__main__":
    main()
