"""`autodeploy describe|events|top|wait|completion`: the operator's read commands.

They read a running gateway's HTTP API, print human times ("4m 10s ago", "in 30s")
and take `--output json` for scripts.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import requests

from controller import cli_auth
from controller.cli_ops import _call, add_output
from controller.humantime import ago, duration
from controller.policy.status import brief_error


def add_parsers(sub: Any, default_url: str) -> None:
    def url(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return cli_auth.add_client_args(p, default_url)  # --url, and where the token comes from

    p = url(sub.add_parser("describe", help="everything about one deployment: spec, instances, latency, "
                                            "cold starts, alerts, rollout, drift, events"))
    p.add_argument("name")
    add_output(p)

    p = url(sub.add_parser("events", help="what happened: starts, failures, scaling, rollouts, alerts"))
    p.add_argument("name", nargs="?", help="one deployment (default: all)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--limit", "-n", type=int, default=30, help="how many of the latest to show (default 30)")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    add_output(p)

    p = url(sub.add_parser("top", help="live requests/s, in flight, p95 and GPU use per instance"))
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    add_output(p)

    p = url(sub.add_parser("wait", help="wait until a deployment has a ready instance, printing the start's "
                                        "phases; starts one if none is running"))
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    p.add_argument("--no-wake", action="store_true", help="only wait: do not send a request to start an instance")
    add_output(p)

    p = sub.add_parser("completion", help="shell completion script: source <(autodeploy completion bash)")
    p.add_argument("shell", choices=("bash", "zsh"))


# ---------------------------------------------------------------------------------- helpers

def _base(args: argparse.Namespace) -> str:
    return args.url.rstrip("/")


def _dep(args: argparse.Namespace, name: str) -> dict:
    return _call(args, "GET", f"/api/deployments/{name}")


def _table(rows: list[list[str]], indent: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} ms" if v >= 100 else f"{v:.3g} ms"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def first_line(text: str) -> str:
    line = text.splitlines()[0] if text else ""
    return line + (" ..." if "\n" in text else "")


def status_line(dep: dict) -> str:
    word = dep["status"]
    if word == "Failing" and dep.get("last_error"):
        return f"Failing: {brief_error(dep['last_error'])}"
    return word


def phases_text(start: dict) -> str:
    parts = [f"{p['phase'].replace('_', ' ')} {ms(p['ms'])}" for p in start.get("phases", [])]
    total = start.get("total_ms")
    head = f"total {ms(total)}" if total is not None else "so far"
    return f"{head}: " + ", ".join(parts) if parts else head


def alert_text(a: dict, now: float) -> str:
    unit = {"errorRate": "%", "p95LatencyMs": " ms", "restarts": "", "coldStartMs": " ms"}.get(a["metric"], "")
    text = f"{a['metric']} > {a['above']:g}{unit} for {duration(a['for_s'])}"
    state = a["state"]
    if state != "ok" and a.get("since"):
        state += f" since {ago(a['since'], now)}"
    value = "" if a.get("value") is None else f", now {a['value']:.4g}{unit}"
    hook = f" -> {a['webhook']}" if a.get("webhook") else ""
    return f"{text}{hook}: {state}{value}"


# ---------------------------------------------------------------------------------- describe

def cmd_describe(args: argparse.Namespace) -> int:
    dep = _dep(args, args.name)
    if args.output == "json":
        print(json.dumps(dep, indent=2))
        return 0
    now = time.time()
    r, m, res = dep["replicas"], dep["metrics"], dep["resources"]
    gpu = res["gpu"]
    lat = m.get("latency_ms") or {}
    rows = [
        ("Name", dep["name"]),
        ("Status", status_line(dep)),
        ("Description", dep.get("description") or "-"),
        ("Environment", dep.get("environment", "-")),
        ("Model", f"{dep['model']['id']}@{dep['model']['version']}"),
        ("Endpoint", f"{_base(args)}{dep['endpoint']}"),
        ("Revision", f"{dep['revision']['number']} ({dep['revision']['hash']}) from {dep['revision']['file']}"),
        ("State", dep["state"]),
        ("Replicas", f"{r['ready']} ready of {r['current']} (min {r['min']}, max {r['max']}), idle release after "
                     f"{duration(dep['idle_timeout_s'])}"),
        ("Resources", ", ".join(x for x in (
            f"cpu {res['cpu']:g}" if res.get("cpu") else "",
            f"memory {res['memory_gb']:g} GB" if res.get("memory_gb") else "",
            f"GPU {gpu['count']} x {gpu.get('type') or 'any'}" if gpu.get("count") else "no GPU") if x)),
        ("Load balancer", dep["load_balancer"] + (f", health GET {dep['health_check']['path']} every "
                                                  f"{duration(dep['health_check']['interval_s'])}"
                                                  if dep.get("health_check") else "")),
        ("Rollout strategy", dep.get("rollout_strategy", "-")),
        ("Traffic", f"{m['requests_per_s']:g} req/s, errors {100 * m['error_rate']:.1f}%, p50 {ms(lat.get('p50'))}, "
                    f"p95 {ms(lat.get('p95'))}, p99 {ms(lat.get('p99'))}, in flight {m['in_flight']} "
                    f"(last {duration(m['window_s'])})"),
        ("Cost", f"${dep['cost']['total']:.4f} ({duration(dep['cost']['instance_seconds'])} of instance time at "
                 f"${dep['cost']['price_per_hour']:g}/h)"),
    ]
    auto = dep.get("autoscaling") or {}
    if auto.get("enabled"):
        rows.append(("Autoscaling", f"wants {auto.get('desired')}: {auto.get('reason') or '-'}"))
    width = max(len(k) for k, _ in rows) + 2
    for k, v in rows:
        print(f"{k + ':':<{width}}{v}")
    if dep.get("last_error"):
        print("Last error:")
        for line in dep["last_error"].splitlines()[-8:]:
            print(f"  {line}")
    for err in dep.get("spec_errors", []):
        print(f"Spec error (the last good revision keeps serving): {err}")
    print("Alerts:" + ("" if dep.get("alerts") else " none"))
    for a in dep.get("alerts", []):
        print(f"  {alert_text(a, now)}")
    print("Instances:" + ("" if dep["instances"] else " none"))
    if dep["instances"]:
        table = [["ID", "STATE", "REV", "GPU", "AGE", "IN FLIGHT", "SERVED", "REQ/S", "P95", "HEALTHY"]]
        for i in dep["instances"]:
            im = i.get("metrics") or {}
            table.append([i["id"], i["state"], str(i["revision_number"]), ",".join(i["gpu_ids"]) or "-",
                          duration(now - i["started"]), str(i["in_flight"]), str(i["requests_served"]),
                          f"{im.get('requests_per_s', 0):g}", ms((im.get("latency_ms") or {}).get("p95")),
                          "yes" if i.get("healthy", True) else "no"])
        print(_table(table, "  "))
    starting = [i for i in dep["instances"] if (i.get("start") or {}).get("current")]
    recent = dep.get("cold_starts", [])
    print("Cold starts (latest first):" + ("" if recent or starting else " none since the controller started"))
    for i in starting:
        st = i["start"]
        print(f"  {i['id']}  now {st['current_words']} ({ms(st['current_for_ms'])}); {phases_text(st)}")
    for st in recent:
        outcome = f"  {st['outcome'].upper()}" if st["outcome"] in ("failed", "cancelled") else ""
        kind = "cold" if st["cold"] else st["reason"]
        print(f"  {st['instance']}  {ago(st['requested_at'], now)} ({kind}){outcome}: {phases_text(st)}")
    ro = dep.get("rollout")
    if ro:
        step = f", step {ro['step']}/{len(ro['steps'])}" if ro.get("steps") else ""
        print(f"Rollout: {ro['strategy']} {ro['kind']} {ro['from_revision']} -> {ro['to_revision']}: {ro['phase']}"
              f"{step}, started {ago(ro['started_at'], now)}")
        print(f"  {ro['reason']}")
    else:
        print("Rollout: none since the controller started")
    drift = dep.get("drift")
    if drift:
        print(f"Drift from {drift['file']} (since {ago(drift['since'], now)}):")
        for c in drift["changes"]:
            print(f"  {c['field']}: file {c['file']}, runtime {c['runtime']} (by {c['by']})")
    else:
        print("Drift: none, it runs as its file says")
    events = dep.get("events", [])[-10:]
    print("Events (latest 10):" + ("" if events else " none"))
    if events:
        print(_table([[ago(e["at"], now), e["kind"], e.get("instance") or "-", first_line(e["message"])]
                      for e in reversed(events)], "  "))
    return 0


# ---------------------------------------------------------------------------------- events

def _events_path(args: argparse.Namespace, after: int | None, limit: int) -> str:
    q = f"limit={limit}" + (f"&after={after}" if after is not None else "")
    if args.name:
        q += f"&deployment={args.name}"
    return f"/api/events?{q}"


def _print_events(events: list[dict], args: argparse.Namespace) -> None:
    now = time.time()
    for e in events:
        if args.output == "json":
            print(json.dumps(e), flush=True)
            continue
        who = e["deployment"] + (f"/{e['instance']}" if e.get("instance") else "")
        lines = e["message"].splitlines() or [""]
        print(f"{ago(e['at'], now):>14}  {e['kind']:<15} {who:<24} {lines[0]}", flush=True)
        for extra in lines[1:]:
            print(f"{'':>14}  {'':<15} {'':<24} {extra}", flush=True)


def cmd_events(args: argparse.Namespace) -> int:
    limit = max(1, min(1000, args.limit))
    events = _call(args, "GET", _events_path(args, None, limit))
    if args.output == "json" and not args.follow:
        print(json.dumps(events, indent=2))
        return 0
    if not events and not args.follow:
        print("no events" + (f" for {args.name}" if args.name else ""))
        return 0
    _print_events(events, args)
    last = events[-1]["id"] if events else 0
    try:
        while args.follow:
            time.sleep(args.interval)
            new = _call(args, "GET", _events_path(args, last, 1000))
            _print_events(new, args)
            if new:
                last = new[-1]["id"]
    except KeyboardInterrupt:
        return 0
    return 0


# ---------------------------------------------------------------------------------- top

def top_rows(data: dict) -> list[dict]:
    rows = []
    for dep in data["deployments"]:
        for i in dep["instances"]:
            im = i.get("metrics") or {}
            rows.append({"deployment": dep["name"], "instance": i["id"], "state": i["state"],
                         "requests_per_s": im.get("requests_per_s", 0.0), "in_flight": i["in_flight"],
                         "p95_ms": (im.get("latency_ms") or {}).get("p95"), "error_rate": im.get("error_rate", 0.0),
                         "gpu_ids": i["gpu_ids"], "gpu_pct": im.get("gpu_pct"), "gpu_mem_mb": im.get("gpu_mem_mb"),
                         "cpu_pct": im.get("cpu_pct"), "mem_bytes": im.get("mem_bytes")})
    return rows


def _top_text(data: dict, base: str) -> str:
    rows = top_rows(data)
    head = (f"autodeploy top  {base}  {time.strftime('%H:%M:%S')}  "
            f"{len(data['deployments'])} deployment(s), {len(rows)} instance(s)")
    if not rows:
        return head + "\nno instances running"
    table = [["DEPLOYMENT", "INSTANCE", "STATE", "REQ/S", "IN FLIGHT", "P95", "ERRORS", "GPU", "GPU%", "CPU%",
              "MEM"]]
    for r in rows:
        mem = "-" if r["mem_bytes"] is None else f"{r['mem_bytes'] / 2**20:.0f} MiB"
        table.append([r["deployment"], r["instance"], r["state"], f"{r['requests_per_s']:g}", str(r["in_flight"]),
                      ms(r["p95_ms"]), f"{100 * r['error_rate']:.1f}%", ",".join(r["gpu_ids"]) or "-",
                      pct(r["gpu_pct"]), pct(r["cpu_pct"]), mem])
    return head + "\n" + _table(table)


def cmd_top(args: argparse.Namespace) -> int:
    base = _base(args)
    try:
        while True:
            data = _call(args, "GET", "/api/deployments")
            if args.output == "json":
                print(json.dumps(top_rows(data), indent=None if not args.once else 2), flush=True)
            else:
                text = _top_text(data, base)
                if args.once or not sys.stdout.isatty():
                    print(text, flush=True)
                else:
                    sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
                    sys.stdout.flush()
            if args.once:
                return 0
            time.sleep(max(0.2, args.interval))
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------------------------- wait

def _wake(base: str, dep: dict, timeout: float, result: dict) -> None:
    """The cold path itself: a GET of the health path (or /) through the endpoint, held until ready."""
    path = (dep.get("health_check") or {}).get("path") or "/"
    try:
        resp = requests.get(f"{base}{dep['endpoint'].rstrip('/')}{path}", timeout=timeout)
        result["status"] = resp.status_code
        result["body"] = resp.text[:2000]
    except requests.RequestException as exc:
        result["error"] = str(exc)


def cmd_wait(args: argparse.Namespace) -> int:
    base = _base(args)
    deadline = time.monotonic() + args.timeout
    dep = _dep(args, args.name)
    quiet = args.output == "json"
    woke: dict = {}
    if dep["state"] == "stopped":
        msg = f"{args.name} is stopped: start it with `autodeploy start {args.name}`"
        print(json.dumps({"name": args.name, "ready": False, "status": dep["status"], "reason": msg})
              if quiet else msg, file=sys.stdout if quiet else sys.stderr)
        return 1
    if not args.no_wake and not any(i["state"] in ("ready", "starting") for i in dep["instances"]):
        if not quiet:
            print(f"{args.name}: {dep['status']}; sending a request to start an instance")
        threading.Thread(target=_wake, args=(base, dep, args.timeout, woke), daemon=True).start()
    shown: dict[str, int] = {}
    current: dict[str, str | None] = {}
    began = time.monotonic()
    while True:
        ready = [i for i in dep["instances"] if i["state"] == "ready"]
        for i in dep["instances"]:
            st = i.get("start") or {}
            if quiet or not st:
                continue
            phases = st.get("phases", [])
            for p in phases[shown.get(i["id"], 0):]:
                print(f"  {i['id']}  {p['phase'].replace('_', ' '):<11} {ms(p['ms']):>10}")
            shown[i["id"]] = len(phases)
            if st.get("current") and current.get(i["id"]) != st["current"] and i["state"] == "starting":
                print(f"  {i['id']}  {st['current_words']} ...", flush=True)
            current[i["id"]] = st.get("current")
        if ready:
            inst = ready[0]
            total = (inst.get("start") or {}).get("total_ms")
            if quiet:
                print(json.dumps({"name": args.name, "ready": True, "instance": inst["id"], "status": dep["status"],
                                  "start": inst.get("start"), "waited_s": round(time.monotonic() - began, 3)}))
            else:
                extra = f", start took {ms(total)}" if total is not None else ""
                print(f"{args.name} is ready: instance {inst['id']}{extra}")
            return 0
        starting = [i for i in dep["instances"] if i["state"] == "starting"]
        if woke.get("status") in (401, 403) and not starting:
            reason = (f"the endpoint refused the waking request (HTTP {woke['status']}: {woke.get('body', '')[:200]}); "
                      "a deployment with endpoint keys is woken by a request that carries one")
            print(json.dumps({"name": args.name, "ready": False, "status": dep["status"], "reason": reason})
                  if quiet else f"{args.name}: {reason}", file=sys.stdout if quiet else sys.stderr)
            return 1
        if dep["status"] == "Failing" and not starting and (args.no_wake or woke):
            reason = dep.get("last_error") or woke.get("body") or woke.get("error") or "failed"
            if quiet:
                print(json.dumps({"name": args.name, "ready": False, "status": "Failing", "reason": reason}))
            else:
                print(f"{args.name} is failing: {reason}", file=sys.stderr)
            return 1
        if time.monotonic() >= deadline:
            msg = f"{args.name} was not ready after {duration(args.timeout)} (status {dep['status']})"
            print(json.dumps({"name": args.name, "ready": False, "status": dep["status"], "reason": msg})
                  if quiet else msg, file=sys.stdout if quiet else sys.stderr)
            return 2
        time.sleep(0.2)
        dep = _dep(args, args.name)


# ---------------------------------------------------------------------------------- completion

def _walk(parser: argparse.ArgumentParser) -> dict[str, tuple[list[str], bool]]:
    """command -> (its options, whether it takes a deployment NAME)."""
    out: dict[str, tuple[list[str], bool]] = {}
    for action in parser._actions:  # argparse keeps no public API for this
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                opts = [o for a in sub._actions for o in a.option_strings if a.help != argparse.SUPPRESS]
                opts += [str(c) for a in sub._actions if not a.option_strings and a.choices
                         and not isinstance(a, argparse._SubParsersAction) for c in a.choices]
                takes_name = any(a.dest == "name" for a in sub._actions)
                nested = _walk(sub)
                if nested:
                    for inner, (iopts, iname) in nested.items():
                        out[f"{name} {inner}"] = (iopts, iname)
                    out[name] = (sorted(nested), False)
                else:
                    out[name] = (opts, takes_name)
    return out


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    table = _walk(parser)
    top = sorted(c for c in table if " " not in c)
    cases = []
    for cmd, (words, takes_name) in sorted(table.items()):
        pattern = cmd.replace(" ", "\\ ")
        cases.append(f"    {pattern}) words=\"{' '.join(words)}\"; names={1 if takes_name else 0} ;;")
    script = f"""# autodeploy {shell} completion: source <(autodeploy completion {shell})
_autodeploy() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} cmd=${{COMP_WORDS[1]}} words="" names=0
  if [ "$COMP_CWORD" -eq 1 ]; then
    COMPREPLY=( $(compgen -W "{' '.join(top)} --version --help" -- "$cur") )
    return
  fi
  if [ "$COMP_CWORD" -ge 3 ] && [ "$cmd" = "rollout" ]; then cmd="rollout ${{COMP_WORDS[2]}}"; fi
  case "$cmd" in
{chr(10).join(cases)}
  esac
  if [[ "$cur" == -* ]] || [ "$names" = 0 ]; then
    COMPREPLY=( $(compgen -W "$words" -- "$cur") )
  else
    COMPREPLY=( $(compgen -W "$(${{COMP_WORDS[0]}} status --output name 2>/dev/null)" -- "$cur") )
  fi
}}
complete -o default -F _autodeploy autodeploy
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script(args.parser, args.shell))
    return 0


COMMANDS = {"describe": cmd_describe, "events": cmd_events, "top": cmd_top, "wait": cmd_wait,
            "completion": cmd_completion}
