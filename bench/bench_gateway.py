#!/usr/bin/env python3
"""Gateway overhead, cold start and burst, each side by side with its reference in one run.

  1. latency at 1 client (keep-alive): direct to an echo model vs through the gateway
  2. throughput at 32 clients: direct vs through the gateway
  3. cold start: bare spawn of the command until it answers vs first request through the gateway
  4. a burst of 50 concurrent requests at zero: how many instances it starts

Run: .venv/bin/python bench/bench_gateway.py [--requests 2000] [--seconds 5]
"""
from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from common import ECHO, PY, Serve, deployment, free_port, latencies, percentile, spawn_echo, wait_http


def _client(args: tuple[str, int, str, float]) -> int:
    host, port, path, seconds = args
    conn = http.client.HTTPConnection(host, port, timeout=30)
    done, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        done += resp.status == 200
    return done


def throughput(host: str, port: int, path: str, clients: int, seconds: float) -> float:
    """Requests/s from `clients` keep-alive connections spread over client processes."""
    procs = max(1, min(clients, (os.cpu_count() or 2)))
    per = [clients // procs + (i < clients % procs) for i in range(procs)]
    jobs = [(host, port, path, seconds) for n in per for _ in range(n)]
    with mp.get_context("fork").Pool(len(jobs)) as pool:
        total = sum(pool.map(_client, jobs))
    return total / seconds


def bare_cold_start() -> float:
    """Seconds from spawn to the first answered request, polling as tightly as we can."""
    port = free_port()
    t = time.perf_counter()
    proc = spawn_echo(port)
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.001)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/whoami")
    conn.getresponse().read()
    elapsed = time.perf_counter() - t
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--cold-starts", type=int, default=5)
    args = ap.parse_args()

    cmd = f"{PY} {ECHO} --port ${{PORT}}"
    # The Python gateway itself (bench_dataplane.py puts both data planes side by side).
    serve = Serve({"echo.yaml": deployment("echo", cmd, max_replicas=args.cold_starts + 1),
                   "burst.yaml": deployment("burst", cmd, max_replicas=5)}, "--data-plane", "python")
    direct_port = free_port()
    direct = spawn_echo(direct_port)
    try:
        wait_http(f"http://127.0.0.1:{direct_port}/health")
        # cold start through the gateway: the first request at zero, then scale-outs
        gw_cold = []
        for i in range(args.cold_starts):
            headers = {} if i == 0 else {"Deploy-Route-Rule": "scale-out"}
            t = time.perf_counter()
            r = requests.get(serve.url + "/d/echo/whoami", headers=headers, timeout=60)
            gw_cold.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        bare = [bare_cold_start() for _ in range(args.cold_starts)]
        first = requests.get(serve.url + "/d/echo/whoami", timeout=30).headers["Deploy-Route-Target"]
        pin = {"Deploy-Route-Rule": first}

        latencies("127.0.0.1", direct_port, "/health", 200)  # warm both paths
        latencies("127.0.0.1", serve.port, "/d/echo/health", 200, pin)
        d_lat = latencies("127.0.0.1", direct_port, "/health", args.requests)
        g_lat = latencies("127.0.0.1", serve.port, "/d/echo/health", args.requests, pin)

        d_tput = throughput("127.0.0.1", direct_port, "/health", 32, args.seconds)
        g_tput = throughput("127.0.0.1", serve.port, "/d/echo/health", 32, args.seconds)

        with ThreadPoolExecutor(50) as pool:
            burst = list(pool.map(lambda _: requests.get(serve.url + "/d/burst/whoami", timeout=60), range(50)))
        started = len(requests.get(serve.url + "/api/deployments/burst", headers=serve.headers, timeout=10).json()["instances"])
        ok = sum(r.status_code == 200 for r in burst)
    finally:
        os.killpg(direct.pid, signal.SIGTERM)
        serve.close()

    def ms(v: float) -> str:
        return f"{v * 1e3:8.3f} ms"

    print(f"host: {os.cpu_count()} cores; gateway: gunicorn gevent, 2 workers; backend: deployments/models/echo_model.py")
    print()
    print(f"{'1 client, keep-alive, GET /health':40} {'direct':>12} {'gateway':>12} {'added':>12}")
    for p in (50, 99):
        d, g = percentile(d_lat, p), percentile(g_lat, p)
        print(f"{'  p' + str(p):40} {ms(d):>12} {ms(g):>12} {ms(g - d):>12}")
    print(f"{'32 clients, requests/s':40} {d_tput:12.0f} {g_tput:12.0f} {g_tput / d_tput:11.2f}x")
    print()
    bare_med, gw_med = percentile(bare, 50), percentile(gw_cold, 50)
    print(f"{'cold start (median of ' + str(args.cold_starts) + ')':40} {'bare spawn':>12} {'gateway':>12} {'overhead':>12}")
    print(f"{'  spawn -> first response':40} {ms(bare_med):>12} {ms(gw_med):>12} {ms(gw_med - bare_med):>12}")
    print()
    print(f"burst of 50 concurrent requests at zero: {ok}/50 answered, {started} instance(s) started")


if __name__ == "__main__":
    main()
