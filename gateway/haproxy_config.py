"""The HAProxy configuration of the haproxy data plane, rendered from the routing snapshot.

Pure: text in, text out, no I/O. One frontend on the gateway port; per deployment a
backend `be_<name>`; the Flask gateway (activator, API) is the backend `activator`.
A deployment's requests go to its backend while it has a usable server, otherwise to
the activator, which holds them and starts an instance (scale from zero). Requests
carrying `Deploy-Route-Rule` always go to the activator, which keeps the seeds'
semantics for rules.

Servers are instances, named by their instance id, added and removed over the Runtime
API (gateway/haproxy_runtime.py) without a reload. A reload happens only when the set
of backends or a backend's settings change; the servers alive at that moment are then
written into the new file so they survive it. Everything here takes plain data, so
the Pulumi program renders the very same file for its gateway container.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from controller import errors
from controller.contracts import (DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_TUNNEL_IDLE_TIMEOUT_S, DEFAULT_TUNNEL_TIMEOUT_S,
                                  RouteEntry)
from controller.errors import ErrorCode

ACTIVATOR = "activator"
FRONTEND = "gateway"
PEER_HEADER = "X-Autodeploy-Peer"  # the client address HAProxy saw, for the activator only
PROTO_HEADER = "X-Autodeploy-Proto"  # "https" when HAProxy terminated TLS, for the activator only
COOKIE_PREFIX = "autodeploy-"  # gateway.balancer.cookie_name: same cookie in both data planes
LOG_TAG = "AD1"  # request log lines start with it; HAProxy's own notices do not
# Request log sampling. Each logged request costs the controller's reader ~10 us of Python
# on the same cores as HAProxy and the models: logging every request took a third of warm
# throughput. Below this many responses per second a deployment logs every one; above it,
# a response is logged with probability 1/k, k = ceil(rate / LOG_LINES_PER_S), and its
# line carries the weight k, so counts and latency histograms stay unbiased estimates.
# Responses with status >= 500 and HAProxy's own error answers are always logged, weight 1.
LOG_LINES_PER_S = 200
DEPLOYMENT_HEADER = "Deploy-Deployment"  # names an h2c/gRPC deployment when the path cannot (gRPC metadata)
BASE_WEIGHT = 100  # consistent hashing is coarse at weight 1 (DESIGN.md)
MAX_WEIGHT = 256
XFF_HOPS = 4  # trusted proxies believed in a row in X-Forwarded-For (ip-hash)
NO_HEALTH_CHECK_INTER_S = 2.0  # TCP check that brings back a server that observe layer7 marked down

# HAProxy's own error answers, as the project's coded JSON. (code, ErrorCode)
HAPROXY_ERRORS: tuple[tuple[int, ErrorCode], ...] = (
    (400, errors.BAD_REQUEST),
    (408, errors.CLIENT_TIMEOUT),
    (500, errors.DATA_PLANE_ERROR),
    (502, errors.UPSTREAM_FAILED),
    (503, errors.DATA_PLANE_OVERLOADED),
    (504, errors.UPSTREAM_TIMEOUT),
)


@dataclass(frozen=True)
class Health:
    path: str
    interval_s: float
    timeout_s: float
    fall: int


@dataclass(frozen=True)
class Backend:
    """One deployment's backend: what its HAProxy section depends on (servers aside)."""
    name: str
    algorithm: str = "round-robin"
    sticky: bool = False
    health: Health | None = None
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    protocol: str = "http"  # spec.protocol: h2c and grpc servers are spoken to over h2c (`proto h2`)
    tunnel_idle_timeout_s: float = DEFAULT_TUNNEL_IDLE_TIMEOUT_S  # spec.tunnelIdleTimeout: `timeout tunnel`
    tunnel_timeout_s: float = DEFAULT_TUNNEL_TIMEOUT_S  # spec.tunnelTimeout: enforced by the plane's sweep
    private: bool = False  # spec.access: private: endpoint keys checked in the frontend (keys map)

    @property
    def section(self) -> str:
        return backend_name(self.name)

    @property
    def cookie(self) -> str:
        return COOKIE_PREFIX + self.name


