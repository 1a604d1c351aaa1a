#!/usr/bin/env python3
"""A WebSocket model stand-in (a realtime speech or chat API in miniature), on the
`websockets` library's threaded server.

  WS  /echo                          every message comes back as sent (text or binary)
  WS  /whoami                        one text message: {"instance": ..., "path": ...}, then echo
  WS  /close?code=4001&reason=bye    echo one message, then the server closes with that code
  WS  /push?n=3                      the server sends n messages, then closes (1000)
  GET /health                        200 "ok" (plain HTTP: readiness and health checks)
"""
from __future__ import annotations

import argparse
import json
import os
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.sync.server import Request, Response, ServerConnection, serve

INSTANCE = os.environ.get("AUTODEPLOY_INSTANCE_ID", "local")
MAX_MESSAGE = 16 * 1024 * 1024


def health(connection: ServerConnection, request: Request) -> Response | None:
    if urlsplit(request.path).path == "/health":
        return connection.respond(HTTPStatus.OK, "ok\n")
    return None  # everything else must be a WebSocket handshake


def handler(ws: ServerConnection) -> None:
    assert ws.request is not None
    url = urlsplit(ws.request.path)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    if url.path == "/push":
        for i in range(int(query.get("n", 3))):
            ws.send(f"push {i}")
        ws.close(1000, "pushed")
        return
    if url.path == "/whoami":
        ws.send(json.dumps({"instance": INSTANCE, "path": url.path,
                            "route_target": ws.request.headers.get("Deploy-Route-Target")}))
    if url.path == "/close":
        ws.send(ws.recv())
        ws.close(int(query.get("code", 4001)), query.get("reason", "bye"))
        return
    for message in ws:
        ws.send(message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    with serve(handler, args.host, args.port, process_request=health, max_size=MAX_MESSAGE,
               compression=None, ping_interval=None) as server:
        print(f"websocket echo {INSTANCE} listening on {args.host}:{args.port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
