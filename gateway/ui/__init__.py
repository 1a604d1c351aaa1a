"""The dashboard at `/ui/`: server-rendered HTML, a little JavaScript that refreshes the
live parts every few seconds, SVG charts drawn here. No front-end build step.

Pages read the controller's status over the gateway's IPC, like the API does.
Actions (scale, stop, start, rollback) need a session with the operator role and the
session's CSRF token (`gateway.ui.session`).
"""
from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import quote

from flask import Blueprint, Flask, Response, redirect, render_template, request

from controller import errors
from controller.contracts import Action, Logs, Status
from controller.errors import AutoDeployError
from controller.humantime import ago, duration
from controller.policy.status import brief_error
from gateway.responses import error_response
from gateway.ui.charts import history_charts
from gateway.ui.session import COOKIE, ControlTokens, Session, Sessions, TokenVerifier

ACTIONS = ("scale", "stop", "start", "rollback")
REFRESH_MS = 2000
LOG_LINES = 200


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} ms" if v >= 100 else f"{v:.3g} ms"


def _gpu(dep: dict) -> str:
    g = dep["resources"]["gpu"]
    return f"{g['count']} x {g.get('type') or 'GPU'}" if g.get("count") else "-"


def _node(inst: dict) -> str:
    if inst.get("node"):
        return str(inst["node"])
    if inst.get("container_id"):
        return f"container {inst['container_id'][:12]}"
    return f"pid {inst['pid']}" if inst.get("pid") else "-"


def register(app: Flask, ipc: Any, verifier: TokenVerifier | None = None, sessions: Sessions | None = None) -> None:
    tokens = verifier if verifier is not None else ControlTokens(ipc)
    signer = sessions or Sessions.from_env()
    bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static",
                   static_url_path="/static")
    # `serve --insecure-no-auth` (loopback only): the API lets everyone act, so does the dashboard.
    login_needed = os.environ.get("AUTODEPLOY_AUTH", "on") != "off"
    open_session = Session("admin", "no-auth", float("inf"), "anonymous")

    def session() -> Session | None:
        found = signer.read(request.cookies.get(COOKIE), time.time())
        return found if found is not None or login_needed else open_session

    def viewer() -> Session | None:
        """The session, or raise 1051 when the dashboard needs a login to be read."""
        s = session()
        if s is None and login_needed:
            raise AutoDeployError(errors.LOGIN_REQUIRED, "open /ui/login?token=YOUR_TOKEN")
        return s

    def page(template: str, **kw: Any) -> str:
        s = session()
        now = time.time()
        return render_template(template, session=s, brief=brief_error, csrf=signer.csrf(s) if s else "", now=now, ago=ago,
                               duration=duration, ms=_ms, gpu=_gpu, node=_node, refresh_ms=REFRESH_MS,
                               login_needed=login_needed, **kw)

    @bp.errorhandler(AutoDeployError)
    def _coded(exc: AutoDeployError) -> Any:
        if exc.error is errors.LOGIN_REQUIRED and request.method == "GET" and not request.args.get("fragment"):
            return Response(page("ui_login.html", error=None), status=401)
        return error_response(exc, private=signer.read(request.cookies.get(COOKIE), time.time()) is not None)

    @bp.get("/login")
    def login() -> Any:
        token = request.args.get("token", "")
        if not token:
            return page("ui_login.html", error=None)
        found = tokens.principal(token)
        if found is None:
            return Response(page("ui_login.html", error="That token is not known (or was revoked)."), status=401)
        name, role = found
        resp = redirect("/ui/", code=303)
        resp.set_cookie(COOKIE, signer.issue(role, time.time(), name), max_age=int(signer.ttl_s), path="/ui",
                        httponly=True, samesite="Strict", secure=request.is_secure)
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Referrer-Policy"] = "no-referrer"  # the token was in this URL
        return resp

    @bp.post("/logout")
    def logout() -> Any:
        s = session()
        if s is not None and not signer.csrf_ok(s, request.form.get("csrf")):
            raise AutoDeployError(errors.CSRF_FAILED)
        resp = redirect("/ui/login", code=303)
        resp.delete_cookie(COOKIE, path="/ui")
        return resp

    @bp.get("/")
    def deployments() -> Any:
        viewer()
        data = ipc.request(Status()).status
        if request.args.get("fragment"):
            return render_template("ui_list_rows.html", data=data, now=time.time(), ms=_ms, gpu=_gpu,
                                   brief=brief_error)
        return page("ui_list.html", data=data)

    @bp.get("/d/<name>")
    def deployment(name: str) -> Any:
        viewer()
        dep = ipc.request(Status(name=name)).status
        now = time.time()
        latency_svg, rate_svg = history_charts(dep.get("history") or [], now)
        kw = dict(dep=dep, latency_svg=latency_svg, rate_svg=rate_svg)
        if request.args.get("fragment"):
            return page("ui_deployment_live.html", **kw)
        return page("ui_deployment.html", notice=request.args.get("done"), error=request.args.get("error"), **kw)

    @bp.get("/d/<name>/logs/<instance>")
    def logs(name: str, instance: str) -> Response:
        viewer()
        got = ipc.request(Logs(name=name, instance=instance, lines=LOG_LINES)).logs
        return Response(got["text"], mimetype="text/plain")

    @bp.post("/d/<name>/<action>")
    def act(name: str, action: str) -> Any:
        if action not in ACTIONS:
            raise AutoDeployError(errors.UNKNOWN_ACTION, f"{action!r}: the dashboard can {', '.join(ACTIONS)}")
        s = session()
        if s is None:
            raise AutoDeployError(errors.LOGIN_REQUIRED, "open /ui/login?token=YOUR_TOKEN")
        if not signer.csrf_ok(s, request.form.get("csrf")):
            raise AutoDeployError(errors.CSRF_FAILED)
        if not s.can_act:
            raise AutoDeployError(errors.OPERATOR_REQUIRED, f"this session's role is {s.role}")
        args: dict[str, Any] = {}
        try:
            if action == "scale":
                args["replicas"] = int(request.form.get("replicas", ""))
            if action == "rollback" and request.form.get("to"):
                args["to"] = int(request.form["to"])
        except ValueError:
            return redirect(f"/ui/d/{quote(name)}?error=" + quote("the count must be a whole number"), code=303)
        try:
            result = ipc.request(Action(name=name, action=action, args=args, actor=s.describe())).result
        except AutoDeployError as exc:
            if exc.error in (errors.UNKNOWN_DEPLOYMENT,):
                raise
            return redirect(f"/ui/d/{quote(name)}?error=" + quote(f"error {exc.error.code}: {exc.operator_message}"),
                            code=303)
        return redirect(f"/ui/d/{quote(name)}?done=" + quote(str(result.get("message", action))), code=303)

    @bp.after_request
    def _headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                "frame-ancestors 'none'; form-action 'self'")
        return resp

    app.register_blueprint(bp)

    @app.get("/ui")
    def _ui_root() -> Any:
        return redirect("/ui/", code=308)
