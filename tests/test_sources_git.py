"""The git source against a real bare repository (no serve): what it applies, refuses,
follows and reports; the store migration; the backoff; the credential path."""
from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from conftest import free_port
from controller.errors import AutoDeployError
from controller.policy.fetch import MAX_BACKOFF_S, fetch_retry_delay, next_poll_at
from controller.sources import SourceWatcher
from controller.sources.git import GitMirror, GitSource, check_options, mirror_dir, redact
from controller.sources.secrets import resolve_credential
from controller.stack import load_stack
from controller.store import Commit, Store
from tests.conftest import deployment_yaml
from tests.gitrepo import AUTHOR, AuthGitServer, Remote

BAD = "apiVersion: autodeploy/v1\nkind: Deployment\nmetadata:\n  name: hello\nspec:\n  model: {id: echo, version: v1}\n" \
      "  command: run\n  port: 8080\n  scaling: {maxReplica: 2}\n"


def source(tmp: Path, url: str, events: list | None = None, **kw) -> GitSource:
    opts = check_options(url, kw.pop("branch", "main"), kw.pop("path", "deployments"), kw.pop("interval", "1s"),
                         **kw)
    sink = events if events is not None else []
    return GitSource(opts, GitMirror(mirror_dir(tmp / "state", opts), opts), lambda: {"require_image": False},
                     on_event=lambda kind, msg: sink.append((kind, msg)))


def names(update) -> list[str]:
    return sorted(d.name for d in update.result.deployments)


def test_a_valid_commit_loads_with_its_sha_author_and_subject(tmp_path):
    remote = Remote(tmp_path)
    sha = remote.commit("add hello", hello_yaml=deployment_yaml("hello"))
    src = source(tmp_path, remote.url)
    update = src.initial(now=100.0)
    assert names(update) == ["hello"]
    assert update.commit == Commit(sha, AUTHOR, "add hello")
    assert update.result.deployments[0].source_file == "deployments/hello.yaml"
    src.applied(update, now=100.0)
    st = src.status()
    assert st["live_commit"]["sha"] == sha and st["fetched_commit"] == sha and st["last_fetch_at"] == 100.0
    assert st["repo"] == remote.url and st["branch"] == "main" and st["path"] == "deployments"
    assert src.poll(now=101.0) is None  # nothing new: nothing to apply


def test_an_invalid_commit_is_refused_whole_with_file_line_and_sha_and_live_stays(tmp_path):
    remote = Remote(tmp_path)
    good = remote.commit("add hello", hello_yaml=deployment_yaml("hello"))
    events: list = []
    src = source(tmp_path, remote.url, events)
    src.applied(src.initial(now=1.0), now=1.0)
    # One good file and one bad one: the whole commit is refused, not half of it.
    bad = remote.commit("break it", hello_yaml=BAD, other_yaml=deployment_yaml("other"))
    assert src.poll(now=2.0) is None
    st = src.status()
    assert st["live_commit"]["sha"] == good
    refused = st["refused_commit"]
    assert refused["sha"] == bad and refused["subject"] == "break it"
    assert any(e.startswith("deployments/hello.yaml:9: ") and "maxReplicas" in e for e in refused["errors"])
    kind, message = events[-1]
    assert kind == "refused" and bad[:12] in message and f"commit {good[:12]} keeps serving" in message
    with pytest.raises(AutoDeployError) as exc:
        src.sync_outcome()
    assert exc.value.error.code == 1062 and "deployments/hello.yaml:9" in exc.value.message
    fixed = remote.commit("fix it", hello_yaml=deployment_yaml("hello", max_replicas=2))
    update = src.poll(now=3.0)
    assert update.commit.sha == fixed and names(update) == ["hello", "other"]
    src.applied(update, now=3.0)
    assert src.status()["refused_commit"] is None and src.sync_outcome()["live_commit"]["sha"] == fixed


def test_a_force_push_is_followed_to_the_rewritten_tip(tmp_path):
    remote = Remote(tmp_path)
    first = remote.commit("v1", hello_yaml=deployment_yaml("hello"))
    src = source(tmp_path, remote.url)
    src.applied(src.initial(now=1.0), now=1.0)
    remote.commit("v2", hello_yaml=deployment_yaml("hello", max_replicas=2))
    src.applied(src.poll(now=2.0), now=2.0)
    remote.force_reset(first)
    rewritten = remote.commit("v3 instead", hello_yaml=deployment_yaml("hello", max_replicas=5))
    update = src.poll(now=3.0)
    assert update.commit.sha == rewritten
    assert update.result.deployments[0].scaling.max_replicas == 5


