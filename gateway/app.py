"""The gateway: `ANY /d/<name>/<path>` proxies to an instance; `/api/...` is the status API."""
from __future__ import annotations

import logging
import os
import time
from typing import Iterator

import urllib3
from flask import Flask, Response, request
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError

from controller import errors
from controller.errors import AutoDeployError
from controller.ipc import IpcClient
from controller.policy.balance import client_ip
from controller.policy.capacity import RANDOM, ROUND_ROBIN, SCALE_OUT
from gateway.balancer import RequestKey, cookie_name
from gateway.counters import SharedCounters
from gateway.inflight import SharedInflight
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.outliers import CONNECT_FAILED, RESET, retry_allowed
from gateway.routing import Router, Target

log = logging.getLogger("autodeploy.gateway")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
ROUTE_RULE = "Deploy-Route-Rule"
ROUTE_TARGET = "Deploy-Route-Target"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
CHUNK = 64 * 1024


def error_response(exc: AutoDeployError) -> Response:
    resp = Response(_json_bytes(exc.to_json()), status=exc.error.http_status, mimetype="application/json")
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, int(round(exc.retry_after + 0.499))))
    return resp


def _json_bytes(data: object) -> bytes:
    import json
    return json.dumps(data).encode()


def _hop_by_hop(headers: "object") -> set[str]:
    extra = {t.strip().lower() for t in (headers.get("Connection") or "").split(",") if t.strip()}  # type: ignore[attr-defined]
    return HOP_BY_HOP | extra


