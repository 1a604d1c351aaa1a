"""`autodeploy logs`: an instance's output, for local processes and containers alike."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

from controller.drivers.local import tail_file
from controller.store import Store


def show_logs(state_dir: Path, name: str, instance: str | None, follow: bool, lines: int, out: TextIO) -> int:
    db = state_dir / "autodeploy.db"
    stored = Store(db).instances() if db.exists() else []
    mine = [s for s in stored if s.instance.deployment == name and (instance is None or s.instance.id == instance)]
    if mine and mine[-1].driver == "docker":
        from controller.drivers.docker import DockerDriver
        driver = DockerDriver()
        inst = mine[-1].instance
        if follow:
            for line in driver.follow_logs(inst):
                out.write(line if line.endswith("\n") else line + "\n")
                out.flush()
        else:
            out.write(driver.log_tail(inst, lines) + "\n")
        return 0
    pattern = f"{name}-{instance}.log" if instance else f"{name}-*.log"
    files = sorted((state_dir / "logs").glob(pattern), key=lambda p: p.stat().st_mtime)
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