def test_an_unreachable_repo_is_reported_backs_off_and_recovers(tmp_path):
    remote = Remote(tmp_path)
    sha = remote.commit("v1", hello_yaml=deployment_yaml("hello"))
    events: list = []
    src = source(tmp_path, remote.url, events, interval="2s")
    src.applied(src.initial(now=10.0), now=10.0)
    moved = tmp_path / "elsewhere.git"
    remote.bare.rename(moved)
    assert src.poll(now=20.0) is None and src.poll(now=30.0) is None
    st = src.status()
    assert st["consecutive_failures"] == 2 and st["live_commit"]["sha"] == sha
    assert "git fetch" in st["last_fetch_error"] and st["last_fetch_error_at"] == 30.0
    assert st["next_fetch_at"] == 30.0 + fetch_retry_delay(2, 2.0) == 38.0
    assert [k for k, _ in events].count("fetch_failed") == 1  # the same error is not repeated every retry
    with pytest.raises(AutoDeployError) as exc:
        src.sync_outcome()
    assert exc.value.error.code == 1061
    moved.rename(remote.bare)
    assert src.poll(now=40.0) is None  # same commit: nothing to apply, error cleared
    st = src.status()
    assert st["last_fetch_error"] is None and st["consecutive_failures"] == 0 and st["last_fetch_at"] == 40.0
    assert events[-1][0] == "fetch_recovered"


def test_a_restart_without_the_remote_serves_the_last_good_commit(tmp_path):
    remote = Remote(tmp_path)
    good = remote.commit("v1", hello_yaml=deployment_yaml("hello"))
    first = source(tmp_path, remote.url)
    first.applied(first.initial(now=1.0), now=1.0)
    remote.commit("broken", hello_yaml=BAD)
    assert first.poll(now=2.0) is None
    # A new serve: the tip is refused, so it starts from the commit the last run served.
    second = source(tmp_path, remote.url)
    update = second.initial(now=3.0)
    assert update.commit.sha == good and names(update) == ["hello"]
    assert second.status()["refused_commit"]["subject"] == "broken"
    remote.bare.rename(tmp_path / "gone.git")
    third = source(tmp_path, remote.url)
    update = third.initial(now=4.0)
    assert update.commit.sha == good and third.status()["last_fetch_error"]


def test_a_commit_outside_the_path_moves_the_live_commit_without_an_update(tmp_path):
    remote = Remote(tmp_path)
    remote.commit("v1", hello_yaml=deployment_yaml("hello"))
    src = source(tmp_path, remote.url)
    src.applied(src.initial(now=1.0), now=1.0)
    (remote.work / "README.md").write_text("docs\n")
    docs = remote.commit("docs only")
    assert src.poll(now=2.0) is None
    assert src.status()["live_commit"]["sha"] == docs


