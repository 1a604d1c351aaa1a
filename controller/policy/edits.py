"""What an edit of a Deployment changes, and what it takes to apply it.

Pure functions over the documents as written (the loader's `raw` dicts): a
field diff for `autodeploy history`, and the guide's edit rules as a
classification the controller acts on:

* in place: description, environment, labels, scaling, load balancer and health
  check, rollout settings; running instances keep serving, untouched;
* restart: env and resources (CPU, memory, GPU, storage) reach a process only
  when it starts, so instances are replaced by a rolling update;
* rollout: model, image, command or port make a new version of the service, so
  the change goes through `spec.rollout.strategy`.

`metadata.name` is the identity of a deployment: a new name is a new deployment.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

IN_PLACE = "in_place"
RESTART = "restart"
ROLLOUT = "rollout"
NONE = "none"

# Most specific prefix first; a path is classified by the first prefix it starts with.
_RULES: tuple[tuple[str, str], ...] = (
    ("spec.resources.bandwidthMbps", IN_PLACE),  # not enforced on the process: informational
    ("spec.model", ROLLOUT),
    ("spec.image", ROLLOUT),
    ("spec.command", ROLLOUT),
    ("spec.port", ROLLOUT),
    ("spec.env", RESTART),
    ("spec.resources", RESTART),
    ("metadata.description", IN_PLACE),
    ("metadata.environment", IN_PLACE),
    ("metadata.labels", IN_PLACE),
    ("spec.scaling", IN_PLACE),
    ("spec.loadBalancer", IN_PLACE),
    ("spec.rollout", IN_PLACE),
    ("spec.state", IN_PLACE),
    ("spec.alerts", IN_PLACE),
    ("apiVersion", IN_PLACE),
    ("kind", IN_PLACE),
)
_RANK = {NONE: 0, IN_PLACE: 1, RESTART: 2, ROLLOUT: 3}


@dataclass(frozen=True)
class Change:
    path: str  # dotted, e.g. spec.model.version
    old: Any  # None when added
    new: Any  # None when removed
    kind: str  # in_place | restart | rollout

    def __str__(self) -> str:
        if self.old is None:
            return f"{self.path}: set to {_show(self.new)}"
        if self.new is None:
            return f"{self.path}: removed (was {_show(self.old)})"
        if isinstance(self.old, str) and isinstance(self.new, str):
            a, b = _changed_part(self.old, self.new)
            return f"{self.path}: {a} -> {b}"
        return f"{self.path}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True)
class Edit:
    kind: str  # none | in_place | restart | rollout: the strongest of the changes
    changes: tuple[Change, ...]
    renamed_from: str | None = None

    @property
    def summary(self) -> str:
        return "; ".join(str(c) for c in self.changes) if self.changes else "no change"

    def paths(self, kind: str | None = None) -> list[str]:
        return [c.path for c in self.changes if kind is None or c.kind == kind]


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _changed_part(a: str, b: str, context: int = 12, limit: int = 60) -> tuple[str, str]:
    """The two strings cut down to where they differ (long commands differ in one flag)."""
    if len(a) <= limit and len(b) <= limit:
        return a, b
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    lo = max(0, start - context)

    def cut(s: str) -> str:
        hi = len(s) - max(0, end - context)
        mid = s[lo:hi]
        if len(mid) > limit:
            mid = mid[:limit - 3] + "..."
        return ("..." if lo else "") + mid + ("..." if hi < len(s) else "")
    return cut(a), cut(b)


def kind_of(path: str) -> str:
    for prefix, kind in _RULES:
        if path == prefix or path.startswith(prefix + "."):
            return kind
    # A field these rules do not know (a newer schema): replacing instances is the safe guess.
    return RESTART


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node


def spec_diff(old: dict | None, new: dict) -> list[Change]:
    """Field-level differences between two documents, in path order.

    Maps (env, labels, resources) are compared key by key, so one env variable
    changing names that variable; lists (canary steps) are compared whole.
    """
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    if old is not None:
        _flatten(old, "", a)
    _flatten(new, "", b)
    changes = []
    for path in sorted(set(a) | set(b)):
        if path == "metadata.name":
            continue  # the identity, reported by classify as a rename
        va, vb = a.get(path), b.get(path)
        if va != vb:
            changes.append(Change(path, va, vb, kind_of(path)))
    return changes


def classify(old: dict | None, new: dict) -> Edit:
    """The guide's edit rules applied to a change from `old` to `new` (None: first revision)."""
    changes = tuple(spec_diff(old, new))
    kind = max((c.kind for c in changes), key=_RANK.__getitem__, default=NONE)
    old_name = (old or {}).get("metadata", {}).get("name")
    new_name = new.get("metadata", {}).get("name")
    renamed = old_name if old is not None and old_name != new_name else None
    return Edit(kind, changes, renamed)


def describe(edit: Edit, strategy: str) -> str:
    """One line for the event log: what changed and how it is applied."""
    if edit.kind == NONE:
        return "no field changed"
    if edit.kind == IN_PLACE:
        return f"applied in place, no instance restarted ({edit.summary})"
    if edit.kind == RESTART:
        what = []
        if any(p.startswith("spec.env") for p in edit.paths(RESTART)):
            what.append("env changes reach a process only when it starts")
        if any(p.startswith("spec.resources") for p in edit.paths(RESTART)):
            what.append("resource changes need new instances")
        why = "; ".join(what) or "these fields need new instances"
        return f"{why}: rolling instances ({edit.summary})"
    return f"new version: {strategy} rollout ({edit.summary})"


def rename_message(old_name: str, file: str, new_names: list[str]) -> str:
    """Event text when a name disappears from a file that now defines other, new names."""
    base = f"{file} no longer defines it: draining"
    if not new_names:
        return base
    names = ", ".join(new_names)
    return (f"{base}. metadata.name cannot change: if {old_name} was renamed to {names}, that is a new "
            f"deployment with its own endpoint /d/{new_names[0]}/, and {old_name} (endpoint /d/{old_name}/) "
            "is removed")
