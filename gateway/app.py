"""The gateway: `ANY /d/<name>/<path>` proxies to an instance; `/api/...` is the status API."""
from __future__ import annotations

import ipaddress
import logging
import os
import time
from typing import Iterator

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import PathConverter

from controller import errors
from controller.auth import HostPolicy, endpoint_check
from controller.errors import AutoDeployError
from controller.contracts import Action, ColdStarts, Events, FirstByte, Keys, Source, Status, Tokens
from controller.ipc import IpcClient
from controller.policy.balance import client_ip
from controller.policy.capacity import RANDOM, ROUND_ROBIN, SCALE_OUT
from gateway.balancer import RequestKey, cookie_name
from gateway.counters import SharedCounters
from gateway.guard import ApiGuard
from gateway.inflight import SharedInflight
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.outliers import CONNECT_FAILED, RESET, retry_allowed
from gateway.responses import error_response, json_bytes as _json_bytes
from gateway.routing import Lease, Router, Target
from gateway.upstream import (SMALL_BODY, UpstreamBadRequest, UpstreamBadResponse, UpstreamConnectError, UpstreamPool,
                              UpstreamProtocolError, UpstreamResponse, UpstreamTimeout)
from gateway.ui import register as register_ui
from gateway.haproxy_config import WAKE_HEADER
from gateway.tunnel import Hijacked, TunnelSlots, is_websocket_upgrade, pump, response_head

log = logging.getLogger("autodeploy.gateway")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
ROUTE_RULE = "Deploy-Route-Rule"
ROUTE_TARGET = "Deploy-Route-Target"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
CHUNK = 64 * 1024


def peer_trusted(peer: str, trusted_proxies: tuple[str, ...]) -> bool:
    """Whether the connecting peer is one of the trusted proxies (`--trusted-proxy`)."""
    if not trusted_proxies:
        return False
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(net, strict=False) for net in trusted_proxies)


def public_error(exc: AutoDeployError, name: str | None) -> AutoDeployError:
    """The error as an endpoint client may see it: without its private detail (an
    instance's log lines), which stays in `autodeploy logs`, the events and the
    authenticated API; a pointer to those takes its place."""
    if not exc.private_detail:
        return exc
    detail = f"{exc.detail} (its log: `autodeploy logs {name or 'NAME'}` and the status API)".lstrip()
    return AutoDeployError(exc.error, detail, exc.retry_after)


def _hop_by_hop(headers: "object") -> set[str]:
    extra = {t.strip().lower() for t in (headers.get("Connection") or "").split(",") if t.strip()}  # type: ignore[attr-defined]
    return HOP_BY_HOP | extra