def test_a_missing_path_or_unreadable_file_refuses_the_commit(tmp_path):
    remote = Remote(tmp_path)
    remote.commit("v1", hello_yaml=deployment_yaml("hello"))
    src = source(tmp_path, remote.url, path="manifests")
    assert src.initial(now=1.0) is None
    assert src.status()["refused_commit"]["errors"][0].startswith("manifests: no such folder in commit")
    (remote.work / "deployments" / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    remote.commit("latin-1")
    src2 = source(tmp_path / "b", remote.url)
    assert src2.initial(now=1.0) is None
    assert "deployments/latin1.yaml: is not UTF-8 text; save it as UTF-8" in src2.status()["refused_commit"]["errors"]


def test_a_sync_request_polls_at_once_and_answers_after_the_poll(tmp_path):
    import threading
    remote = Remote(tmp_path)
    remote.commit("v1", hello_yaml=deployment_yaml("hello"))
    applied: list = []
    src = source(tmp_path, remote.url, interval="24h")
    watcher = SourceWatcher(src, lambda update: applied.append(update.commit.subject))
    watcher.load_initial()
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        remote.commit("v2", hello_yaml=deployment_yaml("hello", max_replicas=2))
        out = watcher.sync(timeout=60)  # the interval is a day: only the sync polls
        assert applied == ["v1", "v2"] and out["live_commit"]["subject"] == "v2"
    finally:
        stop.set()
        thread.join(timeout=5)


def test_credentials_are_redacted_from_fetch_errors_and_status(tmp_path):
    url = f"http://ada:s3cr3t-token@127.0.0.1:{free_port()}/repo.git"
    src = source(tmp_path, url)
    assert src.initial(now=1.0) is None
    st = src.status()
    assert st["repo"] == f"http://***@127.0.0.1:{url.rsplit(':', 1)[1]}" and st["last_fetch_error"]
    assert "s3cr3t" not in repr(st) and "s3cr3t" not in repr(src.opts)
    assert redact("fatal: unable to access 'https://u:p@h/x/': boom", ("tok",)) == \
        "fatal: unable to access 'https://***@h/x/': boom"


def test_a_credential_reaches_git_only_through_the_helper_environment(tmp_path):
    opts = check_options("https://git.example.com/team/deploy.git", credential="tok-123")
    mirror = GitMirror(tmp_path / "m", opts)
    mirror.ensure()
    assert all("tok-123" not in arg for arg in mirror._config)
    out = mirror.git("credential", "fill", stdin=b"protocol=https\nhost=git.example.com\n\n").decode()
    assert "username=x-access-token\n" in out and "password=tok-123\n" in out
    assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o700


@pytest.mark.parametrize("failures, expected", [(0, 30.0), (1, 60.0), (2, 120.0), (3, 240.0), (4, 300.0),
                                                (50, 300.0)])
def test_fetch_backoff_doubles_from_the_interval_up_to_a_cap(failures, expected):
    assert fetch_retry_delay(failures, 30.0) == expected
    assert next_poll_at(1000.0, failures, 30.0) == 1000.0 + expected


def test_fetch_backoff_never_drops_below_a_long_interval():
    assert fetch_retry_delay(3, 3600.0) == 3600.0 and MAX_BACKOFF_S < 3600.0
    assert fetch_retry_delay(1, 0.5) == 1.0


@pytest.mark.parametrize("kw, fragment", [
    ({"repo": "--upload-pack=touch /tmp/x"}, "give a URL git accepts"),
    ({"branch": "bad..name"}, "not a valid branch name"),
    ({"path": "../etc"}, "inside the repository"),
    ({"interval": "5 minutes"}, "git interval"),
    ({"interval": "10ms"}, "between 0.2s and 24h"),
])
def test_bad_git_options_say_what_to_change(kw, fragment):
    args = {"repo": "file:///srv/deploy.git", "branch": "main", "path": "deployments", "interval": "30s", **kw}
    with pytest.raises(AutoDeployError) as exc:
        check_options(**args)
    assert exc.value.error.code == 1014 and fragment in exc.value.message


def _stack(tmp_path: Path, body: str) -> Path:
    (tmp_path / "stacks").mkdir(parents=True, exist_ok=True)
    (tmp_path / "stacks" / "Pulumi.dev.yaml").write_text(body)
    return tmp_path


def test_stack_config_git_keys_are_read_and_checked_with_file_and_line(tmp_path):
    project = _stack(tmp_path, "config:\n  autodeploy:driver: local\n  autodeploy:git:\n"
                               "    repo: https://git.example.com/team/deploy.git\n    branch: prod\n"
                               "    interval: 10s\n    credential: autodeploy:gitToken\n"
                               "  autodeploy:gitToken:\n    secure: v1:abc\n")
    git = load_stack(project, "dev").git
    assert (git.repo, git.branch, git.path, git.interval, git.credential) == \
        ("https://git.example.com/team/deploy.git", "prod", "deployments", "10s", "autodeploy:gitToken")
    _stack(tmp_path, "config:\n  autodeploy:git:\n    repo: x\n    brunch: main\n")
    with pytest.raises(AutoDeployError) as exc:
        load_stack(project, "dev")
    assert exc.value.message.endswith("stacks/Pulumi.dev.yaml:2: autodeploy:git: value has unknown key(s) brunch; "
                                      "allowed: repo, branch, path, interval, credential, username")


def test_a_credential_must_be_a_stack_secret_decrypted_by_the_pulumi_cli(tmp_path, monkeypatch):
    project = _stack(tmp_path, "config:\n  autodeploy:git:\n    repo: https://h/x.git\n"
                               "    credential: autodeploy:gitToken\n  autodeploy:gitToken: plain\n")
    stack = load_stack(project, "dev")
    with pytest.raises(AutoDeployError, match="stored in plain text"):
        resolve_credential(stack, stack.git.credential, project)
    _stack(tmp_path, "config:\n  autodeploy:git:\n    repo: https://h/x.git\n"
                     "    credential: autodeploy:gitToken\n  autodeploy:gitToken:\n    secure: v1:xyz\n")
    stack = load_stack(project, "dev")
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    with pytest.raises(AutoDeployError, match="Pulumi CLI"):
        resolve_credential(stack, stack.git.credential, project)
    # The Pulumi CLI cannot be installed here: FakePulumi answers `pulumi config get` as it would.
    fake = tmp_path / "bin" / "pulumi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n# FakePulumi\n[ "$1 $2 $3" = "config get autodeploy:gitToken" ] && '
                    '[ "$5" = dev ] && echo "tok-from-secret" && exit 0\necho "unexpected: $*" >&2; exit 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert resolve_credential(stack, stack.git.credential, project) == "tok-from-secret"


def test_serve_fetches_with_the_stack_secret_from_a_remote_that_needs_it_and_never_shows_it(
        tmp_path, monkeypatch, caplog):
    import json
    import logging
    from controller.serve import ServeOptions, Server
    caplog.set_level(logging.DEBUG)
    remote = Remote(tmp_path / "git")
    sha = remote.commit("v1", hello_yaml=deployment_yaml("hello"))
    http = AuthGitServer(remote.bare, "deployer", "tok-s3cret")
    try:
        # Without the credential, and with a wrong one: refused by the remote, reported, redacted.
        anonymous = source(tmp_path / "a", http.url)
        assert anonymous.initial(now=1.0) is None and anonymous.status()["last_fetch_error"].startswith("git fetch")
        wrong = source(tmp_path / "b", http.url, credential="wrong-tok", username="deployer")
        assert wrong.initial(now=1.0) is None and "wrong-tok" not in json.dumps(wrong.status())
        # serve with autodeploy:git and a credential kept as a stack secret.
        project = _stack(tmp_path / "project", f"config:\n  autodeploy:git:\n    repo: {http.url}\n"
                         "    credential: autodeploy:gitToken\n    username: deployer\n    interval: 1s\n"
                         "  autodeploy:gitToken:\n    secure: v1:abc\n")
        fake = tmp_path / "bin" / "pulumi"  # FakePulumi: the CLI cannot be installed here
        fake.parent.mkdir()
        fake.write_text('#!/bin/sh\n# FakePulumi\n[ "$1 $2 $3" = "config get autodeploy:gitToken" ] && '
                        'echo tok-s3cret\n')
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
        server = Server(ServeOptions(project_dir=project, stack="dev", deployments=None,
                                     state_dir=tmp_path / "state", host=None, port=free_port(), driver="local"))
        try:
            server.load()
            assert "hello" in server.controller.deps
            assert server.store.revisions("hello")[0].commit.sha == sha
            shown = json.dumps(server.controller.status()) + json.dumps(server.watcher.status(events=True))
            assert server.watcher.status()["live_commit"]["sha"] == sha and "tok-s3cret" not in shown
        finally:
            server.driver.close()
            server.store.close()
    finally:
        http.close()
    assert any(h and h.startswith("Basic ") for h in http.seen)
    assert not any("tok-s3cret" in r.getMessage() or "wrong-tok" in r.getMessage() for r in caplog.records)


OLD_REVISIONS = """CREATE TABLE revisions (
  deployment TEXT NOT NULL, number INTEGER NOT NULL, revision TEXT NOT NULL, applied_at REAL NOT NULL,
  source_file TEXT NOT NULL, content TEXT NOT NULL, PRIMARY KEY (deployment, number));"""


def test_a_database_from_before_git_sources_is_migrated_and_keeps_its_revisions(tmp_path):
    path = tmp_path / "autodeploy.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_REVISIONS)
    db.execute("INSERT INTO revisions VALUES ('hello', 1, 'aaa', 1.0, 'd/hello.yaml', '{\"a\": 1}')")
    db.commit()
    db.close()
    store = Store(path)
    commit = Commit("f" * 40, AUTHOR, "bump")
    assert store.record_revision("hello", "bbb", "deployments/hello.yaml", {"a": 2}, commit=commit) == 2
    old, new = store.revisions("hello")
    assert (old.number, old.content, old.commit) == (1, {"a": 1}, None)
    assert (new.number, new.commit) == (2, commit)
    assert store.revision_commit("hello", 2) == commit and store.revision_commit("hello", 1) is None
    store.close()
    Store(path).close()  # opening a migrated database again changes nothing


def test_a_sync_that_outlasts_its_timeout_answers_1063_and_the_poll_goes_on(tmp_path):
    """A remote that accepts the connection and never answers: the sync gives up after its
    timeout with 1063 (the poll keeps running, bounded by the fetch timeout)."""
    import socket
    import threading
    import time
    silent = socket.socket()
    silent.bind(("127.0.0.1", free_port()))
    silent.listen(8)  # never accepted, never answered
    src = source(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}/repo.git", interval="24h")
    watcher = SourceWatcher(src, lambda update: None)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        t = time.monotonic()
        with pytest.raises(AutoDeployError) as exc:
            watcher.sync(timeout=1.0)
        assert exc.value.error.code == 1063 and exc.value.error.http_status == 504
        assert "no poll finished within 1 s" in exc.value.message and time.monotonic() - t < 30
    finally:
        silent.close()  # the hanging fetch now fails at once and the poll ends
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert src.status()["last_fetch_error"]
