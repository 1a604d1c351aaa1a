#!/usr/bin/env python3
"""What the typed contracts (controller/contracts.py) cost, each beside a reference in one run.

  1. the per-request pick (the hot path): `Router._pick_local` over the typed snapshot vs
     the same pick over the dict snapshot it replaced (the old code, kept here as reference)
  2. the snapshot, once per version: `Snapshot.from_json` vs `json.loads` alone
  3. one IPC message: `encode` + `decode` (typed, checked) vs `json.dumps` + `json.loads`
  4. a `sync` round trip on a real Unix socket to a real `IpcServer`: `IpcClient.request`
     vs a raw JSON line written and read on the same kind of connection

Run: .venv/bin/python bench/bench_contracts.py [--n 20000]
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from controller.contracts import (Acquire, AcquireReply, Address, RouteEntry, Snapshot, Sync, SyncReply, decode,
                                  encode)
from controller.ipc import IpcClient, IpcServer
from controller.policy.balance import Candidate, least_connections
from gateway.balancer import RequestKey
from gateway.routing import Router, Target
from gateway.static import StaticControlPlane


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    best = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def snapshot_json(deployments: int, instances: int) -> dict:
    deps = {}
    for d in range(deployments):
        ready = [{"id": f"i{d:03d}{i:04d}", "host": "127.0.0.1", "port": 20000 + d * 10 + i, "revision": 1,
                  "deployment": f"d{d}", "slot": d * 64 + i} for i in range(instances)]
        deps[f"d{d}"] = {"state": "running", "algorithm": "least-connections", "sticky": False, "rr_slot": d,
                         "access": "public", "keys": {}, "revision": 1, "split": None, "request_timeout": 300.0,
                         "ready": ready, "health": {"path": "/health", "interval": 10.0, "timeout": 2.0, "fall": 3},
                         "protocol": "http", "tunnel_timeout": 3600.0, "tunnel_idle_timeout": 300.0}
    return {"version": 7, "deployments": deps}


# ---------------------------------------------------------------- the dict pick it replaced (reference)
# gateway/routing.py `_pick_local`, `_target`, `_shared_count` and gateway/balancer.py `choose`
# as they were before the typed snapshot, verbatim but for the split and sticky branches
# (not taken here); run against the same Router (its outliers, in-flight counts, Target).
def old_target(a: dict) -> Target:
    return Target(a["id"], a["host"], int(a["port"]), a["revision"], int(a.get("slot", -1)),
                  a.get("deployment", ""))


def old_shared_count(router: Router, addr: dict) -> int:
    if router.shared_inflight is None:
        return router._inflight.get(addr["id"], 0)  # noqa: SLF001 - the old code read it so
    return router.shared_inflight.count(int(addr.get("slot", -1)))


def old_choose(dep: dict, routable: list[dict], key: RequestKey, *, inflight: Callable[[dict], int],
               rand: random.Random) -> dict:
    algorithm = dep.get("algorithm", "round-robin")
    if len(routable) == 1:
        return routable[0]
    if algorithm == "least-connections":
        picked = least_connections([Candidate(r["id"], inflight(r) + rand.random() * 0.5)  # type: ignore[arg-type]
                                    for r in routable], rand)
    else:
        raise AssertionError("least-connections only in this bench")
    return next(r for r in routable if r["id"] == picked)


def old_pick(router: Router, dep: dict, rule: str | None, key: RequestKey, avoid: frozenset[str] = frozenset()
             ) -> Target | None:
    ready = [r for r in dep["ready"] if r["id"] not in avoid] if avoid else dep["ready"]
    if rule is not None or not ready:
        return None
    out = router.outliers.ejected()
    routable = [r for r in ready if r["id"] not in out] if out else ready
    routable = routable or ready
    if dep.get("split"):
        raise AssertionError("no split in this bench")
    chosen = old_choose(dep, routable, key, inflight=lambda a: old_shared_count(router, a),
                        rand=router._rand)  # noqa: SLF001
    return old_target(chosen)


class _Controller:
    """Answers `sync` like the controller does when nothing changed (a bench stand-in)."""

    def sync(self, worker: int, version: int, inflight: dict, activity: dict, wait: float,
             metrics: dict | None) -> SyncReply:
        return SyncReply(version)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    n = args.n
    raw = snapshot_json(20, 4)
    tmp = Path(tempfile.mkdtemp(prefix="bench-contracts-"))

    # 1. the pick
    routes = {"version": 1, "deployments": {"d0": {"algorithm": "least-connections",
                                                   "instances": [{"id": f"i{i}", "address": f"127.0.0.1:{2000 + i}"}
                                                                 for i in range(4)]}}}
    router = Router(StaticControlPlane(routes), counters=__import__("gateway.counters").counters.SharedCounters(
        str(tmp / "counters")), acquire_timeout=5)
    router.wait_synced(5)
    entry = router.deployment("d0")
    old_dep = json.loads(json.dumps(raw["deployments"]["d0"]))
    old_dep["ready"] = [{"id": a.id, "host": a.host, "port": a.port, "revision": a.revision, "slot": a.slot,
                         "deployment": a.deployment} for a in entry.ready]
    key = RequestKey()
    old_us = per_call_us(lambda: old_pick(router, old_dep, None, key), n)
    new_us = per_call_us(lambda: router._pick_local(entry, None, key), n)  # noqa: SLF001 - the hot path itself
    router.close()

    # 2. the snapshot, once per version
    text = json.dumps(raw)
    loads_us = per_call_us(lambda: json.loads(text), max(1, n // 20))
    typed_us = per_call_us(lambda: Snapshot.from_json(json.loads(text)), max(1, n // 20))

    # 3. one message
    sync = Sync(worker=4242, version=7, inflight={"i0000000": 2, "i0000001": 1},
                activity={"i0000000": [time.time(), 3, 0]}, wait=0.25, metrics={})
    sync_dict = {"op": "sync", "worker": 4242, "version": 7, "inflight": dict(sync.inflight),
                 "activity": dict(sync.activity), "wait": 0.25, "metrics": {}}
    acq_reply = AcquireReply(Address("i0000000", "127.0.0.1", 20000, 1, "d0", 0))
    acq_dict = {"instance": {"id": "i0000000", "host": "127.0.0.1", "port": 20000, "revision": 1,
                             "deployment": "d0", "slot": 0}}
    msg_ref = [per_call_us(lambda: json.loads(json.dumps(sync_dict)), n),
               per_call_us(lambda: json.loads(json.dumps(acq_dict)), n)]
    msg_typed = [per_call_us(lambda: decode(encode(sync)), n),
                 per_call_us(lambda: decode(encode(acq_reply), AcquireReply), n)]

    # 4. a sync round trip on a real socket
    path = str(tmp / "ipc.sock")
    server = IpcServer(path, _Controller())
    server.start()
    client = IpcClient(path)
    ping = Sync(worker=1, version=7)
    raw_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw_sock.connect(path)
    rfile = raw_sock.makefile("rb")
    line = (json.dumps({"op": "sync", "worker": 1, "version": 7, "inflight": {}, "activity": {}, "wait": 0.0})
            + "\n").encode()

    def raw_call() -> dict:
        raw_sock.sendall(line)
        return json.loads(rfile.readline())
    rt_raw = per_call_us(raw_call, max(1, n // 10))
    rt_typed = per_call_us(lambda: client.request(ping), max(1, n // 10))
    client.close()
    raw_sock.close()
    server.close()
    assert Acquire  # the acquire request travels the same codec as sync

    print(f"{'':44}{'reference':>12}{'typed':>12}{'ratio':>9}")
    print(f"{'per-request pick (4 ready, least-conn), us':44}{old_us:>12.2f}{new_us:>12.2f}{new_us / old_us:>8.2f}x")
    print(f"{'snapshot 20 deps x 4 ready, per version, us':44}{loads_us:>12.1f}{typed_us:>12.1f}"
          f"{typed_us / loads_us:>8.2f}x")
    print(f"{'sync request encode+decode, us':44}{msg_ref[0]:>12.2f}{msg_typed[0]:>12.2f}"
          f"{msg_typed[0] / msg_ref[0]:>8.2f}x")
    print(f"{'acquire reply encode+decode, us':44}{msg_ref[1]:>12.2f}{msg_typed[1]:>12.2f}"
          f"{msg_typed[1] / msg_ref[1]:>8.2f}x")
    print(f"{'sync round trip, Unix socket, us':44}{rt_raw:>12.1f}{rt_typed:>12.1f}{rt_typed / rt_raw:>8.2f}x")


if __name__ == "__main__":
    main()