def upstream_target(environ: dict, name: str) -> str:
    """The request target for the instance: the client's own bytes after `/d/<name>`.

    gunicorn's RAW_URI is the request line's target as sent (WSGI strings are latin-1, so
    it round-trips byte for byte); PATH_INFO is percent-decoded and must never be re-sent:
    `a%2Fb%3Fc` would become `a/b?c`, `%20` would split the request line."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:  # a server without the raw target: re-encode what it decoded
        from urllib.parse import quote
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("latin-1")
        query = environ.get("QUERY_STRING", "")
        raw = quote(path, safe="/:@!$&'()*+,;=-._~") + ("?" + query if query else "")
    if not raw.startswith("/"):  # absolute-form, as a forward proxy sends it: drop scheme://host
        after = raw.find("://")
        slash = raw.find("/", after + 3) if after >= 0 else -1
        query = raw.find("?", after + 3) if after >= 0 else -1
        if slash < 0 or 0 <= query < slash:
            raw = "/" + (raw[query:] if query >= 0 else "")
        else:
            raw = raw[slash:]
    path, sep, query = raw.partition("?")
    parts = path.split("/", 3)  # ['', 'd', '<name as sent>', 'rest...']
    rest = "/" + parts[3] if len(parts) > 3 else "/"
    return rest + sep + query


class AnyPath(PathConverter):
    """`path`, but a decoded CR or LF (`%0d`, `%0a`) or a leading `/` is still a path: the target
    is proxied raw, whatever it holds."""
    regex = "(?s:.+?)"
    part_isolating = False  # it spans "/" (werkzeug guesses from the regex, which holds none)


class UpstreamAborted(Exception):
    """Raised into the WSGI server mid-body: it closes the client's connection at once, so a
    response cut short by the instance is never mistaken for a whole one (not an OSError:
    servers treat those as the client's own socket failing)."""


class _Body:
    """The streamed response body; releases the upstream connection and the lease however the
    server ends it (read to the end, an error, or close() before the first chunk)."""

    def __init__(self, upstream: UpstreamResponse, lease: Lease, status: int) -> None:
        self.upstream, self.lease, self.status = upstream, lease, status

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.upstream.stream()
        except OSError as exc:
            log.warning("upstream %s broke mid-response: %s", self.lease.target.id, exc)
            self.upstream.release()
            self.lease.done(ok=False, status=self.status)
            raise UpstreamAborted(f"{self.lease.target.id}: {exc}") from None
        self.lease.done(ok=self.status < 500, status=self.status)

    def close(self) -> None:
        self.upstream.release()
        # Closed before the end: the client went away, which is no fault of the instance.
        self.lease.done(ok=self.status < 500, status=self.status)


class Proxy:
    def __init__(self, router: Router, connect_timeout: float, read_timeout: float | None,
                 trusted_proxies: tuple[str, ...] = (), max_tunnels: int = 48) -> None:
        self.router = router
        self.pool = UpstreamPool(connect_timeout=connect_timeout, read_timeout=read_timeout)
        self.trusted_proxies = trusted_proxies
        self.tunnels = TunnelSlots(max_tunnels)

    def forward(self, name: str, path: str) -> Response:
        # Endpoint keys first: the check covers WebSocket handshakes and the h2c/gRPC wake
        # (HAProxy's Lua passes the client's Authorization on) as well as plain requests.
        access, keys = self.router.access(name)
        refusal = endpoint_check(access, keys, request.headers.get("Authorization"), request.headers.get(ROUTE_RULE))
        if refusal is not None:
            raise AutoDeployError(refusal.error, refusal.detail)
        g.strip_authorization = access == "private"  # _upstream_headers: the key never reaches the instance
        if request.headers.get(WAKE_HEADER) == "1":
            return self.wake(name)
        protocol = self.router.protocol(name)
        if protocol != "http":
            raise AutoDeployError(errors.PROTOCOL_NOT_CARRIED, f"{name} has spec.protocol {protocol}; the python "
                                  "data plane speaks HTTP/1.1 only")
        if is_websocket_upgrade(request.headers) and request.method == "GET":
            return self.tunnel(name, path)
        started = time.monotonic()
        header = request.headers.get(ROUTE_RULE) or None
        rule = header.strip().lower() if header else None
        cookie = cookie_name(name)
        key = RequestKey(client_ip(request.remote_addr or "", request.headers.get("X-Forwarded-For"),
                                   self.trusted_proxies), request.cookies.get(cookie))
        url = upstream_target(request.environ, name)
        lease = self.router.lease(name, rule, key, started=started)
        try:
            upstream, lease = self._send(name, rule, key, url, lease)
            set_cookie = None
            # Only the algorithm's own picks pin a client: a route rule is a one-off override.
            if rule is None and key.cookie != lease.target.id and self.router.sticky(name):
                set_cookie = f"{cookie}={lease.target.id}; Path=/d/{name}; HttpOnly; SameSite=Lax"
            return self._response(upstream, lease, set_cookie)
        except BaseException:
            lease.done(ok=False)  # a no-op when the response took it over or it was released
            raise

    def _send(self, name: str, rule: str | None, key: RequestKey, url: str,
              lease: Lease) -> tuple[UpstreamResponse, Lease]:
        """Send to the leased instance; on a failure that allows it, retry on another."""
        headers = self._upstream_headers()
        body, length = self._body()
        pinned = rule is not None and rule not in (RANDOM, ROUND_ROBIN, SCALE_OUT)
        attempt, tried = 1, {lease.target.id}
        timeout = self.router.request_timeout(name)
        while True:
            target = lease.target
            try:
                upstream = self.pool.request(target.host, target.port, request.method, url, headers, body, length,
                                             timeout=timeout)
                if target.cold:
                    self._first_byte(target)
                return upstream, lease
            except UpstreamBadRequest as exc:
                lease.done(ok=True)  # nothing was sent: no fault of the instance
                raise AutoDeployError(errors.BAD_REQUEST, str(exc)) from None
            except UpstreamConnectError as exc:
                # Nothing reached the instance: it died or is being released.
                lease.unreachable()
                if pinned:
                    raise AutoDeployError(errors.ROUTE_TARGET_NOT_FOUND, f"instance {target.id} is gone") from None
                failure, replayable, error = CONNECT_FAILED, True, exc
            except UpstreamTimeout as exc:
                lease.done(ok=False)
                if self.router.metrics is not None:
                    self.router.metrics.upstream_failure(name, target.id, "timeout")
                raise AutoDeployError(errors.REQUEST_TIMEOUT, f"{target.id}: {exc}") from None
            except UpstreamBadResponse as exc:
                lease.done(ok=False)
                raise AutoDeployError(errors.UPSTREAM_BAD_RESPONSE, f"{target.id}: {exc}") from None
            except OSError as exc:
                lease.done(ok=False)
                if self.router.metrics is not None:
                    self.router.metrics.upstream_failure(name, target.id, "reset")
                # A reset before any response byte (ProtocolError) may be resent; anything else is final.
                reset = isinstance(exc, (UpstreamProtocolError, ConnectionResetError, BrokenPipeError))
                failure, replayable, error = (RESET if reset else "other"), not isinstance(body, Iterator), exc
            if pinned or not retry_allowed(request.method, failure, replayable, attempt):
                raise AutoDeployError(errors.UPSTREAM_FAILED, f"{target.id}: {error}") from error
            if self.router.metrics is not None:
                self.router.metrics.retried(name, failure)
            attempt += 1
            lease = self.router.lease(name, rule if rule in (RANDOM, ROUND_ROBIN) else None, key,
                                      avoid=frozenset(tried), started=lease.started)
            tried.add(lease.target.id)

    def _first_byte(self, target: Target) -> None:
        """Cold-start explain: the response to a request that waited on a start has begun."""
        try:
            self.router.ipc.request(FirstByte(instance=target.id, at=time.time()))
        except AutoDeployError as exc:  # the static gateway has no starts to explain
            log.debug("first byte of %s not recorded: %s", target.id, exc)

    def wake(self, name: str) -> Response:
        """haproxy mode, an h2c/gRPC request at zero: HAProxy holds it and asks here for an
        instance (gateway/haproxy_config.py WAKE_LUA). Same cold start, queue and coded errors
        as a held request; 204 once an instance is ready. (A client sending the header gains
        nothing a plain request would not: it starts an instance, as any request does.)"""
        lease = self.router.lease(name, None)
        lease.done(ok=True, status=204)
        return Response(status=204, headers=[(ROUTE_TARGET, lease.target.id)])

    def tunnel(self, name: str, path: str) -> Response:
        """A WebSocket handshake: routed like any request (a cold start holds it), then, on the
        instance's 101, a byte tunnel counted in flight on that instance until it closes."""
        client = request.environ.get("gunicorn.socket")
        if client is None:
            raise AutoDeployError(errors.TUNNEL_UNSUPPORTED, "no gunicorn.socket in the WSGI environ")
        if not self.tunnels.take():
            raise AutoDeployError(errors.TUNNEL_LIMIT, f"{self.tunnels.limit} tunnels are open in this worker",
                                  retry_after=1.0)
        try:
            return self._tunnel(name, path, client)
        finally:
            self.tunnels.give()

    def _tunnel(self, name: str, path: str, client: object) -> Response:
        started = time.monotonic()
        header = request.headers.get(ROUTE_RULE) or None
        rule = header.strip().lower() if header else None
        cookie = cookie_name(name)
        key = RequestKey(client_ip(request.remote_addr or "", request.headers.get("X-Forwarded-For"),
                                   self.trusted_proxies), request.cookies.get(cookie))
        lifetime_s, idle_s = self.router.tunnel_bounds(name)
        headers = self._upstream_headers() + [("Connection", "Upgrade"), ("Upgrade", request.headers["Upgrade"])]
        url = upstream_target(request.environ, name)
        pinned = rule is not None and rule not in (RANDOM, ROUND_ROBIN, SCALE_OUT)
        lease = self.router.lease(name, rule, key, started=started)
        try:
            for attempt in (1, 2):
                target = lease.target
                try:
                    upstream = self.pool.upgrade(target.host, target.port, "GET", url, headers,
                                                 timeout=self.router.request_timeout(name))
                    break
                except UpstreamBadRequest as exc:
                    lease.done(ok=True)  # nothing was sent: no fault of the instance
                    raise AutoDeployError(errors.BAD_REQUEST, str(exc)) from None
                except UpstreamTimeout as exc:
                    lease.done(ok=False)
                    raise AutoDeployError(errors.REQUEST_TIMEOUT, f"{target.id}: {exc}") from None
                except UpstreamConnectError as exc:
                    lease.unreachable()  # nothing was sent: another instance may take it
                    if pinned or attempt == 2:
                        raise AutoDeployError(errors.ROUTE_TARGET_NOT_FOUND if pinned else errors.UPSTREAM_FAILED,
                                              f"{target.id}: {exc}") from None
                    lease = self.router.lease(name, rule if rule in (RANDOM, ROUND_ROBIN) else None, key,
                                              avoid=frozenset({target.id}), started=started)
                except UpstreamBadResponse as exc:
                    lease.done(ok=False)
                    raise AutoDeployError(errors.UPSTREAM_BAD_RESPONSE, f"{target.id}: {exc}") from None
                except OSError as exc:
                    lease.done(ok=False)
                    raise AutoDeployError(errors.UPSTREAM_FAILED, f"{target.id}: {exc}") from exc
            else:
                raise AssertionError("unreachable")
            set_cookie = None
            if rule is None and key.cookie != target.id and self.router.sticky(name):
                set_cookie = f"{cookie}={target.id}; Path=/d/{name}; HttpOnly; SameSite=Lax"
            if upstream.status != 101:  # the instance refused the upgrade: its answer goes back as is
                return self._response(upstream, lease, set_cookie)
            extra = [(ROUTE_TARGET, target.id), ("Deploy-Revision", str(target.revision))]
            if set_cookie is not None:
                extra.append(("Set-Cookie", set_cookie))
            lookup = {k.lower(): v for k, v in upstream.headers}
            drop = HOP_BY_HOP | {t.strip().lower() for t in lookup.get("connection", "").split(",") if t.strip()}
            instance = upstream.detach()
            end = None
            try:
                client.sendall(response_head(upstream.headers, drop, extra))  # type: ignore[attr-defined]
                end = pump(client, instance, lifetime_s, idle_s)  # type: ignore[arg-type]
            except OSError as exc:
                log.info("websocket to %s: the client went away before the tunnel opened: %s", target.id, exc)
            finally:
                instance.close()
                # No latency sample: a tunnel's length says nothing about the instance's speed.
                lease.started = None  # type: ignore[assignment]
                lease.done(ok=True, status=101)
        except BaseException:
            lease.done(ok=False)  # a no-op when it was released above
            raise
        if end is not None and end.reason != "closed":
            log.info("websocket tunnel to %s closed: %s (%d bytes up, %d down)", target.id, end.reason,
                     end.up_bytes, end.down_bytes)
        return Hijacked()

    def _upstream_headers(self) -> list[tuple[str, str]]:
        """What the instance gets: hop-by-hop headers, a private deployment's key and, from a
        peer that is not a trusted proxy, every client-written forwarding header are removed;
        X-Forwarded-For/-Proto/-Host are then written by us."""
        client = request.remote_addr or ""
        trusted = peer_trusted(client, self.trusted_proxies)
        drop = _hop_by_hop(request.headers) | {"host", ROUTE_RULE.lower(), "content-length",
                                               "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
        if g.get("strip_authorization"):
            drop |= {"authorization"}  # a private deployment's endpoint key is ours, never the instance's
        if not trusted:
            drop |= {"forwarded", "x-real-ip"}
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in drop]
        prior = request.headers.get("X-Forwarded-For") if trusted else None
        headers.append(("X-Forwarded-For", f"{prior}, {client}" if prior else client))
        proto = request.headers.get("X-Forwarded-Proto") if trusted else None
        host = request.headers.get("X-Forwarded-Host") if trusted else None
        headers.append(("X-Forwarded-Proto", proto or request.scheme))
        headers.append(("X-Forwarded-Host", host or request.host))
        return headers

    def _body(self) -> tuple[bytes | Iterator[bytes] | None, int | None]:
        """The request body and its length: small bodies as bytes (so a request can be
        resent), anything larger or chunked as a stream, never buffered whole."""
        length = request.content_length
        if length is not None:
            if length == 0:
                return None, None
            if length <= SMALL_BODY:
                return request.stream.read(length), length
            stream = request.stream
            return iter(lambda: stream.read(CHUNK), b""), length
        if "chunked" in (request.headers.get("Transfer-Encoding") or "").lower():
            stream = request.environ["wsgi.input"]
            return iter(lambda: stream.read(CHUNK), b""), None
        return None, None

    def _response(self, upstream: UpstreamResponse, lease: Lease, set_cookie: str | None = None) -> Response:
        target = lease.target
        lookup = {k.lower(): v for k, v in upstream.headers}
        drop = HOP_BY_HOP | {t.strip().lower() for t in lookup.get("connection", "").split(",") if t.strip()}
        headers = [(k, v) for k, v in upstream.headers if k.lower() not in drop]
        headers.append((ROUTE_TARGET, target.id))
        headers.append(("Deploy-Revision", str(target.revision)))
        if set_cookie is not None:
            headers.append(("Set-Cookie", set_cookie))
        status = upstream.status

        if upstream.no_body or (upstream.length is not None and upstream.length <= SMALL_BODY):
            # Small answers are read whole: one write to the client, no generator to drive.
            try:
                body = upstream.read_all()
            except UpstreamBadResponse as exc:
                raise AutoDeployError(errors.UPSTREAM_BAD_RESPONSE, f"{target.id}: {exc}") from None
            except OSError as exc:
                raise AutoDeployError(errors.UPSTREAM_FAILED, f"{target.id}: {exc}") from exc
            finally:
                upstream.release()
            lease.done(ok=status < 500, status=status)
            return Response(body, status=status, headers=headers, direct_passthrough=True)
        return Response(_Body(upstream, lease, status), status=status, headers=headers, direct_passthrough=True)


def create_app(ipc_path: str | None = None, counters_path: str | None = None, control: object | None = None) -> Flask:
    """`control` answers the IPC calls (sync, acquire, status, ...): the controller's socket by
    default, or `gateway.static.StaticControlPlane` for the gateway container of a Pulumi stack."""
    counters_path = counters_path or os.environ["AUTODEPLOY_COUNTERS"]
    acquire_timeout = float(os.environ.get("AUTODEPLOY_QUEUE_TIMEOUT", "300"))
    inflight_path = os.environ.get("AUTODEPLOY_INFLIGHT") or counters_path + ".inflight"
    trusted = tuple(t for t in os.environ.get("AUTODEPLOY_TRUSTED_PROXIES", "").split(",") if t.strip())
    ipc = control if control is not None else IpcClient(ipc_path or os.environ["AUTODEPLOY_IPC"])
    metrics = GatewayMetrics()
    router = Router(ipc, SharedCounters(counters_path), acquire_timeout, SharedInflight(inflight_path), metrics)
    proxy = Proxy(router, connect_timeout=5.0, read_timeout=None, trusted_proxies=trusted,
                  max_tunnels=int(os.environ.get("AUTODEPLOY_MAX_TUNNELS", "48")))
    app = Flask("autodeploy-gateway")
    app.url_map.converters["anypath"] = AnyPath
    app.url_map.merge_slashes = False  # `//x` is the instance's business, not a 308 HTML redirect
    app.config["router"] = router
    hosts_env = os.environ.get("AUTODEPLOY_GATEWAY_HOSTS")
    guard = ApiGuard(ipc, HostPolicy.from_env(hosts_env) if hosts_env else None,
                     enabled=os.environ.get("AUTODEPLOY_AUTH", "on") != "off")

    @app.before_request
    def _guard() -> None:
        path = request.path
        if path.startswith("/api/") or path == "/api" or path == "/metrics":
            checked = guard.check(request.method, path, request.headers, request.content_length,
                                  request.stream.read)
            g.principal, g.body = checked.principal, checked.body

    @app.errorhandler(AutoDeployError)
    def _coded(exc: AutoDeployError) -> Response:
        name = (request.view_args or {}).get("name")
        if name is not None:  # unknown names are not labels: a client could mint endless series
            metrics.gateway_error(name if router.known(name) else "", exc.error.code)
        if request.path.startswith("/d/"):
            return error_response(public_error(exc, name))
        # the operator API: the private detail only for an authenticated principal
        return error_response(exc, private=getattr(g, "principal", None) is not None)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(lambda: ipc.request(Status()).status,
                                       lambda: ipc.request(ColdStarts()).coldstarts), content_type=CONTENT_TYPE)

    @app.route("/d/<name>", methods=METHODS, strict_slashes=False)
    @app.route("/d/<name>/<anypath:path>", methods=METHODS)
    def endpoint(name: str, path: str = "") -> Response:
        return proxy.forward(name, path)

    # werkzeug routes a WebSocket handshake only to rules marked websocket=True (other
    # rules answer 400 to it), so the endpoint is declared for both kinds of request.
    app.add_url_rule("/d/<name>", "endpoint_ws", endpoint, websocket=True, strict_slashes=False)
    app.add_url_rule("/d/<name>/<anypath:path>", "endpoint_ws_path", endpoint, websocket=True)

    @app.get("/api/deployments")
    def deployments() -> Response:
        return _json(ipc.request(Status()).status)

    @app.get("/api/deployments/<name>")
    def deployment(name: str) -> Response:
        return _json(ipc.request(Status(name=name)).status)

    @app.post("/api/deployments/<name>/<action>")
    def action(name: str, action: str) -> Response:
        return _json(ipc.request(Action(name=name, action=action, args=g.body, actor=g.principal.describe())).result)

    @app.get("/api/deployments/<name>/<action>")  # history, rollout, drift (controller.operations)
    def view(name: str, action: str) -> Response:
        return _json(ipc.request(Action(name=name, action=action, args={"read_only": True})).result)

    @app.get("/api/events")
    def events() -> Response:
        try:
            after, limit = int(request.args.get("after", -1)), int(request.args.get("limit", 200))
        except ValueError:
            raise AutoDeployError(errors.BAD_REQUEST, "after and limit must be whole numbers") from None
        return _json(ipc.request(Events(name=request.args.get("deployment") or None, after=after, limit=limit)).events)

    @app.get("/api/drift")
    def drift() -> Response:
        return _json(ipc.request(Action(name="*", action="drift", args={"read_only": True})).result)

    @app.get("/api/git")
    def source() -> Response:  # the desired-state source: repo, branch, live commit, last fetch, events
        return _json(ipc.request(Source()).source)

    @app.post("/api/git/sync")  # operator (controller.auth.required_role)
    def git_sync() -> Response:  # a push hook calls this: poll the branch now, answer when applied
        timeout = g.body.get("timeout", 60)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 120:
            raise AutoDeployError(errors.BAD_REQUEST, f"timeout must be seconds from 0 to 120, got {timeout!r}")
        return _json(ipc.request(Source(sync=True, timeout=float(timeout), actor=g.principal.describe())).source)

    @app.get("/api/tokens")
    def tokens() -> Response:
        return _json(ipc.request(Tokens(do="list")).body)

    @app.post("/api/tokens")
    def token_create() -> Response:
        return _json(ipc.request(Tokens(do="create", name=g.body.get("name"), role=g.body.get("role"),
                                        actor=g.principal.describe())).body)

    @app.post("/api/tokens/revoke")
    def token_revoke() -> Response:
        return _json(ipc.request(Tokens(do="revoke", name=g.body.get("name"), actor=g.principal.describe())).body)

    @app.get("/api/keys")
    def keys() -> Response:
        return _json(ipc.request(Keys(do="list", deployment=request.args.get("deployment"))).body)

    @app.post("/api/keys")
    def key_create() -> Response:
        return _json(ipc.request(Keys(do="create", deployment=g.body.get("deployment"), name=g.body.get("name"),
                                      scale_out=g.body.get("scale_out", False), actor=g.principal.describe())).body)

    @app.post("/api/keys/revoke")
    def key_revoke() -> Response:
        return _json(ipc.request(Keys(do="revoke", deployment=g.body.get("deployment"), name=g.body.get("name"),
                                      actor=g.principal.describe())).body)

    @app.get("/healthz")
    def healthz() -> Response:
        return _json({"ok": True, "synced": router.wait_synced(0)})

    register_ui(app, ipc)  # the dashboard at /ui/ (gateway/ui)

    @app.errorhandler(404)
    def _not_found(_exc: Exception) -> Response:
        return error_response(AutoDeployError(errors.NO_SUCH_PATH, f"{request.path}; deployments are served"
                                              " under /d/<name>/ and the API under /api/deployments"))

    # No HTML error page ever: whatever Flask or a bug would answer becomes the coded JSON.
    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if exc.code == 405:
            allowed = ", ".join(sorted(exc.valid_methods or ())) if isinstance(exc, MethodNotAllowed) else ""
            resp = error_response(AutoDeployError(errors.METHOD_NOT_ALLOWED, f"{request.method} {request.path}"
                                                  + (f"; allowed: {allowed}" if allowed else "")))
            if allowed:
                resp.headers["Allow"] = allowed
            return resp
        return error_response(AutoDeployError(errors.BAD_REQUEST, f"{exc.code} {exc.name}: {exc.description}"))

    @app.errorhandler(Exception)
    def _bug(exc: Exception) -> Response:
        log.exception("gateway error on %s %s", request.method, request.path)
        return error_response(AutoDeployError(errors.GATEWAY_INTERNAL, f"{type(exc).__name__}: {exc}"))

    return app


def _json(data: object) -> Response:
    return Response(_json_bytes(data), mimetype="application/json")