@dataclass(frozen=True)
class Server:
    id: str  # instance id: the server name, so Deploy-Route-Target names the instance
    host: str
    port: int
    weight: int = BASE_WEIGHT
    revision: str = ""


@dataclass(frozen=True)
class Settings:
    """Installation-wide settings: where HAProxy listens and where its runtime files are."""
    bind_host: str
    bind_port: int
    activator_host: str
    activator_port: int
    socket_path: str = ""  # Runtime API (stats socket, level admin)
    log_path: str = ""  # request log: Unix datagram socket the controller reads
    log_lines_per_s: int = LOG_LINES_PER_S  # per deployment; above it the log samples (weights)
    revision_map: str = ""  # server name -> Deploy-Revision, kept over the Runtime API
    keys_map: str = ""  # "<deployment>:<sha256 of key>" -> 1 (may scale out) | 0, kept over the Runtime API
    tls_cert: str = ""  # PEM (chain + key): the frontend terminates TLS (autodeploy:tlsCertificate)
    pid_file: str = ""
    maxconn: int = 8192
    trusted_proxies: tuple[str, ...] = ()
    http_request_timeout_s: float = 10.0  # whole request head (slowloris)
    keep_alive_timeout_s: float = 75.0
    connect_timeout_s: float = 5.0
    queue_timeout_s: float = 300.0  # the activator holds cold requests this long
    hard_stop_after_s: float = 330.0  # an old process after a reload finishes streams within this
    lua_path: str = ""  # WAKE_LUA written here: h2c/gRPC requests held through a cold start
    # Servers named by host name on a Docker network (the Pulumi stack's HAProxy container):
    # resolved through Docker's DNS, and a name not resolvable yet does not stop HAProxy.
    docker_dns: bool = False


WAKE_HEADER = "X-Autodeploy-Wake"  # HAProxy's Lua asks the activator for an instance with it
WAKE_SETTLE_S = 10.0  # after the activator's answer, how long HAProxy waits for the new server to be usable

# Scale from zero for h2c/gRPC. The activator (gunicorn) speaks HTTP/1.1 only, so an h2c
# request cannot be handed to it the way HTTP/1.1 and WebSocket requests are. Instead
# HAProxy holds the request itself: this action asks the activator for an instance (the
# same cold start, queue and errors as any held request) and waits until the new server
# is usable in the deployment's backend; the request then goes to it over h2c as usual.
# If no instance comes, a gRPC client gets UNAVAILABLE (a Trailers-Only answer) with the
# activator's coded message, an h2c client the activator's own answer.
WAKE_LUA = """-- Generated by autodeploy (gateway/haproxy_config.py); edits are overwritten.
core.register_action("autodeploy_wake", {"http-req"}, function(txn, backend, name, host, port, wait_s, protocol)
    if txn.f:nbsrv(backend) > 0 then
        return
    end
    local hc = core.httpclient()
    local headers = {["%(header)s"] = {"1"}}
    -- a private deployment's key goes on: the activator checks it before starting anything
    local auth = txn.f:req_fhdr("authorization")
    if auth ~= nil and auth ~= "" then
        headers["authorization"] = {auth}
    end
    local res = hc:get{url = "http://" .. host .. ":" .. port .. "/d/" .. name .. "/",
                       headers = headers, timeout = math.floor(tonumber(wait_s) * 1000)}
    local status = (res and res.status) or 0
    if status == 204 then
        for _ = 1, %(settle_polls)d do
            if txn.f:nbsrv(backend) > 0 then
                return
            end
            core.msleep(10)
        end
    end
    local body = (res and res.body) or ""
    local reply = txn:reply()
    if protocol == "grpc" then
        local msg = string.gsub(body ~= "" and body or "no instance became ready", "[^%%w%%s:,._-]", "")
        reply:set_status(200)
        reply:add_header("content-type", "application/grpc")
        reply:add_header("grpc-status", "14")
        reply:add_header("grpc-message", msg)
    else
        reply:set_status(status >= 400 and status or 503)
        reply:add_header("content-type", "application/json")
        reply:set_body(body)
    end
    txn:done(reply)
end, 6)
""" % {"header": WAKE_HEADER.lower(), "settle_polls": int(WAKE_SETTLE_S * 100)}


