"""`autodeploy serve --git-repo`: a real serve follows a real bare repository that the test
pushes to (`git init --bare`, cloned, commits pushed), with real instances behind it."""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import PY, deployment_yaml
from tests.gitrepo import AUTHOR, Remote

CLI = str(Path(PY).parent / "autodeploy")
BAD = "apiVersion: autodeploy/v1\nkind: Deployment\nmetadata:\n  name: hello\nspec:\n  model: {id: echo, version: v1}\n" \
      "  command: run\n  port: 8080\n  scaling: {maxReplica: 2}\n"


def hello(version: str = "v1") -> str:
    return deployment_yaml("hello", min_replicas=1).replace("version: v1", f"version: {version}")


def serving_revision(served) -> str | None:
    resp = served.get("/d/hello/whoami")
    return resp.headers.get("Deploy-Revision") if resp.status_code == 200 else None


def only_revision(served, number: int) -> bool:
    """Every instance of hello is ready and serves revision `number` (the rollout is over)."""
    insts = served.instances("hello")
    return bool(insts) and all(i["state"] == "ready" and i["revision_number"] == number for i in insts)


def cli(served, *args: str) -> str:
    proc = subprocess.run([CLI, *args, "--url", served.url], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def install_readme_hook(remote: Remote, url: str) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    hook = readme.split("# hooks/post-receive in the bare repository serve follows\n")[1].split("```")[0]
    path = remote.bare / "hooks" / "post-receive"
    path.write_text("#!/bin/sh\n" + hook.replace("http://deploy-host:8080", url))
    path.chmod(0o755)


def dashboard(served, path: str) -> str:
    """A dashboard page, logged in with serve's admin token as a browser would be."""
    import requests
    with requests.Session() as browser:
        assert browser.get(f"{served.url}/ui/login", params={"token": served.token}, timeout=30).status_code == 200
        resp = browser.get(served.url + path, timeout=30)
        assert resp.status_code == 200, resp.text[:500]
        return resp.text


def start(serve, remote: Remote):
    return serve({}, "--git-repo", remote.url, "--git-interval", "1s", folder=False)


def test_serve_follows_a_branch_applies_refuses_and_reverts_commits(serve, tmp_path):
    remote = Remote(tmp_path / "git")
    first = remote.commit("add hello", hello_yaml=hello())
    served = start(serve, remote)
    served.wait_for(lambda: serving_revision(served) == "1", what="hello serving revision 1")
    assert served.status("hello")["revision"]["commit"] == {
        "sha": first, "short": first[:12], "author": AUTHOR, "subject": "add hello"}
    source = served.get("/api/git").json()
    assert (source["kind"], source["repo"], source["branch"], source["path"]) == \
        ("git", remote.url, "main", "deployments")
    assert source["live_commit"]["sha"] == first and source["last_fetch_at"] and source["last_fetch_error"] is None

    # A new deployment appears by polling alone (no sync call): within one interval.
    remote.commit("add second", second_yaml=deployment_yaml("second"))
    served.wait_for(lambda: "second" in [d["name"] for d in served.status()["deployments"]], timeout=30,
                    what="the pushed deployment")

    # A version bump, pushed to a repository with the README's post-receive hook: the push
    # returns once serve has fetched and applied it, and it rolls out.
    install_readme_hook(remote, served.url)
    bump = remote.commit("hello v2", hello_yaml=hello("v2"))
    assert served.get("/api/git").json()["live_commit"]["sha"] == bump
    served.wait_for(lambda: only_revision(served, 2), timeout=60, what="rollout to revision 2")
    assert served.status("hello")["model"]["version"] == "v2"

    # An invalid commit is refused whole; revision 2 keeps serving.
    bad = remote.commit("typo in hello", hello_yaml=BAD)
    resp = served.post("/api/git/sync")
    body = resp.json()
    assert resp.status_code == 422 and body["code"] == 1062
    assert bad[:12] in body["msg"] and "deployments/hello.yaml:9: unknown key 'maxReplica'" in body["msg"]
    source = served.get("/api/git").json()
    assert source["refused_commit"]["sha"] == bad and source["live_commit"]["sha"] == bump
    assert any(e["kind"] == "refused" and bad[:12] in e["message"] for e in source["events"])
    assert serving_revision(served) == "2" and served.status("hello")["model"]["version"] == "v2"
    assert "refused commit" in cli(served, "status")
    page = dashboard(served, "/ui/")
    assert f"Refused commit <code>{bad[:12]}</code> typo in hello" in page and bump[:12] in page
    assert "deployments/hello.yaml:9: unknown key" in page

    # Reverting the typo and then the bump rolls back: the revert is just a new revision.
    remote.revert(bad)
    revert = remote.revert(bump)
    resp = served.post("/api/git/sync")
    assert resp.status_code == 200 and resp.json()["live_commit"]["sha"] == revert
    assert resp.json()["refused_commit"] is None
    served.wait_for(lambda: only_revision(served, 3), timeout=60, what="rollout to revision 3")
    assert serving_revision(served) == "3" and served.status("hello")["model"]["version"] == "v1"
    history = served.get("/api/deployments/hello/history").json()["revisions"]
    assert [(r["number"], r["commit"]["sha"], r["commit"]["subject"]) for r in history] == [
        (1, first, "add hello"), (2, bump, "hello v2"), (3, revert, 'Revert "hello v2"')]
    assert f"at commit <code>{revert[:12]}</code> Revert" in dashboard(served, "/ui/d/hello")
    out = cli(served, "history", "hello")
    assert revert[:12] in out and 'Revert "hello v2"' in out and "Ada Lovelace" in out

    # Drift is reported against the live commit.
    assert "no drift: the deployment runs as commit " + revert[:12] in cli(served, "diff", "hello")
    assert served.post("/api/deployments/hello/scale", json={"replicas": 2}).status_code == 200
    out = cli(served, "diff", "hello")
    assert f"runtime differs from deployments/hello.yaml at commit {revert[:12]}" in out


def test_serve_follows_a_force_push_and_keeps_serving_while_the_repo_is_unreachable(serve, tmp_path):
    remote = Remote(tmp_path / "git")
    first = remote.commit("v1", hello_yaml=hello())
    served = start(serve, remote)
    served.wait_for(lambda: serving_revision(served) == "1", what="hello serving revision 1")
    remote.commit("v2", hello_yaml=hello("v2"))
    # Polling now is the operator's: a viewer gets 403, nobody at all 401 (and nothing is fetched).
    viewer = served.post("/api/tokens", json={"name": "git-viewer", "role": "viewer"}).json()["token"]
    refused = served.post("/api/git/sync", headers={"Authorization": f"Bearer {viewer}"})
    assert (refused.status_code, refused.json()["code"]) == (403, 1032)
    anonymous = served.post("/api/git/sync", auth=False)
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, 1030)
    assert served.get("/api/git").json()["live_commit"]["sha"] == first
    assert served.post("/api/git/sync").status_code == 200
    served.wait_for(lambda: only_revision(served, 2), timeout=60, what="rollout to revision 2")
    audit = [e["message"] for e in served.get("/api/events?limit=1000").json() if e["kind"] == "audit"]
    assert any(m.startswith("git sync by token admin") and m.endswith(": done") for m in audit), audit

    # History rewritten: the branch goes back to the first commit. The tip is the desired state.
    remote.force_reset(first)
    resp = served.post("/api/git/sync")
    assert resp.status_code == 200 and resp.json()["live_commit"]["sha"] == first
    served.wait_for(lambda: only_revision(served, 3), timeout=60, what="rollout to revision 3")
    assert served.status("hello")["revision"]["commit"]["sha"] == first

    # The remote goes away: reported (sync, status, events), retried, and serving goes on.
    away = tmp_path / "moved.git"
    remote.bare.rename(away)
    resp = served.post("/api/git/sync")
    assert resp.status_code == 502 and resp.json()["code"] == 1061
    source = served.get("/api/git").json()
    assert source["last_fetch_error"].startswith("git fetch: ") and source["consecutive_failures"] >= 1
    assert source["live_commit"]["sha"] == first
    assert any(e["kind"] == "fetch_failed" for e in source["events"])
    for _ in range(5):
        assert serving_revision(served) == "3"
    assert "fetch failing" in cli(served, "status")
    assert 'id="fetch-error">Fetch failing' in dashboard(served, "/ui/")
    away.rename(remote.bare)
    resp = served.post("/api/git/sync")
    assert resp.status_code == 200 and resp.json()["last_fetch_error"] is None


def test_sync_on_a_folder_serve_says_it_follows_no_repository(serve):
    served = serve({"hello.yaml": deployment_yaml("hello")})
    resp = served.post("/api/git/sync")
    assert resp.status_code == 409 and resp.json()["code"] == 1060
    assert served.get("/api/git").json()["kind"] == "folder"
