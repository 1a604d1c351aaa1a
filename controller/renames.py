"""`autodeploy validate` notes on renames: `metadata.name` is a deployment's identity, so a
name that changed since the last commit of a file means a new deployment and the removal
of the old one (its instances drained, its endpoint gone). Read-only `git show`."""
from __future__ import annotations

import subprocess
from pathlib import Path

from controller.loader import load_text


def committed_names(path: Path) -> list[str] | None:
    """Names defined by the committed (HEAD) version of `path`; None outside git or when new."""
    path = path.resolve()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path.parent, capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0:
            return None
        rel = path.relative_to(Path(top.stdout.strip()).resolve())
        shown = subprocess.run(["git", "show", f"HEAD:{rel.as_posix()}"], cwd=path.parent, capture_output=True,
                               text=True, timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    if shown.returncode != 0:
        return None
    return [d.name for d in load_text(shown.stdout, str(path)).deployments]


def rename_notes(path: Path, names_now: list[str]) -> list[str]:
    """One note per file whose committed names disappeared while new names appeared."""
    before = committed_names(path)
    if not before:
        return []
    gone = [n for n in before if n not in names_now]
    added = [n for n in names_now if n not in before]
    if not gone or not added:
        return []
    return [f"note: {path}: metadata.name {', '.join(gone)} -> {', '.join(added)} since the last commit: "
            f"a name cannot change, so this is a new deployment ({', '.join(added)}, endpoint /d/{added[0]}/) "
            f"and {', '.join(gone)} will be removed (instances drained, endpoint /d/{gone[0]}/ gone)"]