def backend_name(deployment: str) -> str:
    return f"be_{deployment}"


def backend_of(dep: RouteEntry, name: str) -> Backend:
    """A deployment's backend from its routing-snapshot entry (controller.contracts.RouteEntry)."""
    h = dep.health
    health = None if h is None else Health(h.path, h.interval, h.timeout, h.fall)
    return Backend(name=name, algorithm=dep.algorithm, sticky=dep.sticky, health=health,
                   request_timeout_s=dep.request_timeout or DEFAULT_REQUEST_TIMEOUT_S,
                   protocol=dep.protocol or "http",
                   tunnel_idle_timeout_s=dep.tunnel_idle_timeout or DEFAULT_TUNNEL_IDLE_TIMEOUT_S,
                   tunnel_timeout_s=dep.tunnel_timeout or DEFAULT_TUNNEL_TIMEOUT_S,
                   private=dep.access == "private")


def keys_of(deps: Mapping[str, RouteEntry]) -> dict[str, str]:
    """The keys map's entries for a routing snapshot: `<deployment>:<key hash>` -> "1" when
    the key may use `Deploy-Route-Rule: scale-out`, else "0" (controller.auth.endpoint_check)."""
    out = {}
    for name, dep in deps.items():
        if dep.access == "private":
            for key_hash, scale_out in dep.keys.items():
                out[f"{name}:{key_hash}"] = "1" if scale_out else "0"
    return out


def keys_map_text(entries: Mapping[str, str]) -> str:
    return "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))


def server_weights(dep: RouteEntry) -> dict[str, int]:
    """HAProxy weight per ready instance: BASE_WEIGHT each, or during a rollout the split's
    percentages spread over each side's servers (a side at 0 % gets weight 0: no traffic)."""
    ready = dep.ready
    split = dep.split
    if split is None:
        return {r.id: BASE_WEIGHT for r in ready}
    new = [r.id for r in ready if r.revision == split.new_revision]
    old = [r.id for r in ready if r.revision != split.new_revision]
    new_w, old_w = split.new_weight, split.old_weight
    # A side with no ready instance gives its share to the other (gateway/split.py).
    if not new or new_w <= 0:
        return {**{i: BASE_WEIGHT for i in old}, **{i: 0 for i in new}} if old else {i: BASE_WEIGHT for i in new}
    if not old or old_w <= 0:
        return {**{i: BASE_WEIGHT for i in new}, **{i: 0 for i in old}}
    total = new_w + old_w
    out: dict[str, int] = {}
    for side, share in ((new, new_w / total), (old, old_w / total)):
        per = max(1, min(MAX_WEIGHT, round(MAX_WEIGHT * share / len(side))))
        out.update({i: per for i in side})
    return out


def servers_of(dep: RouteEntry) -> list[Server]:
    weights = server_weights(dep)
    return [Server(r.id, r.host, r.port, weights[r.id], str(r.revision)) for r in dep.ready]


def server_options(backend: Backend, weight: int) -> str:
    """Options of one server line; `add server` (Runtime API) and the file use the same.
    Dynamic servers ignore `default-server`, so everything is spelled out here."""
    # Dynamic servers keep no idle server connections by default (pool-max-conn 0): every
    # request would open a new one to the instance, at a third of the throughput. These
    # are the values a server line in the file gets by default.
    opts = [f"weight {int(weight)}", "pool-max-conn -1", "pool-purge-delay 5s"]
    if backend.protocol in ("h2c", "grpc"):
        opts.append("proto h2")  # HTTP/2 with prior knowledge: gRPC trailers and streams pass as they are
    if backend.health is not None:  # an HTTP check, or for gRPC a TCP one (the controller checks gRPC health)
        inter = _ms(backend.health.interval_s)
        opts.append(f"check inter {inter} fall {backend.health.fall} rise 1")
    else:
        opts.append(f"check inter {_ms(NO_HEALTH_CHECK_INTER_S)} fall 3 rise 1")
    # Passive ejection: 5 consecutive failed responses mark a server down until its check passes.
    opts.append("observe layer7 error-limit 5 on-error mark-down")
    return " ".join(opts)


