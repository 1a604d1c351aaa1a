"""gunicorn entry point: `gunicorn gateway.wsgi:app` (configured by `autodeploy serve`)."""
import ipaddress
import os
from typing import Any, Callable, Iterable

from gateway.app import create_app

app = create_app()


class PeerFromProxy:
    """Haproxy mode: the activator is reached only through HAProxy on loopback, which puts
    the client's address in a header of its own (and strips it from what clients send);
    that address becomes REMOTE_ADDR, so X-Forwarded-For and ip-hash see the real client."""

    def __init__(self, wsgi: Callable, header: str, proto_header: str = "X-Autodeploy-Proto") -> None:
        self.wsgi = wsgi
        self.key = "HTTP_" + header.upper().replace("-", "_")
        self.proto_key = "HTTP_" + proto_header.upper().replace("-", "_")  # HAProxy terminated TLS

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[Any]:
        peer = environ.pop(self.key, None)
        proto = environ.pop(self.proto_key, None)
        if proto == "https" and _loopback(environ.get("REMOTE_ADDR", "")):
            environ["wsgi.url_scheme"] = "https"
        if peer:
            try:
                loopback = ipaddress.ip_address(environ.get("REMOTE_ADDR", "")).is_loopback
            except ValueError:
                loopback = False
            if loopback:
                environ["REMOTE_ADDR"] = peer.strip()
        return self.wsgi(environ, start_response)


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


if os.environ.get("AUTODEPLOY_PEER_HEADER"):
    app.wsgi_app = PeerFromProxy(app.wsgi_app, os.environ["AUTODEPLOY_PEER_HEADER"])  # type: ignore[method-assign]
