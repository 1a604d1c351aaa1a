"""`autodeploy scale|stop|start|delete|rollback|rollout status|history|diff`: the runtime
operations, sent to a running gateway's HTTP API (the same calls as `curl` would make)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from controller import cli_auth, errors
from controller.errors import AutoDeployError
from controller.humantime import ago


def add_output(p: argparse.ArgumentParser, choices: tuple[str, ...] = ("table", "json")) -> None:
    """`--output json` on every read command (`--json` is the same)."""
    p.add_argument("--output", "-o", choices=choices, default="table", help=f"{' or '.join(choices)} (default table)")
    p.add_argument("--json", action="store_const", const="json", dest="output", help="same as --output json")


def add_parsers(sub: Any, default_url: str) -> None:
    def url(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return cli_auth.add_client_args(p, default_url)  # --url, and where the token comes from

    p = url(sub.add_parser("scale", help="keep N instances running (recorded as drift from the file)"))
    p.add_argument("name")
    p.add_argument("replicas", type=int, metavar="N")

    p = url(sub.add_parser("stop", help="shut every instance down; the endpoint answers 1002 until start"))
    p.add_argument("name")

    p = url(sub.add_parser("start", help="resume a stopped deployment with its previous configuration"))
    p.add_argument("name")

    p = url(sub.add_parser("delete", help="remove instances, endpoint and stored state (asks to confirm)"))
    p.add_argument("name")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (required when stdin is not a terminal)")

    p = url(sub.add_parser("rollback", help="go back to an earlier revision, or abort the rollout in progress"))
    p.add_argument("name")
    p.add_argument("--to", type=int, metavar="REVISION", help="revision number (default: the one before)")

    p = sub.add_parser("rollout", help="rollout status")
    rsub = p.add_subparsers(dest="rollout_command", required=True)
    p = url(rsub.add_parser("status", help="phase, step, traffic weights and reason of the latest rollout"))
    p.add_argument("name")
    add_output(p)

    p = url(sub.add_parser("history", help="numbered revisions: when, from which file, what changed"))
    p.add_argument("name")
    add_output(p)

    p = url(sub.add_parser("diff", help="runtime drift from the files (scale, stop, rollback, delete)"))
    p.add_argument("name", nargs="?")
    add_output(p)


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    return cli_auth.call(args, method, path, body)


def _api(args: argparse.Namespace, *parts: str) -> str:
    return "/api/deployments/" + "/".join(parts)


def _post(args: argparse.Namespace, action: str, body: dict | None = None) -> int:
    data = _call(args, "POST", _api(args, args.name, action), body or {})
    print(data.get("message", json.dumps(data)))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    return _post(args, "scale", {"replicas": args.replicas})


def cmd_stop(args: argparse.Namespace) -> int:
    return _post(args, "stop")


def cmd_start(args: argparse.Namespace) -> int:
    return _post(args, "start")


def cmd_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise AutoDeployError(errors.CONFIRMATION_REQUIRED,
                                  f"stdin is not a terminal, so nobody can confirm deleting {args.name}; "
                                  "pass --yes")
        print(f"Delete {args.name}? Its instances shut down, /d/{args.name}/ goes away and its revisions, "
              "events and cost are forgotten. This cannot be undone.")
        answer = input(f"Type the deployment name ({args.name}) to confirm: ").strip()
        if answer != args.name:
            print("not deleted")
            return 1
    return _post(args, "delete", {"yes": True})


def cmd_rollback(args: argparse.Namespace) -> int:
    return _post(args, "rollback", {} if args.to is None else {"to": args.to})


def _ago(ts: float | None) -> str:
    return ago(ts, time.time())


def cmd_rollout(args: argparse.Namespace) -> int:
    data = _call(args, "GET", _api(args, args.name, "rollout"))
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    ro = data["rollout"]
    if ro is None:
        print(f"{args.name}: serving revision {data['revision']}; no rollout since the controller started")
        return 0
    head = (f"{args.name}: {ro['strategy']} {ro['kind']} revision {ro['from_revision']} -> {ro['to_revision']}: "
            f"{ro['phase']}")
    if ro["steps"]:
        head += f", step {ro['step']}/{len(ro['steps'])} ({' -> '.join(str(s) + '%' for s in ro['steps'])})"
    print(head)
    if ro.get("weights"):
        print(f"  traffic: old {ro['weights']['old']:g}%  new {ro['weights']['new']:g}%")
    inst = ro.get("instances")
    if inst:
        print(f"  instances: old {inst['old']['ready']} ready of {inst['old']['total']}; new {inst['new']['ready']} "
              f"ready, {inst['new']['starting']} starting, {inst['new']['failed']} failed (desired {ro['desired']})")
    if ro.get("analysis"):
        a = ro["analysis"]
        print("  analysis this step: " + "; ".join(
            f"{side} {a[side]['requests']} req, error rate {a[side]['error_rate']:.3f}, p99 {a[side]['p99_ms']:g}ms"
            for side in ("old", "new")))
    print(f"  reason: {ro['reason']}")
    print(f"  started {_ago(ro['started_at'])}" + (f", finished {_ago(ro['finished_at'])}" if ro["finished_at"]
                                                    else ""))
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_history(args: argparse.Namespace) -> int:
    data = _call(args, "GET", _api(args, args.name, "history"))
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    git = any(r.get("commit") for r in data["revisions"])
    rows = [["REV", "", "APPLIED", "FILE"] + (["COMMIT", "AUTHOR", "SUBJECT"] if git else []) + ["CHANGE"]]
    for r in data["revisions"]:
        mark = ("*" if r["serving"] else "") + ("f" if r["file_revision"] else "")
        change = "created" if r["kind"] == "created" else (
            f"[{r['kind'].replace('_', ' ')}] " + "; ".join(r["changes"]) if r["changes"] else "no change")
        commit = r.get("commit") or {}
        rows.append([str(r["number"]), mark, _ago(r["applied_at"]), r["file"]]
                    + ([commit.get("short", "-"), commit.get("author", "-"), _clip(commit.get("subject", "-"))]
                       if git else []) + [change])
    print(_table(rows))
    print("* serving now   f the file's current content")
    return 0


def _clip(text: str, width: int = 50) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _print_drift(name: str, drift: dict) -> None:
    commit = drift.get("commit")
    at = f" at commit {commit['short']} ({_clip(commit['subject'])})" if commit else ""
    print(f"{name}: runtime differs from {drift['file']}{at} (revision {drift['file_revision']}) "
          f"since {_ago(drift['since'])}")
    rows = [["  FIELD", "FILE", "RUNTIME", "BY"]]
    rows += [[f"  {c['field']}", str(c["file"]), str(c["runtime"]), str(c["by"])] for c in drift["changes"]]
    print(_table(rows))


def cmd_diff(args: argparse.Namespace) -> int:
    if args.name:
        drifts = [d for d in [{"name": args.name, **(_call(args, "GET", _api(args, args.name, "drift"))["drift"] or {})}]
                  if "changes" in d]
    else:
        drifts = _call(args, "GET", "/api/drift")["drift"]
    if args.output == "json":
        print(json.dumps(drifts, indent=2))
        return 0
    live = _live_commit(args)
    if not drifts:
        what = "the deployment runs" if args.name else "deployments run"
        print(f"no drift: {what} as " + (f"commit {live['short']} ({_clip(live['subject'])}) says" if live
                                          else "the files say"))
        return 0
    for d in drifts:
        _print_drift(d["name"], d)
    if live:
        print(f"live commit {live['short']} ({_clip(live['subject'])}) by {live['author']}")
    print("Runtime actions are not written to the files; commit a new content of the file to make it win.")
    return 0


def _live_commit(args: argparse.Namespace) -> dict | None:
    """The commit serve follows now (git source), or None for a folder."""
    source = _call(args, "GET", "/api/git")
    return source.get("live_commit") if source.get("kind") == "git" else None


COMMANDS = {"scale": cmd_scale, "stop": cmd_stop, "start": cmd_start, "delete": cmd_delete,
            "rollback": cmd_rollback, "rollout": cmd_rollout, "history": cmd_history, "diff": cmd_diff}