def error_body(code: int, err: ErrorCode) -> str:
    detail = {408: "the request head did not arrive in time",
              500: "the proxy failed internally; see its log",
              502: "the instance closed the connection or answered garbage",
              503: "no connection slot or server available; retry",
              504: "the instance did not answer within spec.requestTimeout",
              400: "malformed HTTP request"}.get(code, "")
    return json.dumps({"code": err.code, "msg": f"{err.msg}: {detail}" if detail else err.msg})


def _ms(seconds: float) -> str:
    return f"{max(1, int(round(seconds * 1000)))}"


def _s(seconds: float) -> str:
    return f"{max(1, int(round(seconds * 1000)))}ms"


def _quote(text: str) -> str:
    if "'" in text:
        raise ValueError(f"cannot quote {text!r} for HAProxy")
    return f"'{text}'"


_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._~!$&()*+,;=:@%/-]*$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def render(settings: Settings, backends: Iterable[Backend],
           servers: Mapping[str, Iterable[Server]] | None = None) -> str:
    """The whole configuration file. `servers`: per deployment, the servers to write as
    static lines (those alive at a reload); None or missing = none."""
    servers = servers or {}
    backends = sorted(backends, key=lambda b: b.name)
    for b in backends:
        if not _NAME.match(b.name):
            raise ValueError(f"deployment name {b.name!r} is not a DNS label")
        if b.health is not None and not _SAFE_PATH.match(b.health.path):
            raise ValueError(f"health check path {b.health.path!r} has characters HAProxy cannot take")
    longest = max([b.request_timeout_s for b in backends] + [DEFAULT_REQUEST_TIMEOUT_S])
    s = settings
    out: list[str] = []
    w = out.append
    w("# Generated by autodeploy (gateway/haproxy_config.py); edits are overwritten.")
    w("global")
    w("    master-worker")
    # No SO_REUSEPORT: a second HAProxy on the same port would otherwise bind too and get a
    # share of the connections (two `serve`s splitting one endpoint's traffic). Reloads pass
    # the listening sockets to the new worker (expose-fd listeners), so they do not need it.
    w("    noreuseport")
    if s.pid_file:
        w(f"    pidfile {s.pid_file}")
    w(f"    stats socket {s.socket_path} mode 600 level admin expose-fd listeners")
    w("    stats timeout 30s")
    w(f"    maxconn {int(s.maxconn)}")
    w(f"    hard-stop-after {_s(s.hard_stop_after_s)}")
    if s.log_path:
        w(f"    log {s.log_path} len 2048 format raw local0 info")
    if s.lua_path:
        w(f"    lua-load {s.lua_path}")
    w("")
    if s.docker_dns:
        w("resolvers docker")
        w("    nameserver dns 127.0.0.11:53")
        w("    hold valid 10s")
        w("")
    w("defaults")
    w("    mode http")
    w("    log global")
    w(f'    log-format "{LOG_TAG} %b %s %ST %Ta %tsc %[var(txn.logw)]"')
    w("    option dontlognull")
    w("    option http-no-delay")  # streamed chunks (SSE, tokens) leave at once, not ~200 ms later
    w("    option redispatch")
    w("    retry-on conn-failure empty-response")
    # A node that stops answering takes all its instances at once: with redispatch each retry
    # tries another server, so a few retries get past every dead one before the drain lands.
    w("    retries 3")
    w(f"    timeout connect {_s(s.connect_timeout_s)}")
    w(f"    timeout http-request {_s(s.http_request_timeout_s)}")
    w(f"    timeout http-keep-alive {_s(s.keep_alive_timeout_s)}")
    w(f"    timeout client {_s(longest + 5)}")
    w(f"    timeout server {_s(DEFAULT_REQUEST_TIMEOUT_S)}")
    w(f"    timeout queue {_s(30)}")
    w("    timeout tunnel 1h")
    w(f"    timeout check {_s(5)}")
    for code, err in HAPROXY_ERRORS:
        w(f"    http-error status {code} content-type application/json string {_quote(error_body(code, err))}")
    w("")
    w(f"frontend {FRONTEND}")
    w(f"    bind {s.bind_host}:{int(s.bind_port)}" + (f" ssl crt {s.tls_cert}" if s.tls_cert else ""))
    w(f"    http-request del-header {PEER_HEADER}")
    w(f"    http-request del-header {PROTO_HEADER}")
    w("    http-request set-var(txn.dep) path,field(3,/) if { path_beg /d/ }")
    # h2c/gRPC deployments are also named by a header (gRPC metadata) or by the first label of
    # the :authority (Host), since gRPC clients put /package.Service/Method in the path.
    if any(b.protocol != "http" for b in backends):  # each rule costs every request: only when used
        w(f"    http-request set-var(txn.hdep) req.hdr({DEPLOYMENT_HEADER}) if {{ req.hdr({DEPLOYMENT_HEADER}) -m found }}")
        w("    http-request set-var(txn.hdep) req.hdr(host),field(1,:),field(1,.) if !{ var(txn.hdep) -m found }")
    w(f"    http-request del-header {WAKE_HEADER}")
    _endpoint_keys(w, s, [b for b in backends if b.private])
    if s.lua_path:
        for b in backends:
            if b.protocol == "http":
                continue
            wake = (f"    http-request lua.autodeploy_wake {b.section} {b.name} {s.activator_host} "
                    f"{int(s.activator_port)} {s.queue_timeout_s:g} {b.protocol}")
            w(f"{wake} if {{ var(txn.dep) -m str {b.name} }} {{ nbsrv({b.section}) eq 0 }} "
              "!{ req.hdr(Deploy-Route-Rule) -m found }")
            w(f"{wake} if !{{ path_beg /d/ }} {{ var(txn.hdep) -m str {b.name} }} {{ nbsrv({b.section}) eq 0 }} "
              "!{ req.hdr(Deploy-Route-Rule) -m found }")
    if s.trusted_proxies and any(b.algorithm == "ip-hash" for b in backends):
        _client_address(w, s.trusted_proxies)
    w(f"    use_backend {ACTIVATOR} if {{ req.hdr(Deploy-Route-Rule) -m found }}")
    for b in backends:
        w(f"    use_backend {b.section} if {{ var(txn.dep) -m str {b.name} }} {{ nbsrv({b.section}) gt 0 }}")
        if b.protocol != "http":
            w(f"    use_backend {b.section} if !{{ path_beg /d/ }} {{ var(txn.hdep) -m str {b.name} }} "
              f"{{ nbsrv({b.section}) gt 0 }}")
    w(f"    default_backend {ACTIVATOR}")
    for b in backends:
        w("")
        _backend(w, s, b, servers.get(b.name, ()))
    w("")
    w(f"backend {ACTIVATOR}")
    w("    http-request set-log-level silent")  # the activator reports its own metrics
    w(f"    http-request set-header {PEER_HEADER} %[src]")
    if s.tls_cert:
        w(f"    http-request set-header {PROTO_HEADER} https")
    w(f"    timeout server {_s(s.queue_timeout_s + longest + 10)}")
    w(f"    server {ACTIVATOR} {s.activator_host}:{int(s.activator_port)}{_dns(s)}")
    return "\n".join(out) + "\n"


