"""The gateway without a controller: what the Pulumi program runs as the gateway container.

The stack fixes the instances (`autodeploy:replicas`), so this gateway routes to the
addresses the program wrote into AUTODEPLOY_ROUTES and starts nothing: a request that
would need a new instance (cold start, `scale-out`) gets a coded error saying how to
change the stack. Routing rules, balancing, sticky sessions, retries and metrics are the
same code as under `autodeploy serve`: `StaticControlPlane` answers the calls the
gateway otherwise sends to the controller.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from controller import errors
from controller.contracts import (Acquire, AcquireReply, Address, Auth, AuthReply, Done, Request, RouteEntry, Snapshot,
                                  Status, StatusReply, Sync, SyncReply, TokenOwner, Unreachable)
from controller.errors import AutoDeployError
from controller.policy.capacity import RANDOM, ROUND_ROBIN, SCALE_OUT
from controller.policy.status import status_word

FIXED = "instances are fixed by the Pulumi stack: change autodeploy:replicas and run `pulumi up`"


def parse_routes(routes: dict[str, Any], keys: str = "") -> Snapshot:
    """AUTODEPLOY_ROUTES (see controller.pulumi_program.gateway_routes) as a routing snapshot.
    `keys`: AUTODEPLOY_ENDPOINT_KEYS, `deployment:sha256hex:1|0` items (1: may scale out),
    comma-separated; a private deployment without any refuses every request (1035)."""
    table: dict[str, dict[str, bool]] = {}
    for item in (k.strip() for k in keys.split(",") if k.strip()):
        parts = item.split(":")
        if len(parts) != 3 or len(parts[1]) != 64 or parts[2] not in ("0", "1"):
            raise AutoDeployError(errors.SPEC_INVALID, f"AUTODEPLOY_ENDPOINT_KEYS item {parts[0]!r} must be "
                                  "deployment:sha256-hex:1|0")
        table.setdefault(parts[0], {})[parts[1].lower()] = parts[2] == "1"
    if routes.get("version") != 1 or not isinstance(routes.get("deployments"), dict):
        raise AutoDeployError(errors.SPEC_INVALID, "AUTODEPLOY_ROUTES must be {\"version\": 1, \"deployments\": {...}}")
    deps = {}
    for slot, (name, dep) in enumerate(sorted(routes["deployments"].items())):
        ready = []
        for n, inst in enumerate(dep.get("instances", [])):
            host, _, port = str(inst["address"]).rpartition(":")
            ready.append(Address(str(inst["id"]), host, int(port), 1, name, slot * 64 + n))
        state = dep.get("state", "running")
        deps[name] = RouteEntry(state=state, algorithm=dep.get("algorithm", "round-robin"),
                                sticky=bool(dep.get("stickySessions")), rr_slot=slot, revision=1, split=None,
                                request_timeout=float(dep.get("requestTimeout", 300.0)),
                                access="private" if dep.get("access") == "private" else "public",
                                keys=table.get(name, {}), ready=tuple(ready) if state == "running" else ())
    return Snapshot(1, deps)


def parse_tokens(text: str) -> dict[str, TokenOwner]:
    """AUTODEPLOY_API_TOKENS: `name:role:sha256hex` items, comma-separated (hashes of
    `autodeploy token create` tokens, or of `openssl rand -hex 32`). Without any, the static
    gateway's status API answers 401 to everyone."""
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, role, token_hash = (item.split(":") + ["", ""])[:3]
        if role not in ("viewer", "operator", "admin") or len(token_hash) != 64:
            raise AutoDeployError(errors.SPEC_INVALID, f"AUTODEPLOY_API_TOKENS item {name!r} must be "
                                  "name:role:sha256-hex with role viewer, operator or admin")
        out[token_hash.lower()] = TokenOwner(name, role)
    return out


class StaticControlPlane:
    """Answers the gateway's control calls (the `IpcClient.request` interface) from fixed routes."""

    def __init__(self, routes: dict[str, Any], tokens: str = "", keys: str = "") -> None:
        self.snapshot = parse_routes(routes, keys)
        self.tokens = parse_tokens(tokens)
        self._idle = threading.Event()

    @classmethod
    def from_env(cls) -> "StaticControlPlane":
        raw = os.environ.get("AUTODEPLOY_ROUTES")
        if not raw:
            raise AutoDeployError(errors.SPEC_INVALID, "AUTODEPLOY_ROUTES is not set; the Pulumi program sets it")
        return cls(json.loads(raw), os.environ.get("AUTODEPLOY_API_TOKENS", ""),
                   os.environ.get("AUTODEPLOY_ENDPOINT_KEYS", ""))

    def request(self, msg: Request) -> Any:
        """The `IpcClient.request` interface: the typed reply to `msg`."""
        if isinstance(msg, Sync):
            if msg.version != self.snapshot.version:
                return SyncReply(self.snapshot.version, self.snapshot)
            self._idle.wait(msg.wait)  # nothing ever changes: behave like a long poll
            return SyncReply(self.snapshot.version)
        if isinstance(msg, Acquire):
            return AcquireReply(self._acquire(msg.deployment, msg.rule))
        if isinstance(msg, Status):
            return StatusReply(self._status(msg.name))
        if isinstance(msg, Unreachable):
            return Done()
        if isinstance(msg, Auth):
            return AuthReply(self.tokens.get(msg.hash))
        raise AutoDeployError(errors.BAD_REQUEST, f"the static gateway has no {msg.op!r}: {FIXED}")

    def _dep(self, name: str) -> RouteEntry:
        dep = self.snapshot.deployments.get(name)
        if dep is None:
            raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, f"no deployment named {name!r}")
        if dep.state == "stopped":
            raise AutoDeployError(errors.DEPLOYMENT_STOPPED, f"{name} is stopped")
        return dep

    def _acquire(self, name: str, rule: str | None) -> Address:
        dep = self._dep(name)
        if rule == SCALE_OUT:
            raise AutoDeployError(errors.REPLICA_QUOTA_EXCEEDED, FIXED)
        if rule not in (None, RANDOM, ROUND_ROBIN):
            found = [r for r in dep.ready if r.id == rule]
            if not found:
                raise AutoDeployError(errors.ROUTE_TARGET_NOT_FOUND, f"no instance {rule!r} in this deployment")
            return found[0]
        if not dep.ready:
            raise AutoDeployError(errors.ROUTE_TARGET_NOT_FOUND, f"{name} has no instances; {FIXED}")
        return dep.ready[0]

    def _status(self, name: str | None) -> dict:
        def one(n: str, dep: RouteEntry) -> dict:
            return {"name": n, "state": dep.state,
                    "status": status_word(dep.state, len(dep.ready), len(dep.ready), 0),
                    "endpoint": f"/d/{n}/", "instances": [{"id": r.id, "state": "ready", "host": r.host,
                                                           "port": r.port} for r in dep.ready]}
        deps = self.snapshot.deployments
        if name is not None:
            if name not in deps:
                raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, f"no deployment named {name!r}")
            return one(name, deps[name])
        return {"deployments": [one(n, d) for n, d in sorted(deps.items())], "errors": [], "driver": "static",
                "at": time.time()}

    def close(self) -> None:
        self._idle.set()
