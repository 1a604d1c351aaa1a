"""Runtime operations (scale, stop, start, delete, rollback) and what they leave behind: drift.

The files are the desired state and nothing here rewrites them. An operation is
recorded in the store as an override of one deployment, keyed by the revision
of the file content it was made against (`base`). The controller serves the
file's spec with the override laid over it; when the file's content for that
deployment changes (a new commit), the new content wins and the override is
dropped. The status API shows the override as `drift`, `autodeploy diff` prints it.

Override fields: replicas (scale N), state (stop/start), rollback_to (a revision
number), deleted. Every method runs with the fleet's lock held.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable

from controller import errors
from controller.errors import AutoDeployError
from controller.fleet import READY, Fleet
from controller.loader import load_text
from controller.policy import edits
from controller.rollouts import RolloutDriver
from controller.spec import Deployment
from controller.store import RevisionRow, Store

WRITE_ACTIONS = ("scale", "stop", "start", "delete", "rollback")
READ_ACTIONS = ("history", "rollout", "drift")


def overlay(spec: Deployment, data: dict) -> Deployment:
    """The file's spec with the runtime overrides' state and replica count laid over it."""
    if data.get("state"):
        spec = replace(spec, state=data["state"])
    if data.get("replicas") is not None:
        n = int(data["replicas"])
        spec = replace(spec, scaling=replace(spec.scaling, min_replicas=n,
                                             max_replicas=max(spec.scaling.max_replicas, n)))
    return spec


def spec_from_revision(row: RevisionRow) -> Deployment:
    """Rebuild a stored revision (its content is the document as loaded, JSON is YAML)."""
    result = load_text(json.dumps(row.content), row.source_file)
    if result.errors or not result.deployments:
        raise AutoDeployError(errors.SPEC_INVALID, f"stored revision {row.number} of {row.deployment} no longer "
                              f"loads: {'; '.join(str(e) for e in result.errors)}")
    return result.deployments[0]


class Operations:
    def __init__(self, fleet: Fleet, store: Store, rollouts: RolloutDriver, *, clock: Callable[[], float],
                 inflight: Callable[[], dict[str, int]]) -> None:
        self.fleet = fleet
        self.store = store
        self.rollouts = rollouts
        self.clock = clock
        self.inflight = inflight
        self.git: dict[str, Deployment] = {}  # the spec each file last gave, overrides not applied

    # ------------------------------------------------------------------ desired state
    def effective(self, spec: Deployment) -> tuple[Deployment, int | None] | None:
        """What to serve for a file's spec: (spec, rollback revision number or None), or None
        while the deployment is deleted and its file content has not changed since."""
        self.git[spec.name] = spec
        found = self.store.override(spec.name)
        if found is None:
            return spec, None
        base, data, _ = found
        if base != spec.revision:
            self.store.clear_override(spec.name)
            self.fleet.event(spec.name, "drift", f"{spec.source_file} changed: it wins over the runtime overrides "
                                              f"({_summary(data)}), which are dropped")
            return spec, None
        if data.get("deleted"):
            return None
        number = None
        if data.get("rollback_to"):
            row = self._revision(spec.name, int(data["rollback_to"]))
            if row is not None:
                spec, number = spec_from_revision(row), row.number
        return overlay(spec, data), number

    def rolled_back(self, name: str, number: int, reason: str) -> None:
        """A rollout was rolled back to revision `number`: remember it, so that reloading the
        same file does not start the failed rollout again."""
        git = self.git.get(name)
        if git is None:
            return
        data = self._data(name)
        if number == self._git_number(name):
            data.pop("rollback_to", None)
            data.pop("rollback_reason", None)
        else:
            data["rollback_to"], data["rollback_reason"] = number, reason
        self._save(name, data)

    # ------------------------------------------------------------------ entry point
    def act(self, name: str, action: str, args: dict) -> dict:
        read_only = bool(args.get("read_only"))
        if action in READ_ACTIONS:
            if action == "drift" and name == "*":
                return {"drift": self.drift_all()}
            return getattr(self, action)(name)
        if action not in WRITE_ACTIONS:
            raise AutoDeployError(errors.UNKNOWN_ACTION, f"{action!r}")
        if read_only:
            raise AutoDeployError(errors.BAD_REQUEST, f"{action} changes the deployment: use POST")
        now = self.clock()
        if action == "scale":
            return self.scale(name, args.get("replicas"), now)
        if action == "delete":
            return self.delete(name, args.get("yes") is True, now)  # JSON true only: not "no", not 1
        if action == "rollback":
            to = args.get("to")
            return self.rollback(name, None if to is None else _int(to, "to"), now)
        return self.set_state(name, "stopped" if action == "stop" else "running", now)

    # ------------------------------------------------------------------ write actions
    def scale(self, name: str, replicas: Any, now: float) -> dict:
        rt = self.fleet.runtime(name)
        n = _int(replicas, "replicas")
        git = self.git.get(name, rt.spec)
        top = git.scaling.max_replicas
        if n < 0 or n > top:
            raise AutoDeployError(errors.REPLICAS_OUT_OF_RANGE, f"{n} is outside 0..{top} (maxReplicas of "
                                  f"{name} in {git.source_file})")
        data = self._data(name)
        if n == git.scaling.min_replicas:
            data.pop("replicas", None)  # back to what the file says: no drift left
        else:
            data["replicas"] = n
        self._save(name, data)
        rt.spec = replace(rt.spec, scaling=replace(rt.spec.scaling, min_replicas=n))
        msg = f"{name}: keeping {n} instance(s) (file: minReplicas {git.scaling.min_replicas})"
        if self.rollouts.owns(name):
            msg += "; a rollout is in progress: it keeps its instance count, the scale applies after it"
        else:
            # Release what costs least to lose: not yet ready, then fewest in flight, longest idle.
            alive = rt.alive()
            inflight = self.inflight()
            extra = sorted(alive, key=lambda r: (r.phase == READY, inflight.get(r.id, 0), r.last_activity))
            for rec in extra[:max(0, len(alive) - n)]:
                self.fleet.release(rec, f"scaled to {n}")
        self.fleet.event(name, "scale", msg + " by operator; recorded as drift, the file is unchanged")
        self.fleet.bump()
        return {"message": msg, "drift": self.drift_of(name)}

    def set_state(self, name: str, state: str, now: float) -> dict:
        rt = self.fleet.runtime(name)
        git = self.git.get(name, rt.spec)
        data = self._data(name)
        if state == git.state:
            data.pop("state", None)
        else:
            data["state"] = state
        self._save(name, data)
        was = rt.spec.state
        rt.spec = replace(rt.spec, state=state)
        if state == "stopped":
            self.rollouts.cancel(rt, "deployment stopped", now)
            for rec in rt.alive():
                self.fleet.release(rec, "deployment stopped")
            msg = (f"{name}: stopped; all instances shut down (in-flight requests finish), the endpoint answers "
                   f"{errors.DEPLOYMENT_STOPPED.code} {errors.DEPLOYMENT_STOPPED.msg}")
        else:
            msg = (f"{name}: started with revision {rt.revision_number}; instances start on demand"
                   + (f" and {rt.spec.scaling.min_replicas} now (minReplicas)" if rt.spec.scaling.min_replicas
                      else ""))
        if was == state:
            msg = f"{name}: already {state}"
        self.fleet.event(name, "stop" if state == "stopped" else "start", msg + " (by operator)")
        self.fleet.bump()
        return {"message": msg, "drift": self.drift_of(name)}

    def delete(self, name: str, yes: bool, now: float) -> dict:
        rt = self.fleet.runtime(name)
        if not yes:
            raise AutoDeployError(errors.CONFIRMATION_REQUIRED, f"deleting {name} shuts down its instances, "
                                  "removes its endpoint and forgets its revisions, events and cost")
        git = self.git.get(name)
        self.rollouts.cancel(rt, "deployment deleted", now)
        rt.removed = True
        for rec in rt.alive():
            self.fleet.release(rec, "deployment deleted")
        self.store.forget(name)
        self.rollouts.forget(name)
        msg = f"{name}: deleted; instances shut down, endpoint /d/{name}/ removed, stored state forgotten"
        if git is not None:
            # The file still defines it: stay deleted until that content changes.
            self.store.set_override(name, git.revision, {"deleted": True}, at=now)
            msg += (f". {git.source_file} still defines it: it stays deleted until its content there changes "
                    "(remove it from the file to make that permanent)")
        self.fleet.event(name, "deleted", msg)
        self.fleet.bump()
        return {"message": msg}

    def rollback(self, name: str, to: int | None, now: float) -> dict:
        rt = self.fleet.runtime(name)
        run = self.rollouts.active.get(name)
        if run is not None and not run.done and (to is None or to == run.stable_number):
            self.rollouts.rollback_now(rt, "manual rollback (by operator)", now)
            msg = f"{name}: rollout to revision {run.new_number} rolled back to revision {run.stable_number}"
            return {"message": msg, "drift": self.drift_of(name)}
        rows = self.store.revisions(name)
        serving = rt.revision_number
        if to is None:
            earlier = [r for r in rows if r.number < serving]
            if not earlier:
                raise AutoDeployError(errors.REVISION_NOT_FOUND, f"{name} serves revision {serving}, its first: "
                                      "nothing earlier to roll back to")
            target = earlier[-1]
        else:
            found = [r for r in rows if r.number == to]
            if not found:
                have = ", ".join(str(r.number) for r in rows) or "none"
                raise AutoDeployError(errors.REVISION_NOT_FOUND, f"{name} has no revision {to} (revisions: {have})")
            target = found[0]
        if target.number == serving:
            return {"message": f"{name}: already serving revision {serving}", "drift": self.drift_of(name)}
        data = self._data(name)
        if target.number == self._git_number(name):
            data.pop("rollback_to", None)
            data.pop("rollback_reason", None)
        else:
            data["rollback_to"], data["rollback_reason"] = target.number, "manual rollback (by operator)"
        self._save(name, data)
        spec = overlay(spec_from_revision(target), data)
        old, old_number = rt.spec, rt.revision_number
        rt.spec, rt.revision_number = spec, target.number
        self.fleet.event(name, "rollback", f"to revision {target.number} from {old_number} (by operator)")
        self.rollouts.changed(rt, old, old_number, now, kind="rollback")
        self.fleet.bump()
        return {"message": f"{name}: rolling back from revision {old_number} to revision {target.number}",
                "drift": self.drift_of(name)}

    # ------------------------------------------------------------------ read actions
    def history(self, name: str) -> dict:
        rows = self.store.revisions(name)
        rt = self.fleet.deps.get(name)
        if not rows and (rt is None or rt.removed):
            raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, f"no deployment named {name!r}")
        serving = rt.revision_number if rt is not None and not rt.removed else None
        git_number = self._git_number(name)
        out, prev = [], None
        for row in rows:
            edit = edits.classify(prev, row.content)
            out.append({"number": row.number, "revision": row.revision, "applied_at": row.applied_at,
                        "file": row.source_file, "kind": edit.kind if prev is not None else "created",
                        "changes": [_shown(c) for c in edit.changes] if prev is not None else [],
                        "serving": row.number == serving, "file_revision": row.number == git_number,
                        "commit": row.commit.to_json() if row.commit else None})
            prev = row.content
        return {"name": name, "serving": serving, "file_revision": git_number, "revisions": out}

    def rollout(self, name: str) -> dict:
        rt = self.fleet.runtime(name)
        status = self.rollouts.status(name, self.clock())
        return {"name": name, "revision": rt.revision_number, "rollout": status}

    def drift(self, name: str) -> dict:
        if name not in self.git and self.store.override(name) is None:
            raise AutoDeployError(errors.UNKNOWN_DEPLOYMENT, f"no deployment named {name!r}")
        return {"name": name, "drift": self.drift_of(name)}

    def drift_of(self, name: str) -> dict | None:
        """How the running deployment differs from its file, or None."""
        found = self.store.override(name)
        git = self.git.get(name)
        if found is None or git is None:
            return None
        base, data, at = found
        changes = []
        if data.get("deleted"):
            changes.append({"field": "deleted", "file": "defined", "runtime": "deleted",
                            "by": "autodeploy delete"})
        if data.get("rollback_to"):
            changes.append({"field": "revision", "file": self._git_number(name), "runtime": data["rollback_to"],
                            "by": data.get("rollback_reason", "rollback")})
        if data.get("state"):
            changes.append({"field": "state", "file": git.state, "runtime": data["state"],
                            "by": f"autodeploy {'stop' if data['state'] == 'stopped' else 'start'}"})
        if data.get("replicas") is not None:
            changes.append({"field": "replicas", "file": f"minReplicas {git.scaling.min_replicas}",
                            "runtime": data["replicas"], "by": "autodeploy scale"})
        if not changes:
            return None
        number = self._git_number(name)
        commit = self.store.revision_commit(name, number) if number is not None else None
        return {"since": at, "file": git.source_file, "file_revision": number,
                "commit": commit.to_json() if commit else None, "changes": changes,
                "note": "runtime actions are not written to the file; a new content of it wins and clears this"}

    def drift_all(self) -> list[dict]:
        names = sorted(set(self.git) | set(self.store.overrides()))
        out = []
        for name in names:
            d = self.drift_of(name)
            if d is not None:
                out.append({"name": name, **d})
        return out

    # ------------------------------------------------------------------ helpers
    def _data(self, name: str) -> dict:
        found = self.store.override(name)
        git = self.git.get(name)
        if found is None or git is None or found[0] != git.revision:
            return {}
        return dict(found[1])

    def _save(self, name: str, data: dict) -> None:
        git = self.git.get(name)
        data = {k: v for k, v in data.items() if v is not None}
        if git is None or not data:
            self.store.clear_override(name)
            return
        self.store.set_override(name, git.revision, data, at=self.clock())

    def _revision(self, name: str, number: int) -> RevisionRow | None:
        return next((r for r in self.store.revisions(name) if r.number == number), None)

    def _git_number(self, name: str) -> int | None:
        git = self.git.get(name)
        if git is None:
            return None
        rows = [r for r in self.store.revisions(name) if r.revision == git.revision]
        return rows[-1].number if rows else None


def _shown(change: Any) -> str:
    """A change for the history: environment values are never printed (they may be secrets)."""
    if change.path == "spec.env" or change.path.startswith("spec.env."):
        verb = "set" if change.old is None else "removed" if change.new is None else "changed"
        return f"{change.path}: {verb} (spec.env values are not shown)"
    return str(change)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or value is None:
        raise AutoDeployError(errors.BAD_REQUEST, f"{what} must be a whole number, got {value!r}")
    try:
        return int(str(value))
    except ValueError:
        raise AutoDeployError(errors.BAD_REQUEST, f"{what} must be a whole number, got {value!r}") from None


def _summary(data: dict) -> str:
    parts = []
    if data.get("deleted"):
        parts.append("deleted")
    if data.get("rollback_to"):
        parts.append(f"rollback to revision {data['rollback_to']}")
    if data.get("state"):
        parts.append(f"state {data['state']}")
    if data.get("replicas") is not None:
        parts.append(f"scale {data['replicas']}")
    return ", ".join(parts) or "none"