def _endpoint_keys(w, s: Settings, private: list[Backend]) -> None:
    """Private deployments: the key's SHA-256 must be in the keys map under the deployment,
    and `Deploy-Route-Rule: scale-out` needs its value 1; the same rule and codes as the
    activator (controller.auth.endpoint_check), which checks again what it is sent. An h2c or
    gRPC deployment reached by header or host name (txn.hdep) is checked the same way, before
    the wake that would start an instance for it."""
    if not private:
        return
    if not s.keys_map:
        raise ValueError("private deployments need Settings.keys_map")
    names = " ".join(b.name for b in private)
    by_host = " ".join(b.name for b in private if b.protocol != "http")
    w("    http-request set-var(txn.kdep) var(txn.dep) if { var(txn.dep) -m found }")
    if by_host:
        w(f"    http-request set-var(txn.kdep) var(txn.hdep) if !{{ path_beg /d/ }} {{ var(txn.hdep) -m str {by_host} }}")
    w("    http-request set-var(txn.keyhash) req.fhdr(authorization),regsub('^bearer +','',i),sha2(256),hex,lower "
      "if { req.fhdr(authorization) -m reg -i '^bearer +[^ ]+$' }")
    w(f"    http-request set-var(txn.keyperm) var(txn.kdep),concat(:,txn.keyhash),map({s.keys_map}) "
      "if { var(txn.keyhash) -m found }")
    w(f"    acl private_dep var(txn.kdep) -m str {names}")
    required = json.dumps({"code": errors.KEY_REQUIRED.code,
                           "msg": f"{errors.KEY_REQUIRED.msg}: this deployment is private; "
                                  "send Authorization: Bearer <key> with a key of it"})
    forbidden = json.dumps({"code": errors.KEY_FORBIDDEN.code,
                            "msg": f"{errors.KEY_FORBIDDEN.msg}: this key may not use Deploy-Route-Rule: scale-out"})
    w(f"    http-request return status 401 content-type application/json string {_quote(required)} "
      "hdr WWW-Authenticate 'Bearer realm=\"autodeploy\"' if private_dep !{ var(txn.keyperm) -m found }")
    w(f"    http-request return status 403 content-type application/json string {_quote(forbidden)} "
      "if private_dep { req.hdr(Deploy-Route-Rule) -i scale-out } !{ var(txn.keyperm) -m str 1 }")


