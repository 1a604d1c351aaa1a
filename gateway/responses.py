"""Coded errors as HTTP responses: one shape for the API, the endpoints and the dashboard."""
from __future__ import annotations

import json

from flask import Response

from controller.errors import AutoDeployError


def error_response(exc: AutoDeployError, private: bool = False) -> Response:
    """`private`: add the error's operator-only detail (only for an authenticated principal)."""
    resp = Response(json_bytes(exc.to_json(private=private)), status=exc.error.http_status, mimetype="application/json")
    if exc.error.http_status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="autodeploy"'
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, int(round(exc.retry_after + 0.499))))
    return resp


def json_bytes(data: object) -> bytes:
    return json.dumps(data).encode()
