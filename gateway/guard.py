"""The control API's door: Host/Origin, bearer token, role and the shape of a POST.

Runs before every `/api/...` and `/metrics` request. Credentials come only from the
`Authorization` header (never cookies), so a browser cannot attach them to a
cross-site request; a POST must be `application/json` with a JSON object body, which a
plain HTML form or a `text/plain` fetch cannot send without a CORS preflight that we
never answer. The token is hashed here; only its hash goes to the controller.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from controller import errors
from controller.auth import HostPolicy, Principal, allowed, bearer, digest, required_role
from controller.contracts import Auth
from controller.errors import AutoDeployError

log = logging.getLogger("autodeploy.gateway")

MAX_API_BODY = 64 * 1024
MUTATING = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Checked:
    principal: Principal
    body: dict


class ApiGuard:
    def __init__(self, control: Any, hosts: HostPolicy | None, enabled: bool = True) -> None:
        self.control = control
        self.hosts = hosts
        self.enabled = enabled

    def check(self, method: str, path: str, headers: Any, content_length: int | None,
              read_body: Any) -> Checked:
        """Raises the coded error that refuses the request, else who is calling and the body."""
        self._same_site(headers)
        principal = self._principal(headers)
        needed = required_role(method, path)
        if not allowed(principal.role, needed):
            raise AutoDeployError(errors.FORBIDDEN, f"{method} {path} needs the {needed} role; "
                                  f"{principal.describe()} has {principal.role}")
        body: dict = {}
        if method in MUTATING:
            body = self._json_body(headers, content_length, read_body)
        return Checked(principal, body)

    def _same_site(self, headers: Any) -> None:
        if self.hosts is not None and not self.hosts.host_ok(headers.get("Host")):
            raise AutoDeployError(errors.CROSS_SITE, f"Host {headers.get('Host')!r} is not this gateway's address")
        origin = headers.get("Origin")
        if origin is not None and (self.hosts is None or not self.hosts.origin_ok(origin)):
            raise AutoDeployError(errors.CROSS_SITE, f"Origin {origin!r} is not this gateway")
        if (headers.get("Sec-Fetch-Site") or "").lower() == "cross-site":
            raise AutoDeployError(errors.CROSS_SITE, "the browser marked this request cross-site")

    def _principal(self, headers: Any) -> Principal:
        if not self.enabled:
            return Principal("anonymous", "admin")  # --insecure-no-auth (loopback only)
        raw = headers.get("Authorization")
        token = bearer(raw)
        if token is None:
            detail = "no Authorization header" if raw is None else "Authorization must be `Bearer <token>`"
            raise AutoDeployError(errors.AUTH_REQUIRED, detail)
        found = self.control.request(Auth(hash=digest(token))).principal
        if found is None:
            raise AutoDeployError(errors.TOKEN_INVALID, "unknown or revoked token")
        return Principal(found.name, found.role)

    @staticmethod
    def _json_body(headers: Any, content_length: int | None, read_body: Any) -> dict:
        ctype = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise AutoDeployError(errors.JSON_REQUIRED, f"Content-Type is {ctype or 'missing'!r}")
        if content_length is not None and content_length > MAX_API_BODY:
            raise AutoDeployError(errors.BAD_REQUEST, f"body of {content_length} bytes; at most {MAX_API_BODY}")
        raw = read_body(content_length if content_length is not None else MAX_API_BODY + 1) or b""
        if len(raw) > MAX_API_BODY:
            raise AutoDeployError(errors.BAD_REQUEST, f"body over {MAX_API_BODY} bytes")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise AutoDeployError(errors.BAD_REQUEST, f"the body is not JSON ({exc}); send an object such as "
                                                      '{"replicas": 2}') from None
        if not isinstance(body, dict):
            raise AutoDeployError(errors.BAD_REQUEST, f"the body must be a JSON object such as {{\"replicas\": 2}}, "
                                                      f"not {type(body).__name__}")
        return body