def _client_address(w, trusted: tuple[str, ...]) -> None:
    """txn.client: the client's address for ip-hash, believing X-Forwarded-For only from
    trusted proxies, hop by hop from the right (controller.policy.balance.client_ip)."""
    w("    http-request set-var(txn.client) src")
    nets = " ".join(str(ipaddress.ip_network(t, strict=False)) for t in trusted)
    for hop in range(1, XFF_HOPS + 1):
        w(f"    http-request set-var(txn.client) req.hdr_ip(X-Forwarded-For,-{hop}) "
          f"if {{ var(txn.client) -m ip {nets} }} {{ req.hdr_ip(X-Forwarded-For,-{hop}) -m found }}")


def _forwarded(w, trusted: tuple[str, ...], proto: str = "http") -> None:
    """X-Forwarded-For/-Proto/-Host as the python data plane writes them: a trusted proxy's
    are kept ("prior, client" for the address), anyone else's replaced, and `Forwarded` and
    `X-Real-IP` dropped (gateway.app.Proxy._upstream_headers)."""
    if trusted:
        nets = " ".join(str(ipaddress.ip_network(t, strict=False)) for t in trusted)
        w(f"    acl from_trusted src {nets}")
        untrusted = "!from_trusted"
        w('    http-request set-header X-Forwarded-For "%[req.fhdr(X-Forwarded-For)], %[src]" '
          "if from_trusted { req.fhdr(X-Forwarded-For) -m found }")
        w("    http-request set-header X-Forwarded-For %[src] if !from_trusted or !{ req.fhdr(X-Forwarded-For) -m found }")
        w(f"    http-request set-header X-Forwarded-Proto {proto} "
          "if !from_trusted or !{ req.hdr(X-Forwarded-Proto) -m found }")
        w("    http-request set-header X-Forwarded-Host %[req.hdr(host)] "
          "if !from_trusted or !{ req.hdr(X-Forwarded-Host) -m found }")
        w(f"    http-request del-header Forwarded if {untrusted}")
        w(f"    http-request del-header X-Real-IP if {untrusted}")
        return
    w("    http-request set-header X-Forwarded-For %[src]")
    w(f"    http-request set-header X-Forwarded-Proto {proto}")
    w("    http-request set-header X-Forwarded-Host %[req.hdr(host)]")
    w("    http-request del-header Forwarded")
    w("    http-request del-header X-Real-IP")


