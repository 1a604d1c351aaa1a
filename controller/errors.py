"""Every error a user can see, with its code. The README's error table is generated from this."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    code: int
    http_status: int
    msg: str
    fix: str  # what the user should change; shown in the README table


UNKNOWN_DEPLOYMENT = ErrorCode(1001, 404, "deployment not found",
                               "Check the name in the URL against `autodeploy status`.")
DEPLOYMENT_STOPPED = ErrorCode(1002, 503, "deployment stopped",
                               "Start it: `autodeploy start NAME` or set `spec.state: running`.")
INSTANCE_START_FAILED = ErrorCode(1003, 502, "instance failed to start",
                                  "Read its log (`autodeploy logs NAME`, or the events in `autodeploy status NAME`); "
                                  "fix `spec.command` or the image.")
QUEUE_FULL = ErrorCode(1004, 503, "cold start queue full",
                       "Retry after the Retry-After seconds, or raise maxReplicas.")
START_TIMEOUT = ErrorCode(1005, 504, "timed out waiting for an instance",
                          "Retry later; raise the start timeout if the model loads slowly.")
ROUTE_TARGET_NOT_FOUND = ErrorCode(1006, 404, "route target not found",
                                   "Use a running instance id from Deploy-Route-Target, or drop the header.")
REPLICA_QUOTA_EXCEEDED = ErrorCode(1007, 429, "deployment replica quota exceeded",
                                   "Wait for an instance to be released, or raise maxReplicas.")
UPSTREAM_FAILED = ErrorCode(1008, 502, "instance connection failed",
                            "The instance closed the connection; check its log (`autodeploy logs NAME`).")
NO_FREE_GPU = ErrorCode(1009, 503, "no free GPU for this deployment",
                        "Free a GPU, lower gpu.count, or declare more GPUs in the stack config.")
IMAGE_MISSING = ErrorCode(1010, 502, "image not found on the Docker engine",
                          "Build or load the image (`docker build -t IMAGE .` or `docker load`); nothing is pulled.")
CONTROLLER_UNAVAILABLE = ErrorCode(1011, 503, "controller unavailable",
                                   "The gateway lost its controller; restart `autodeploy serve`.")
SHUTTING_DOWN = ErrorCode(1012, 503, "gateway shutting down", "Retry against the restarted gateway.")
BAD_REQUEST = ErrorCode(1013, 400, "bad request", "Fix the request as the message says.")
SPEC_INVALID = ErrorCode(1014, 422, "deployment spec invalid",
                         "Fix the FILE:LINE errors listed; the last good revision keeps serving.")
DRIVER_FAILED = ErrorCode(1015, 502, "driver error", "Read the message; check the Docker engine or Pulumi stack.")
REVISION_NOT_FOUND = ErrorCode(1016, 404, "revision not found",
                               "Pick a revision number listed by `autodeploy history NAME`.")
CONFIRMATION_REQUIRED = ErrorCode(1017, 409, "confirmation required",
                                  "Deleting cannot be undone: pass --yes (CLI) or {\"yes\": true} (HTTP API).")
REPLICAS_OUT_OF_RANGE = ErrorCode(1018, 422, "replicas out of range",
                                  "Scale to a count from 0 to maxReplicas, or raise spec.scaling.maxReplicas "
                                  "in the file.")
UNKNOWN_ACTION = ErrorCode(1019, 404, "unknown deployment action",
                           "Use scale, stop, start, delete, rollback (POST) or history, rollout, drift (GET).")
NO_SUCH_PATH = ErrorCode(1020, 404, "no such path on the gateway",
                         "Deployments are served under /d/<name>/, the API under /api/deployments.")
AUTH_REQUIRED = ErrorCode(1030, 401, "authentication required",
                          "Send `Authorization: Bearer <token>`; the CLI reads <state-dir>/admin.token on the serve "
                          "machine, elsewhere set AUTODEPLOY_TOKEN (`autodeploy token create`).")
TOKEN_INVALID = ErrorCode(1031, 401, "invalid token",
                          "The token is unknown or revoked; ask an admin for a new one (`autodeploy token create`).")
FORBIDDEN = ErrorCode(1032, 403, "permission denied",
                      "Use a token whose role allows this: viewer reads, operator also scales, stops, starts "
                      "and rolls back, admin also deletes and manages tokens and keys.")
JSON_REQUIRED = ErrorCode(1033, 415, "JSON object body required",
                          "POST with `Content-Type: application/json` and a JSON object body, e.g. `{}`.")
CROSS_SITE = ErrorCode(1034, 403, "cross-site request refused",
                       "Call the API from the gateway's own address; list other names the gateway is reached by "
                       "in autodeploy:gatewayHosts.")
KEY_REQUIRED = ErrorCode(1035, 401, "endpoint key required",
                         "This deployment is private: send `Authorization: Bearer <key>` with a key of it "
                         "(`autodeploy key create NAME`); revoked keys stop working at once.")
KEY_FORBIDDEN = ErrorCode(1036, 403, "endpoint key not allowed",
                          "`Deploy-Route-Rule: scale-out` starts instances: it needs a key created with --scale-out.")
CREDENTIAL_NOT_FOUND = ErrorCode(1037, 404, "token or key not found",
                                 "Pick a name listed by `autodeploy token list` or `autodeploy key list`.")
NAME_TAKEN = ErrorCode(1038, 409, "name already in use",
                       "Revoke the existing token or key first, or choose another --name.")
# Issue 13: several nodes (1040-1049).
NO_NODE = ErrorCode(1040, 503, "no node can run this instance",
                    "Bring a node back (`autodeploy nodes` says why it is down), relax "
                    "spec.placement.nodeSelector, or add a node to autodeploy:nodes.")
NODE_UNREACHABLE = ErrorCode(1041, 502, "node unreachable",
                             "Check the node's Docker engine and its dockerHost; `autodeploy nodes` shows the last error.")
GIT_NOT_CONFIGURED = ErrorCode(1060, 409, "serve is not following a git repository",
                               "Start serve with --git-repo URL, or set autodeploy:git in the stack config.")
GIT_FETCH_FAILED = ErrorCode(1061, 502, "git fetch failed",
                             "Check the repository URL, the network and the credentials; the last good commit "
                             "keeps serving and the fetch is retried with backoff.")
GIT_COMMIT_REFUSED = ErrorCode(1062, 422, "git commit refused",
                               "Fix the FILE:LINE errors and push a new commit (or a revert); the last good "
                               "commit keeps serving.")
GIT_SYNC_TIMEOUT = ErrorCode(1063, 504, "git sync still running",
                             "The poll goes on in the background; read the source's state with "
                             "`autodeploy status`.")
REQUEST_TIMEOUT = ErrorCode(1021, 504, "instance did not answer in time",
                            "It sent no response headers within spec.requestTimeout (default 300s): raise it "
                            "for slow models, or read the instance's log (`autodeploy logs NAME`).")
UPSTREAM_BAD_RESPONSE = ErrorCode(1022, 502, "instance sent an invalid HTTP response",
                                  "The process on the instance's port does not speak HTTP/1.1 as it should; "
                                  "check spec.port and the server's log.")
GATEWAY_INTERNAL = ErrorCode(1023, 500, "gateway internal error",
                             "A gateway bug: the message names it; report it with the serve log.")
METHOD_NOT_ALLOWED = ErrorCode(1024, 405, "method not allowed", "Use a method this path accepts (the message lists them).")

# Issue 18: the haproxy data plane (gateway/haproxy_*.py); HAProxy's own errors are these.
UPSTREAM_TIMEOUT = ErrorCode(1080, 504, "instance did not answer in time",
                             "The instance sent no response within spec.requestTimeout; check its log or raise "
                             "the timeout.")
CLIENT_TIMEOUT = ErrorCode(1081, 408, "request not received in time",
                           "Send the whole request head promptly; the gateway drops slow clients.")
DATA_PLANE_OVERLOADED = ErrorCode(1082, 503, "proxy has no free slot",
                                  "Retry later, or raise the data plane's maxconn.")
DATA_PLANE_ERROR = ErrorCode(1083, 500, "proxy internal error", "Read the HAProxy log in the state directory.")
DATA_PLANE_UNAVAILABLE = ErrorCode(1084, 503, "data plane unavailable",
                                   "Install haproxy >= 2.6 (`apt-get install haproxy`) or use --data-plane python.")
DATA_PLANE_COMMAND_FAILED = ErrorCode(1085, 502, "data plane command failed",
                                      "Read the message (HAProxy's Runtime API answer); `serve -v` logs each command.")
# Issue 14: the dashboard, its login and instance views.
INSTANCE_NOT_FOUND = ErrorCode(1050, 404, "instance not found",
                               "Pick an instance id listed by `autodeploy status NAME`; it may have been released.")
LOGIN_REQUIRED = ErrorCode(1051, 401, "login required",
                           "Open /ui/login?token=YOUR_TOKEN once; the browser keeps a session cookie.")
OPERATOR_REQUIRED = ErrorCode(1052, 403, "operator role required",
                              "Log in with an operator token to scale, stop, start or roll back.")
CSRF_FAILED = ErrorCode(1053, 403, "CSRF token missing or wrong",
                        "Reload the dashboard page and press the button again.")
# Streaming protocols (gateway/tunnel.py): 1070-1079.
PROTOCOL_NOT_CARRIED = ErrorCode(1070, 501, "protocol not carried by the python data plane",
                                 "h2c and gRPC deployments need `autodeploy serve --data-plane haproxy`; python "
                                 "mode carries HTTP/1.1, server-sent events and WebSocket.")
TUNNEL_LIMIT = ErrorCode(1071, 503, "too many open WebSocket tunnels on this gateway worker",
                         "Retry after the Retry-After seconds, run more gateway workers (`--workers`), or "
                         "use the haproxy data plane.")
TUNNEL_UNSUPPORTED = ErrorCode(1072, 501, "this gateway server cannot hand over the connection",
                               "WebSocket needs the gunicorn gateway of `autodeploy serve` (it hands the "
                               "client socket to the tunnel); use it or the haproxy data plane.")

ALL: tuple[ErrorCode, ...] = tuple(v for v in list(globals().values()) if isinstance(v, ErrorCode))
BY_CODE: dict[int, ErrorCode] = {e.code: e for e in ALL}


class AutoDeployError(Exception):
    """An error with a code from the table; `detail` extends the message.

    `private_detail` is operator-only text (an instance's log tail, the last failure):
    the operator API, the CLI, the dashboard and the events show it after the message;
    endpoint clients (/d/<name>/...) never get it (gateway.app.public_error)."""

    def __init__(self, error: ErrorCode, detail: str = "", retry_after: float | None = None,
                 private_detail: str | None = None) -> None:
        self.error = error
        self.detail = detail
        self.retry_after = retry_after
        self.private_detail = private_detail or None
        super().__init__(self.operator_message)

    @property
    def message(self) -> str:
        """The public message: code text and detail, never the private detail."""
        return f"{self.error.msg}: {self.detail}" if self.detail else self.error.msg

    @property
    def operator_message(self) -> str:
        """The message with the private detail after it: for operators (API, CLI, events, logs)."""
        return f"{self.message}; {self.private_detail}" if self.private_detail else self.message

    def to_json(self, private: bool = False) -> dict:
        """The wire form. `private`: add the operator-only text as its own key (IPC, and the
        operator API for an authenticated principal); never for endpoint clients."""
        out: dict = {"code": self.error.code, "msg": self.message}
        if private and self.private_detail:
            out["private_detail"] = self.private_detail
        return out

    @classmethod
    def from_json(cls, data: dict, retry_after: float | None = None) -> "AutoDeployError":
        err = BY_CODE.get(int(data["code"]), DRIVER_FAILED)
        msg = str(data.get("msg", ""))
        detail = msg[len(err.msg) + 2:] if msg.startswith(err.msg + ": ") else ("" if msg == err.msg else msg)
        private = data.get("private_detail")
        return cls(err, detail, retry_after, private if isinstance(private, str) and private else None)


def markdown_table() -> str:
    """The README's error table: `python -m controller.errors` prints it."""
    rows = ["| code | HTTP | message | what to do |", "|---|---|---|---|"]
    rows += [f"| {e.code} | {e.http_status} | {e.msg} | {e.fix} |" for e in sorted(ALL, key=lambda e: e.code)]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
