"""How the CLI finds its state dir and API token, and `autodeploy token|key ...`.

The state dir is found the way `serve` finds it: `--state-dir`, else the stack config's
`autodeploy:stateDir` (default `.state`) under `--project-dir`. The token is
`$AUTODEPLOY_TOKEN`, else, for a gateway on this machine (a loopback `--url`),
`<state-dir>/admin.token`: the local admin token is never sent to another host.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from controller import auth
from controller.errors import AutoDeployError
from controller.humantime import ago

TOKEN_ENV = "AUTODEPLOY_TOKEN"


def add_client_args(p: argparse.ArgumentParser, default_url: str | None = None) -> argparse.ArgumentParser:
    if default_url is not None:
        p.add_argument("--url", default=default_url,
                       help=f"gateway URL (default {default_url}, or $AUTODEPLOY_URL); token: ${TOKEN_ENV}")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="serve's state dir, for admin.token and logs (default: the stack's autodeploy:stateDir, "
                        ".state)")
    p.add_argument("--stack", default="dev", help="stack config whose stateDir to use (default dev)")
    p.add_argument("--project-dir", type=Path, default=None,
                   help="where stacks/ is (default: the nearest folder up from here with Pulumi.yaml)")
    return p


def state_dir(arg: Path | None, project_dir: Path | None, stack: str) -> Path:
    """`--state-dir`, else the stack's `autodeploy:stateDir` relative to the project (as serve finds it)."""
    from controller.stack import find_project_dir, state_dir_of
    if arg is not None:
        return arg.resolve()
    project = project_dir.resolve() if project_dir else find_project_dir(Path.cwd())
    return state_dir_of(project, stack)


def _loopback_url(url: str) -> bool:
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    return auth.is_loopback(host)


def client_token(args: argparse.Namespace) -> str | None:
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    url = getattr(args, "url", None)
    if url is None or not _loopback_url(url):
        return None
    directory = state_dir(getattr(args, "state_dir", None), getattr(args, "project_dir", None),
                          getattr(args, "stack", "dev"))
    return auth.read_token_file(directory / auth.ADMIN_TOKEN_FILE)


def headers(args: argparse.Namespace) -> dict[str, str]:
    token = client_token(args)
    return {"Authorization": f"Bearer {token}"} if token else {}


def hint(code: int) -> str:
    """What to do about an auth error, on top of the server's message."""
    if code in (1030, 1031):
        return (f" (the CLI sends ${TOKEN_ENV}, or for a gateway on this machine <state-dir>/admin.token; "
                "pass --state-dir or set the variable)")
    return ""


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    url = args.url.rstrip("/") + path
    try:
        resp = requests.request(method, url, json=body, headers=headers(args), timeout=30)
    except requests.RequestException as exc:
        raise SystemExit(f"cannot reach the gateway at {url}: {exc}. Is `autodeploy serve` running? "
                         "Pass --url or set AUTODEPLOY_URL.") from exc
    try:
        data = resp.json()
    except ValueError:
        raise SystemExit(f"{method} {url}: HTTP {resp.status_code}, not JSON: {resp.text[:200]}") from None
    if resp.status_code >= 400:
        err = AutoDeployError.from_json(data)
        if err.error.code in (1030, 1031):
            err.detail += hint(err.error.code)
        raise err
    return data


# ---------------------------------------------------------------------- token and key commands
def add_parsers(sub: Any, default_url: str) -> None:
    p = sub.add_parser("token", help="API tokens (admin): create, list, revoke")
    tsub = p.add_subparsers(dest="token_command", required=True)
    p = add_client_args(tsub.add_parser("create", help="make a token and print it once"), default_url)
    p.add_argument("--role", required=True, choices=auth.ROLES)
    p.add_argument("--name", required=True)
    _output(add_client_args(tsub.add_parser("list", help="names, roles, when created and last used"), default_url))
    p = add_client_args(tsub.add_parser("revoke", help="the token stops working at once"), default_url)
    p.add_argument("name")

    p = sub.add_parser("key", help="endpoint keys of private deployments (admin): create, list, revoke")
    ksub = p.add_subparsers(dest="key_command", required=True)
    p = add_client_args(ksub.add_parser("create", help="make a key for DEPLOYMENT and print it once"), default_url)
    p.add_argument("deployment")
    p.add_argument("--name", help="default: key-<random>")
    p.add_argument("--scale-out", action="store_true", help="allow `Deploy-Route-Rule: scale-out` (starts GPUs)")
    p = _output(add_client_args(ksub.add_parser("list", help="keys per deployment"), default_url))
    p.add_argument("deployment", nargs="?")
    p = add_client_args(ksub.add_parser("revoke", help="the key stops working at once"), default_url)
    p.add_argument("deployment")
    p.add_argument("name")


def _output(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--output json` like every read command (controller.cli_ops.add_output; not imported: it imports us)."""
    p.add_argument("--output", "-o", choices=("table", "json"), default="table", help="table or json (default table)")
    p.add_argument("--json", action="store_const", const="json", dest="output", help="same as --output json")
    return p


def _rows(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _when(ts: float | None) -> str:
    return ago(ts, time.time())


def cmd_token(args: argparse.Namespace) -> int:
    if args.token_command == "create":
        data = call(args, "POST", "/api/tokens", {"name": args.name, "role": args.role})
        print(data["token"])
        print(f"token {data['name']} ({data['role']}): shown once, only its hash is kept. "
              f"Use it as {TOKEN_ENV}.", file=sys.stderr)
        return 0
    if args.token_command == "list":
        tokens = call(args, "GET", "/api/tokens")["tokens"]
        if args.output == "json":
            print(json.dumps(tokens, indent=2))
            return 0
        print(_rows([["NAME", "ROLE", "CREATED", "LAST USED"]] +
                    [[t["name"], t["role"], _when(t["created_at"]), _when(t["last_used"])] for t in tokens]))
        return 0
    print(call(args, "POST", "/api/tokens/revoke", {"name": args.name})["message"])
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    if args.key_command == "create":
        body: dict[str, Any] = {"deployment": args.deployment, "scale_out": bool(args.scale_out)}
        if args.name:
            body["name"] = args.name
        data = call(args, "POST", "/api/keys", body)
        print(data["key"])
        print(f"key {data['name']} of {data['deployment']}" + (" (may scale out)" if data["scale_out"] else "")
              + ": shown once, only its hash is kept. Send it as `Authorization: Bearer <key>`.", file=sys.stderr)
        return 0
    if args.key_command == "list":
        path = "/api/keys" + (f"?deployment={args.deployment}" if args.deployment else "")
        keys = call(args, "GET", path)["keys"]
        if args.output == "json":
            print(json.dumps(keys, indent=2))
            return 0
        print(_rows([["DEPLOYMENT", "NAME", "SCALE-OUT", "CREATED"]] +
                    [[k["deployment"], k["name"], "yes" if k["scale_out"] else "no", _when(k["created_at"])]
                     for k in keys]))
        return 0
    print(call(args, "POST", "/api/keys/revoke", {"deployment": args.deployment, "name": args.name})["message"])
    return 0


COMMANDS = {"token": cmd_token, "key": cmd_key}