def _log_sampling(w, s: Settings, b: Backend) -> None:
    """k = ceil(responses/s of this deployment / log_lines_per_s); a response under 500 is
    logged with probability 1/k and weight k (LOG_LINES_PER_S)."""
    t = max(1, int(s.log_lines_per_s))
    # be_sess_rate: this backend's streams (one per HTTP request) in the last second, a
    # counter HAProxy keeps anyway; a stick table tracked per request cost more.
    w(f"    http-response set-var(txn.logw) be_sess_rate,add({t - 1}),div({t}) if {{ status lt 500 }}")
    w("    http-response set-log-level silent if { var(txn.logw) -m int gt 1 } !{ rand(1000000),mod(txn.logw) eq 0 }")


def _backend(w, s: Settings, b: Backend, servers: Iterable[Server]) -> None:
    w(f"backend {b.section}")
    if b.algorithm == "least-connections":
        w("    balance leastconn")
    elif b.algorithm == "ip-hash":
        w("    balance source" if not s.trusted_proxies else "    balance hash var(txn.client)")
        w("    hash-type consistent")
    else:
        w("    balance roundrobin")
    w(f"    timeout server {_s(b.request_timeout_s)}")
    w(f"    timeout tunnel {_s(b.tunnel_idle_timeout_s)}")  # WebSocket: no byte either way for this long
    if b.private:
        w("    http-request del-header Authorization")  # the endpoint key is ours, never the instance's
    _forwarded(w, s.trusted_proxies, "https" if s.tls_cert else "http")
    w(f"    http-request replace-path ^/d/{b.name}/?(.*) /\\1")
    # gRPC: the controller checks with the gRPC health protocol and takes a failing instance
    # out of the snapshot, hence out of this backend; HAProxy itself only checks TCP.
    if b.health is not None and b.protocol != "grpc":
        w("    option httpchk")
        w(f"    http-check send meth GET uri {b.health.path}")
        w("    http-check expect status 200-399")
        w(f"    timeout check {_s(b.health.timeout_s)}")
    if b.sticky:
        # Dynamic servers refuse `cookie`: the cookie (the instance id, as in python mode)
        # is a key in a stick table the controller fills with instance id -> server.
        w("    stick-table type string len 64 size 100k")
        w(f"    stick match req.cook({b.cookie})")
        w(f"    http-request set-var(txn.sticky) req.cook({b.cookie})")
        w("    http-response set-var(txn.srv) srv_name")
        w(f'    http-response add-header Set-Cookie "{b.cookie}=%s; Path=/d/{b.name}; HttpOnly; SameSite=Lax" '
          "if !{ var(txn.sticky),strcmp(txn.srv) eq 0 }")
    w("    http-response set-header Deploy-Route-Target %s")
    if s.log_path:
        _log_sampling(w, s, b)
    if s.revision_map:
        w(f"    http-response set-header Deploy-Revision %[srv_name,map({s.revision_map},0)]")
    for srv in servers:
        w(f"    server {srv.id} {srv.host}:{int(srv.port)} {server_options(b, srv.weight)}{_dns(s)}")


def _dns(s: Settings) -> str:
    return " resolvers docker init-addr last,libc,none" if s.docker_dns else ""


def tunnels_to_check(sessions: Iterable[Any], backends: Iterable[Backend]) -> list[Any]:
    """Sessions of a deployment's backend older than its spec.tunnelTimeout: HAProxy bounds a
    tunnel's silence (`timeout tunnel`), not its life, so the plane ends these once `show
    sess PTR` confirms they are tunnels (a long plain request is left to its own timeouts).
    `sessions`: objects with `backend` and `age_s` (gateway.haproxy_runtime.Session)."""
    limits = {b.section: b.tunnel_timeout_s for b in backends}
    return [s for s in sessions if s.backend in limits and s.age_s >= limits[s.backend]]


def revision_map_text(servers: Mapping[str, Iterable[Server]]) -> str:
    """The revision map file written next to a rendered config: server name -> revision."""
    return "".join(f"{srv.id} {srv.revision}\n" for group in servers.values() for srv in group)