class Proxy:
    def __init__(self, router: Router, connect_timeout: float, read_timeout: float | None,
                 trusted_proxies: tuple[str, ...] = ()) -> None:
        self.router = router
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.trusted_proxies = trusted_proxies
        self._pools: dict[tuple[str, int], urllib3.HTTPConnectionPool] = {}

    def _pool(self, target: Target) -> urllib3.HTTPConnectionPool:
        key = (target.host, target.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = urllib3.HTTPConnectionPool(target.host, target.port, maxsize=64, block=False,
                                              timeout=self.timeout, retries=False)
            self._pools[key] = pool
        return pool

    def forward(self, name: str, path: str) -> Response:
        started = time.monotonic()
        header = request.headers.get(ROUTE_RULE) or None
        rule = header.strip().lower() if header else None
        cookie = cookie_name(name)
        key = RequestKey(client_ip(request.remote_addr or "", request.headers.get("X-Forwarded-For"),
                                   self.trusted_proxies), request.cookies.get(cookie))
        target = self.router.acquire(name, rule, key)
        headers = self._upstream_headers()
        body, chunked = self._body()
        url = "/" + path + (("?" + request.query_string.decode("latin-1")) if request.query_string else "")
        pinned = rule is not None and rule not in (RANDOM, ROUND_ROBIN, SCALE_OUT)
        attempt, tried = 1, {target.id}
        while True:
            try:
                upstream = self._send(target, url, headers, body, chunked)
                break
            except (NewConnectionError, ConnectTimeoutError) as exc:
                # Nothing reached the instance: it died or is being released.
                self.router.unreachable(target)
                if pinned:
                    raise AutoDeployError(errors.ROUTE_TARGET_NOT_FOUND, f"instance {target.id} is gone") from None
                failure, replayable, error = CONNECT_FAILED, True, exc
            except (HTTPError, OSError) as exc:
                self.router.done(target, ok=False, started=started)
                if self.router.metrics is not None:
                    self.router.metrics.upstream_failure(name, target.id, "reset")
                # A reset before any response byte (ProtocolError) may be resent; anything else is final.
                failure, replayable, error = (RESET if isinstance(exc, ProtocolError) else "other"), body is None, exc
            if pinned or not retry_allowed(request.method, failure, replayable, attempt):
                raise AutoDeployError(errors.UPSTREAM_FAILED, f"{target.id}: {error}") from error
            if self.router.metrics is not None:
                self.router.metrics.retried(name, failure)
            attempt += 1
            target = self.router.acquire(name, rule if rule in (RANDOM, ROUND_ROBIN) else None, key,
                                         avoid=frozenset(tried))
            tried.add(target.id)
        set_cookie = None
        # Only the algorithm's own picks pin a client: a route rule is a one-off override.
        if rule is None and key.cookie != target.id and self.router.sticky(name):
            set_cookie = f"{cookie}={target.id}; Path=/d/{name}; HttpOnly; SameSite=Lax"
        return self._response(upstream, target, started, set_cookie)

    def _send(self, target: Target, url: str, headers: dict, body: object, chunked: bool) -> urllib3.HTTPResponse:
        return self._pool(target).urlopen(request.method, url, body=body, headers=headers, chunked=chunked,
                                          preload_content=False, decode_content=False, redirect=False,
                                          retries=False, assert_same_host=False)

    def _upstream_headers(self) -> dict[str, str]:
        drop = _hop_by_hop(request.headers) | {"host", ROUTE_RULE.lower(), "content-length"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        prior = request.headers.get("X-Forwarded-For")
        client = request.remote_addr or ""
        headers["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
        headers["X-Forwarded-Proto"] = request.headers.get("X-Forwarded-Proto", request.scheme)
        headers["X-Forwarded-Host"] = request.headers.get("X-Forwarded-Host", request.host)
        return headers

    def _body(self) -> tuple[object, bool]:
        """The request body as a stream: never buffered, whatever its size."""
        if request.content_length is not None:
            return (request.stream if request.content_length else None), False
        if "chunked" in (request.headers.get("Transfer-Encoding") or "").lower():
            stream = request.environ["wsgi.input"]
            return iter(lambda: stream.read(CHUNK), b""), True
        return None, False

    def _response(self, upstream: urllib3.HTTPResponse, target: Target, started: float,
                  set_cookie: str | None = None) -> Response:
        drop = _hop_by_hop(upstream.headers)
        headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in drop]
        headers.append((ROUTE_TARGET, target.id))
        headers.append(("Deploy-Revision", str(target.revision)))
        if set_cookie is not None:
            headers.append(("Set-Cookie", set_cookie))
        router = self.router
        status = upstream.status

        def stream() -> Iterator[bytes]:
            ok = False
            try:
                if upstream.chunked:
                    yield from upstream.read_chunked(decode_content=False)
                else:
                    while True:
                        data = upstream.read1(CHUNK)
                        if not data:
                            break
                        yield data
                ok = upstream.status < 500
            except (ProtocolError, OSError) as exc:
                log.warning("upstream %s broke mid-response: %s", target.id, exc)
            finally:
                upstream.release_conn()
                router.done(target, ok=ok, status=status, started=started)

        body = b"" if request.method == "HEAD" else stream()
        if request.method == "HEAD":
            upstream.release_conn()
            router.done(target, ok=status < 500, status=status, started=started)
        resp = Response(body, status=upstream.status, headers=headers, direct_passthrough=True)
        return resp


def create_app(ipc_path: str | None = None, counters_path: str | None = None) -> Flask:
    ipc_path = ipc_path or os.environ["AUTODEPLOY_IPC"]
    counters_path = counters_path or os.environ["AUTODEPLOY_COUNTERS"]
    acquire_timeout = float(os.environ.get("AUTODEPLOY_QUEUE_TIMEOUT", "300"))
    inflight_path = os.environ.get("AUTODEPLOY_INFLIGHT") or counters_path + ".inflight"
    trusted = tuple(t for t in os.environ.get("AUTODEPLOY_TRUSTED_PROXIES", "").split(",") if t.strip())
    ipc = IpcClient(ipc_path)
    metrics = GatewayMetrics()
    router = Router(ipc, SharedCounters(counters_path), acquire_timeout, SharedInflight(inflight_path), metrics)
    proxy = Proxy(router, connect_timeout=5.0, read_timeout=None, trusted_proxies=trusted)
    app = Flask("autodeploy-gateway")
    app.config["router"] = router

    @app.errorhandler(AutoDeployError)
    def _coded(exc: AutoDeployError) -> Response:
        name = (request.view_args or {}).get("name")
        if name is not None:  # unknown names are not labels: a client could mint endless series
            metrics.gateway_error(name if router.known(name) else "", exc.error.code)
        return error_response(exc)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(lambda: ipc.call("status")["status"]), content_type=CONTENT_TYPE)

    @app.route("/d/<name>", methods=METHODS, strict_slashes=False)
    @app.route("/d/<name>/<path:path>", methods=METHODS)
    def endpoint(name: str, path: str = "") -> Response:
        return proxy.forward(name, path)

    @app.get("/api/deployments")
    def deployments() -> Response:
        return _json(ipc.call("status")["status"])

    @app.get("/api/deployments/<name>")
    def deployment(name: str) -> Response:
        return _json(ipc.call("status", name=name)["status"])

    @app.post("/api/deployments/<name>/<action>")
    def action(name: str, action: str) -> Response:
        args = request.get_json(silent=True) or {}
        return _json(ipc.call("action", name=name, action=action, args=args)["result"])

    @app.get("/api/deployments/<name>/<action>")  # history, rollout, drift (controller.operations)
    def view(name: str, action: str) -> Response:
        return _json(ipc.call("action", name=name, action=action, args={"read_only": True})["result"])

    @app.get("/api/drift")
    def drift() -> Response:
        return _json(ipc.call("action", name="*", action="drift", args={"read_only": True})["result"])

    @app.get("/healthz")
    def healthz() -> Response:
        return _json({"ok": True, "synced": router.wait_synced(0)})

    @app.errorhandler(404)
    def _not_found(_exc: Exception) -> Response:
        return error_response(AutoDeployError(errors.BAD_REQUEST, f"no route {request.path}; deployments are"
                                              " served under /d/<name>/ and the API under /api/deployments"))

    return app


def _json(data: object) -> Response:
    return Response(_json_bytes(data), mimetype="application/json")
