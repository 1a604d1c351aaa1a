#!/usr/bin/env python3
"""Round-robin vs least-connections with one slow instance out of three, side by side.

One real `autodeploy serve` (2 gunicorn workers) runs two deployments of the echo
model, `rr` (round-robin) and `lc` (least-connections), three instances each. One
instance of each answers every request `--delay-ms` late (the echo model's
/admin/delay), like a replica on a throttled GPU or with a cold cache. `--clients`
keep-alive clients per deployment then send requests back to back for `--seconds`,
both deployments at once, so both algorithms see the same machine at the same time.

Round-robin keeps sending the slow instance its third whatever it is doing;
least-connections (power of two choices over the in-flight counts that all gateway
workers share) sends it a request only when it is less busy than another.

Run: .venv/bin/python bench/bench_balance.py [--clients 8] [--seconds 10] [--delay-ms 200]
"""
from __future__ import annotations

import argparse
import http.client
import statistics
import threading
import time

import requests

from common import ECHO, PY, Serve, deployment, percentile

RULE, TARGET = "Deploy-Route-Rule", "Deploy-Route-Target"


def setup(serve: Serve, name: str, delay_ms: float) -> str:
    ids = [requests.get(f"{serve.url}/d/{name}/whoami", headers={RULE: "scale-out"}, timeout=30).headers[TARGET]
           for _ in range(3)]
    slow = ids[0]
    requests.get(f"{serve.url}/d/{name}/admin/delay?ms={delay_ms:g}", headers={RULE: slow}, timeout=30)
    return slow


def client(port: int, name: str, until: float, out: list[tuple[float, str]], lock: threading.Lock) -> None:
    """Back-to-back GETs on one keep-alive connection until `until`; (seconds, instance) each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    mine: list[tuple[float, str]] = []
    while time.perf_counter() < until:
        t = time.perf_counter()
        conn.request("GET", f"/d/{name}/whoami")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/d/{name}/whoami: HTTP {resp.status}")
        mine.append((time.perf_counter() - t, resp.getheader(TARGET) or ""))
    conn.close()
    with lock:
        out.extend(mine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8, help="per deployment")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--delay-ms", type=float, default=200.0)
    args = ap.parse_args()

    command = f"{PY} {ECHO} --port ${{PORT}}"
    files = {f"{name}.yaml": deployment(name, command, max_replicas=3,
                                        extra=f"  loadBalancer: {{algorithm: {algo}}}\n")
             for name, algo in (("rr", "round-robin"), ("lc", "least-connections"))}
    serve = Serve(files, "--workers", "2", "--data-plane", "python")  # the Python gateway's balancing
    try:
        slow = {name: setup(serve, name, args.delay_ms) for name in ("rr", "lc")}
        results: dict[str, list[tuple[float, str]]] = {"rr": [], "lc": []}
        lock = threading.Lock()
        until = time.perf_counter() + args.seconds
        threads = [threading.Thread(target=client, args=(serve.port, name, until, results[name], lock))
                   for _ in range(args.clients) for name in ("rr", "lc")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        serve.close()

    print(f"{args.clients} keep-alive clients per deployment for {args.seconds:g} s, both at once; one instance "
          f"of three {args.delay_ms:g} ms slow; 2 gateway workers")
    head = (f"{'algorithm':<18} {'requests':>8} {'req/s':>7} {'to slow':>8} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'p99 ms':>8} {'mean ms':>8}")
    print(head)
    print("-" * len(head))
    stats = {}
    for name, label in (("rr", "round-robin"), ("lc", "least-connections")):
        lat = [x for x, _ in results[name]]
        share = sum(t == slow[name] for _, t in results[name]) / len(lat)
        row = {p: percentile(lat, p) * 1e3 for p in (50, 95, 99)}
        row["mean"] = statistics.fmean(lat) * 1e3
        stats[name] = row
        print(f"{label:<18} {len(lat):>8} {len(lat) / args.seconds:>7.0f} {share:>8.1%} {row[50]:>8.2f} {row[95]:>8.2f} {row[99]:>8.2f} "
              f"{row['mean']:>8.2f}")
    ratio = {k: stats["rr"][k] / stats["lc"][k] if stats["lc"][k] else float("inf") for k in (50, 95, 99, "mean")}
    print(f"{'rr / lc':<18} {'':>8} {'':>7} {'':>8} {ratio[50]:>7.1f}x {ratio[95]:>7.1f}x {ratio[99]:>7.1f}x "
          f"{ratio['mean']:>7.1f}x")


if __name__ == "__main__":
    main()
