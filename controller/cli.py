"""The `autodeploy` command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from controller import cli_auth, cli_ops, cli_view
from controller.cli_ops import add_output
from controller.errors import AutoDeployError
from controller.humantime import ago
from controller.policy.status import brief_error

DEFAULT_URL = os.environ.get("AUTODEPLOY_URL", "http://127.0.0.1:8080")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("autodeploy")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autodeploy", description="Serve GPU model services on demand.")
    parser.add_argument("--version", action="version", version=f"autodeploy {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check Deployment YAML files or directories")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--stack", default="dev", help="stack whose driver and gateway port the PORT check uses")
    p.add_argument("--project-dir", type=Path, default=Path("."), help="where Pulumi.yaml is (default .)")
    add_output(p)

    p = sub.add_parser("serve", help="run the controller and the gateway in the foreground")
    p.add_argument("--deployments", type=Path, help="directory of Deployment YAML (default: the stack's)")
    p.add_argument("--state-dir", type=Path,
                   help="SQLite, logs, sockets (default: the stack's autodeploy:stateDir, .state in the project)")
    p.add_argument("--host", help="gateway address (default: the stack's, 127.0.0.1)")
    p.add_argument("--port", type=int, help="gateway port (default: the stack's, 8080)")
    p.add_argument("--driver", choices=["local", "docker", "pulumi"], help="default: the stack's")
    p.add_argument("--stack", default="dev", help="stack config stacks/Pulumi.<stack>.yaml (default dev)")
    p.add_argument("--project-dir", type=Path, default=Path("."), help="where Pulumi.yaml is (default .)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    p.add_argument("--threads", type=int, default=64, help="threads per worker, gthread only (default 64)")
    p.add_argument("--worker-class", choices=["gevent", "gthread"], default="gevent",
                   help="gunicorn worker: gevent (default; a greenlet per request, thousands of open "
                        "requests) or gthread (a thread per request)")
    p.add_argument("--worker-connections", type=int, default=4096,
                   help="open connections per gevent worker (default 4096)")
    p.add_argument("--queue-limit", type=int, default=256,
                   help="requests held per deployment while instances start (default 256)")
    p.add_argument("--queue-timeout", type=float, default=300.0,
                   help="seconds a held request waits for an instance (default 300)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get on shutdown (default 30)")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                   help="a proxy whose X-Forwarded-For is believed (for ip-hash); repeatable "
                        "(default: the stack's autodeploy:trustedProxies, else none)")
    git = p.add_argument_group("git source (instead of --deployments; default: the stack's autodeploy:git)")
    git.add_argument("--git-repo", metavar="URL", help="follow this repository (file://, ssh://, https://, ...)")
    git.add_argument("--git-branch", metavar="BRANCH", help="branch to follow (default main)")
    git.add_argument("--git-path", metavar="DIR", help="folder of Deployment YAML in the repo (default deployments)")
    git.add_argument("--git-interval", metavar="DURATION", help="poll interval (default 30s)")
    p.add_argument("--data-plane", choices=["haproxy", "python"],
                   help="haproxy: HAProxy carries warm traffic, the Python gateway activates; python: the "
                        "Python gateway carries everything (default: the stack's autodeploy:dataPlane, else "
                        "haproxy when haproxy >= 2.6 is on PATH)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve the API without tokens (loopback --host only; every local user gets admin)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("status", help="deployments, their instances and cost")
    p.add_argument("name", nargs="?")
    cli_auth.add_client_args(p, DEFAULT_URL)
    add_output(p, ("table", "json", "name"))

    p = sub.add_parser("gpus", help="the GPU inventory and where it came from")
    p.add_argument("--stack", default="dev")
    p.add_argument("--project-dir", type=Path, default=Path("."))
    add_output(p)

    p = sub.add_parser("nodes", help="the Docker hosts: reachable or not, GPUs free and used, instances")
    cli_auth.add_client_args(p, DEFAULT_URL)
    add_output(p)

    p = sub.add_parser("gateway-static", help="the gateway alone, routing to fixed instances (Pulumi's gateway container)")
    p.add_argument("--bind", default=os.environ.get("AUTODEPLOY_GATEWAY_BIND", "0.0.0.0:8080"),
                   help="address to listen on (default $AUTODEPLOY_GATEWAY_BIND or 0.0.0.0:8080)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=64)

    p = sub.add_parser("logs", help="an instance's output")
    p.add_argument("name")
    p.add_argument("--instance", help="instance id (default: the newest)")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--lines", "-n", type=int, default=100)
    p.add_argument("--state-dir", type=Path, help="default: the stack's autodeploy:stateDir (.state in the project)")
    p.add_argument("--stack", default="dev")
    p.add_argument("--project-dir", type=Path, help="default: the nearest folder up from here with Pulumi.yaml")

    cli_ops.add_parsers(sub, DEFAULT_URL)  # scale, stop, start, delete, rollback, rollout, history, diff
    cli_auth.add_parsers(sub, DEFAULT_URL)  # token, key
    cli_view.add_parsers(sub, DEFAULT_URL)  # describe, events, top, wait, completion
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.parser = parser  # `completion` walks it (controller.cli_view)
    try:
        return int({**COMMANDS, **cli_ops.COMMANDS, **cli_auth.COMMANDS, **cli_view.COMMANDS}[args.command](args) or 0)
    except AutoDeployError as exc:
        print(f"error {exc.error.code}: {exc.operator_message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `autodeploy ... | head`: the reader has gone, nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


def cmd_validate(args: argparse.Namespace) -> int:
    from controller.validate import run_validate, stack_gateway_port, stack_secrets
    return run_validate(args.paths, sys.stdout, sys.stderr,
                        local_gateway_port=stack_gateway_port(args.project_dir.resolve(), args.stack),
                        secrets=stack_secrets(args.project_dir.resolve(), args.stack), output=args.output)


def cmd_serve(args: argparse.Namespace) -> int:
    from controller.serve import ServeOptions, Server
    from controller.stack import state_dir_of
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = ServeOptions(project_dir=args.project_dir.resolve(), stack=args.stack,
                        deployments=args.deployments.resolve() if args.deployments else None,
                        state_dir=(args.state_dir.resolve() if args.state_dir
                                   else state_dir_of(args.project_dir.resolve(), args.stack)), host=args.host, port=args.port, driver=args.driver,
                        workers=args.workers, threads=args.threads, worker_class=args.worker_class,
                        worker_connections=args.worker_connections, queue_limit=args.queue_limit,
                        queue_timeout=args.queue_timeout, graceful_timeout=args.graceful_timeout,
                        trusted_proxies=tuple(args.trusted_proxy), git_repo=args.git_repo,
                        git_branch=args.git_branch, git_path=args.git_path, git_interval=args.git_interval,
                        data_plane=args.data_plane, insecure_no_auth=args.insecure_no_auth)
    return Server(opts).run()


def _get(args: argparse.Namespace, path: str) -> dict:
    return cli_auth.call(args, "GET", path)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _ago(ts: float | None) -> str:
    return ago(ts, time.time())


def cmd_status(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    if args.name:
        dep = _get(args, f"/api/deployments/{args.name}")
        if args.output == "json":
            print(json.dumps(dep, indent=2))
            return 0
        if args.output == "name":
            print(dep["name"])
            return 0
        print(f"{dep['name']}  {cli_view.status_line(dep)}  ({dep['state']})  endpoint {base}{dep['endpoint']}")
        print(f"  model {dep['model']['id']}@{dep['model']['version']}  revision {dep['revision']['number']}"
              f"  replicas {dep['replicas']['ready']}/{dep['replicas']['current']} (min {dep['replicas']['min']},"
              f" max {dep['replicas']['max']})  cost ${dep['cost']['total']:.4f}"
              f" ({dep['cost']['instance_seconds']:.0f} instance-s at ${dep['cost']['price_per_hour']}/h)")
        m = dep["metrics"]
        lat = m.get("latency_ms") or {}
        print(f"  last {m['window_s']:g}s: {m['requests_per_s']:g} req/s, errors {100 * m['error_rate']:.1f}%,"
              f" latency p50 {cli_view.ms(lat.get('p50'))}  p95 {cli_view.ms(lat.get('p95'))}"
              f"  p99 {cli_view.ms(lat.get('p99'))}")
        if dep["instances"]:
            rows = [["INSTANCE", "STATE", "PID", "PORT", "STARTED", "LAST REQUEST", "SERVED", "IN FLIGHT", "P50",
                     "P95", "P99"]]
            rows += [[i["id"], i["state"], str(i["pid"] or "-"), str(i["port"] or "-"), _ago(i["started"]),
                      _ago(i["last_request"]), str(i["requests_served"]), str(i["in_flight"])]
                     + [cli_view.ms(((i.get("metrics") or {}).get("latency_ms") or {}).get(q))
                        for q in ("p50", "p95", "p99")]
                     for i in dep["instances"]]
            print(_table(rows))
        firing = [a for a in dep.get("alerts", []) if a["state"] == "firing"]
        for a in firing:
            print(f"  alert firing: {cli_view.alert_text(a, time.time())}")
        for err in dep.get("spec_errors", []):
            print(f"  spec error (last good revision keeps serving): {err}")
        if dep.get("last_error"):
            print(f"  last error: {dep['last_error']}")
        return 0
    data = _get(args, "/api/deployments")
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    if args.output == "name":
        for d in data["deployments"]:
            print(d["name"])
        return 0
    rows = [["NAME", "STATUS", "STATE", "INSTANCES", "MODEL", "ENDPOINT", "P95", "ALERTS", "COST"]]
    rows += [[d["name"], d["status"], d["state"], f"{d['replicas']['ready']}/{d['replicas']['current']}",
              f"{d['model']['id']}@{d['model']['version']}", f"{base}{d['endpoint']}",
              cli_view.ms((d["metrics"].get("latency_ms") or {}).get("p95")),
              str(sum(a["state"] == "firing" for a in d.get("alerts", []))) + " firing" if d.get("alerts") else "-",
              f"${d['cost']['total']:.4f}"]
             for d in data["deployments"]]
    print(_table(rows))
    for d in data["deployments"]:
        if d["status"] == "Failing" and d.get("last_error"):
            print(f"{d['name']} is failing: {brief_error(d['last_error'])}")
    for err in data.get("errors", []):
        print(f"spec error: {err}")
    _print_source(data.get("source"))
    return 0


def _print_source(src: dict | None) -> None:
    if not src:
        return
    if src["kind"] != "git":
        print(f"source: folder {src['path']}")
        return
    live = src.get("live_commit")
    print(f"source: git {src['repo']} branch {src['branch']} path {src['path']} (every {src['interval_s']:g}s)")
    print("  live commit: " + (f"{live['short']} {live['subject']!r} by {live['author']}" if live else "none yet")
          + f"; last fetch {_ago(src.get('last_fetch_at'))}")
    if src.get("last_fetch_error"):
        print(f"  fetch failing ({src['consecutive_failures']} in a row, serving continues): "
              f"{src['last_fetch_error']}")
    refused = src.get("refused_commit")
    if refused:
        print(f"  refused commit {refused['short']} {refused['subject']!r} by {refused['author']}:")
        for err in refused["errors"]:
            print(f"    {err}")


def cmd_gpus(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from controller.gpus import discover_inventory, format_inventory
    from controller.stack import load_stack
    inventory = discover_inventory(load_stack(args.project_dir.resolve(), args.stack))
    if args.output == "json":
        print(json.dumps(asdict(inventory), indent=2, default=str))
        return 0
    print(format_inventory(inventory))
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    data = _get(args, "/api/deployments")
    nodes = data.get("nodes") or []
    if args.output == "json":
        print(json.dumps(nodes, indent=2))
        return 0
    if not nodes:
        print(f"driver {data.get('driver')} has no nodes: nodes are Docker hosts (--driver docker)")
        return 0
    rows = [["NODE", "REACHABLE", "ADDRESS", "GPUS USED/TOTAL", "FREE", "INSTANCES", "LABELS"]]
    for n in nodes:
        g = n["gpus"]
        rows.append([n["name"], "yes" if n["reachable"] else f"no ({_ago(n['since'])})", n["address"],
                     f"{g['used']}/{g['total']}", str(g["free"]),
                     ",".join(f"{i['deployment']}/{i['id']}" for i in n["instances"]) or "-",
                     ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-"])
    print(_table(rows))
    for n in nodes:
        if not n["reachable"]:
            print(f"{n['name']}: unreachable: {n['error']}")
        if n["gpus"]["detail"]:
            print(f"{n['name']}: GPUs from {n['gpus']['source']}: {n['gpus']['detail']}")
    return 0


def cmd_gateway_static(args: argparse.Namespace) -> int:
    """Routes from AUTODEPLOY_ROUTES (written by the Pulumi program); checks them before serving."""
    import tempfile
    from gateway.static import StaticControlPlane
    StaticControlPlane.from_env()  # a bad AUTODEPLOY_ROUTES fails here, with its code, not in every worker
    state = tempfile.mkdtemp(prefix="autodeploy-gateway-")
    env = dict(os.environ, AUTODEPLOY_COUNTERS=os.path.join(state, "counters.bin"))
    cmd = [sys.executable, "-m", "gunicorn", "gateway.static_wsgi:app", "--bind", args.bind, "--workers",
           str(args.workers), "--worker-class", "gthread", "--threads", str(args.threads), "--keep-alive", "75"]
    os.execve(sys.executable, cmd, env)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from controller.logs import show_logs
    from controller.stack import find_project_dir, state_dir_of
    project = args.project_dir.resolve() if args.project_dir else find_project_dir(Path.cwd())
    state_dir = args.state_dir.resolve() if args.state_dir else state_dir_of(project, args.stack)
    return show_logs(state_dir, args.name, args.instance, args.follow, args.lines, sys.stdout,
                     docker_host=_stack_docker_host(project, args.stack))


def _stack_docker_host(project: Path, stack: str) -> str | None:
    from controller.stack import load_stack
    try:
        return load_stack(project, stack).docker_host
    except AutoDeployError:
        return None


COMMANDS = {"validate": cmd_validate, "serve": cmd_serve, "status": cmd_status, "gpus": cmd_gpus, "nodes": cmd_nodes,
            "logs": cmd_logs, "gateway-static": cmd_gateway_static}

if __name__ == "__main__":
    sys.exit(main())
