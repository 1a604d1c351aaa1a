"""`autodeploy logs`: an instance's output, for local processes and containers alike."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TextIO

from controller.drivers.local import tail_file
from controller.store import Store

# Names are DNS labels (the schema's rule) and ids lowercase letters: anything else in a
# name or id could reach outside the state dir (`../`, `/`), so it is refused outright.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_ID = re.compile(r"[a-z0-9]{1,32}")


def log_files(logs_dir: Path, name: str, instance: str | None = None) -> list[Path]:
    """`<name>-<id>.log` files of exactly this deployment (never `web-api`'s for `web`),
    oldest first, each a regular file inside `logs_dir`."""
    try:
        entries = list(logs_dir.iterdir())
    except OSError:
        return []
    root = logs_dir.resolve()
    found = []
    for path in entries:
        stem, dash, iid = path.name.removesuffix(".log").rpartition("-")
        if not path.name.endswith(".log") or not dash or stem != name or not _ID.fullmatch(iid):
            continue
        if instance is not None and iid != instance:
            continue
        if path.is_symlink() or not path.is_file() or path.resolve().parent != root:
            continue  # a link could point anywhere on the machine
        found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def show_logs(state_dir: Path, name: str, instance: str | None, follow: bool, lines: int, out: TextIO,
              docker_host: str | None = None) -> int:
    if not _NAME.fullmatch(name):
        out.write(f"{name!r} is not a deployment name (lowercase letters, digits and '-')\n")
        return 2
    if instance is not None and not _ID.fullmatch(instance):
        out.write(f"{instance!r} is not an instance id (lowercase letters, as in Deploy-Route-Target)\n")
        return 2
    db = state_dir / "autodeploy.db"
    stored = Store.read_only(db).instances() if db.exists() else []
    mine = [s for s in stored if s.instance.deployment == name and (instance is None or s.instance.id == instance)]
    if mine and mine[-1].driver == "docker":
        from controller.drivers.docker import DockerDriver
        from controller.nodes import read_nodes_file
        inst = mine[-1].instance
        # The engines serve used (several nodes): logs come from the instance's own node.
        wanted = [n for n in read_nodes_file(state_dir) if n.name == inst.node]
        driver = DockerDriver(nodes=wanted) if wanted else DockerDriver(base_url=docker_host)
        if follow:
            for line in driver.follow_logs(inst):
                out.write(line if line.endswith("\n") else line + "\n")
                out.flush()
        else:
            out.write(driver.log_tail(inst, lines) + "\n")
        return 0
    files = log_files(state_dir / "logs", name, instance)
    if not files:
        where = f"instance {instance} of {name}" if instance else name
        out.write(f"no logs for {where} under {state_dir / 'logs'}\n")
        return 1
    path = files[-1]
    out.write(tail_file(str(path), lines) + "\n")
    if follow:
        with open(path, "rb") as f:
            f.seek(0, 2)
            while True:
                chunk = f.readline()
                if chunk:
                    out.write(chunk.decode(errors="replace"))
                    out.flush()
                else:
                    time.sleep(0.2)
    return 0
