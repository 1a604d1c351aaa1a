"""The git source: serve follows one branch of a repository (pull-based GitOps).

Git itself does the work (the `git` CLI, in a subprocess with a timeout, never a prompt):
a bare mirror under the state directory fetches the branch (forced: the branch tip is the
desired state, force-pushes and rewrites included), and the YAML under `path` is read
straight from the fetched commit's tree. A commit whose files do not all validate is
refused as a whole, with every FILE:LINE error and its SHA; the last good commit keeps
serving (`refs/autodeploy/live` in the mirror remembers it across restarts).

Credentials come from the user's git or ssh configuration, or from `credential` (a stack
secret), which reaches git only through the environment of a credential helper. Every
text that leaves here (logs, events, status) has URL userinfo and the credential redacted.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from controller import errors
from controller.errors import AutoDeployError
from controller.loader import MAX_FILE_BYTES, YAML_SUFFIXES, LoadResult, SpecError, load_texts, parse_duration
from controller.policy.fetch import next_poll_at
from controller.sources import LoadArgs, SourceUpdate
from controller.store import Commit

log = logging.getLogger("autodeploy.sources.git")

FETCH_TIMEOUT_S = 120.0  # one fetch, network included
LOCAL_TIMEOUT_S = 30.0  # a command on the local mirror
MAX_FILES = 1000
MAX_ERRORS_SHOWN = 50
MIN_INTERVAL_S = 0.2
MAX_INTERVAL_S = 24 * 3600.0
LIVE_REF = "refs/autodeploy/live"
DEFAULT_USERNAME = "x-access-token"  # what GitHub and others accept beside a token

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]*@")
# Reads the credential from the helper's environment: it never appears in an argument list.
_HELPER = ('!f() { test "$1" = get || exit 0; echo "username=$AUTODEPLOY_GIT_USERNAME"; '
           'echo "password=$AUTODEPLOY_GIT_PASSWORD"; }; f')


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """URL userinfo (`https://user:token@host`) and known secrets replaced by `***`."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class GitOptions:
    repo: str
    branch: str = "main"
    path: str = "deployments"
    interval_s: float = 30.0
    credential: str | None = field(default=None, repr=False)  # a password or token; never shown
    username: str | None = None

    @property
    def shown_repo(self) -> str:
        return redact(self.repo, (self.credential or "",))

    def __repr__(self) -> str:  # the URL may carry userinfo: logs and tracebacks get the redacted one
        return (f"GitOptions(repo={self.shown_repo!r}, branch={self.branch!r}, path={self.path!r}, "
                f"interval_s={self.interval_s!r}, credential={'***' if self.credential else None})")


def check_options(repo: str, branch: str = "main", path: str = "deployments", interval: str | float = "30s",
                  credential: str | None = None, username: str | None = None) -> GitOptions:
    """Checked options, or AutoDeployError(1014) saying what to change."""
    def bad(msg: str) -> AutoDeployError:
        return AutoDeployError(errors.SPEC_INVALID, msg)
    repo = (repo or "").strip()
    if not repo or len(repo) > 2048 or any(c.isspace() for c in repo) or repo.startswith("-"):
        raise bad(f"git repository {redact(repo)!r}: give a URL git accepts (file://, ssh://, https://, "
                  "user@host:path or a local path), without spaces, at most 2048 characters")
    branch = (branch or "").strip()
    if not branch or branch.startswith("-") or not _branch_name_ok(branch):
        raise bad(f"git branch {branch!r} is not a valid branch name (see `git check-ref-format --branch`)")
    clean = PurePosixPath((path or ".").strip() or ".")
    if clean.is_absolute() or ".." in clean.parts:
        raise bad(f"git path {path!r} must be a folder inside the repository (relative, without '..')")
    try:
        interval_s = parse_duration(interval)
    except ValueError as exc:
        raise bad(f"git interval {interval!r}: {exc}") from None
    if not MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S:
        raise bad(f"git interval {interval!r} must be between {MIN_INTERVAL_S:g}s and 24h")
    if credential is not None and not credential.strip():
        raise bad("git credential is empty")
    return GitOptions(repo=repo, branch=branch, path=str(clean), interval_s=interval_s,
                      credential=credential, username=username)


def _branch_name_ok(branch: str) -> bool:
    try:
        proc = subprocess.run(["git", "check-ref-format", f"refs/heads/{branch}"], capture_output=True,
                              timeout=LOCAL_TIMEOUT_S, env=_env(None, None, None))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _env(credential: str | None, username: str | None, repo: str | None) -> dict[str, str]:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", LC_ALL="C", LANG="C")
    # ssh must fail rather than ask for a passphrase or a host key answer.
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o ConnectTimeout=20")
    env.pop("GIT_DIR", None)
    env.pop("GIT_WORK_TREE", None)
    if credential:
        from urllib.parse import urlsplit
        env["AUTODEPLOY_GIT_PASSWORD"] = credential
        env["AUTODEPLOY_GIT_USERNAME"] = username or (urlsplit(repo or "").username or DEFAULT_USERNAME)
    return env


class GitError(Exception):
    """A git command failed; the message is already redacted."""


class GitMirror:
    """A bare mirror of one branch under the state directory. Acts only: every decision is
    the GitSource's."""

    def __init__(self, directory: Path, opts: GitOptions) -> None:
        self.directory = directory
        self.opts = opts
        self._secrets = (opts.credential or "",)
        self._env = _env(opts.credential, opts.username, opts.repo)
        # Our helper alone when a credential is given; otherwise the user's own git config applies.
        self._config = ["-c", "credential.helper=", "-c", f"credential.helper={_HELPER}"] \
            if opts.credential else []
        self._config += ["-c", "http.lowSpeedLimit=1000", "-c", "http.lowSpeedTime=30"]

    def git(self, *args: str, timeout: float = LOCAL_TIMEOUT_S, check: bool = True,
            stdin: bytes | None = None) -> bytes:
        cmd = ["git", "--git-dir", str(self.directory), *self._config, *args]
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, env=self._env)
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} took longer than {timeout:g} s and was stopped") from None
        except OSError as exc:
            raise GitError(f"cannot run git: {exc}") from None
        if check and proc.returncode != 0:
            detail = proc.stderr.decode("utf-8", "replace").strip() or f"exit code {proc.returncode}"
            raise GitError(self.redact(f"git {args[0]}: {detail}"))
        return proc.stdout

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def ensure(self) -> None:
        if not (self.directory / "HEAD").is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)  # its config holds the URL, which may carry userinfo
            self.git("init", "--bare", "--quiet")
        current = self.git("config", "--get", "remote.origin.url", check=False).decode().strip()
        if current != self.opts.repo:
            self.git("config", "remote.origin.url", self.opts.repo)

    def fetch(self) -> None:
        branch = self.opts.branch
        self.git("fetch", "--force", "--no-tags", "--quiet", "origin",
                 f"+refs/heads/{branch}:refs/remotes/origin/{branch}", timeout=FETCH_TIMEOUT_S)

    def tip(self) -> str:
        out = self.git("rev-parse", "--verify", "--quiet", f"refs/remotes/origin/{self.opts.branch}^{{commit}}",
                       check=False).decode().strip()
        if not out:
            raise GitError(f"branch {self.opts.branch!r} was fetched but has no commit")
        return out

    def live(self) -> str | None:
        out = self.git("rev-parse", "--verify", "--quiet", f"{LIVE_REF}^{{commit}}", check=False).decode().strip()
        return out or None

    def set_live(self, sha: str) -> None:
        # A ref keeps the commit's objects even when a force-push removes it from the branch.
        self.git("update-ref", LIVE_REF, sha)

    def tree(self, sha: str, path: str) -> str | None:
        # `<commit>:<path>` takes everything after the colon as the path: check the type apart.
        spec = f"{sha}^{{tree}}" if path in ("", ".") else f"{sha}:{path}"
        out = self.git("rev-parse", "--verify", "--quiet", spec, check=False).decode().strip()
        if not out or self.git("cat-file", "-t", out, check=False).decode().strip() != "tree":
            return None
        return out

    def commit(self, sha: str) -> Commit:
        out = self.git("log", "-1", "--format=%H%x1f%an <%ae>%x1f%s", sha).decode("utf-8", "replace").strip()
        full, author, subject = (out.split("\x1f") + ["", ""])[:3]
        return Commit(full or sha, author, subject)

    def read_yaml(self, tree: str, shown_dir: str) -> tuple[list[tuple[str, str]], list[SpecError]]:
        """The *.yaml / *.yml files directly in `tree` (not recursive, as a folder is read):
        (shown name, text) pairs, and errors for the files that cannot be read."""
        listing = self.git("ls-tree", "-l", "-z", tree)
        wanted: list[tuple[str, str]] = []
        problems: list[SpecError] = []
        for entry in listing.split(b"\0"):
            if not entry:
                continue
            meta, _, raw_name = entry.partition(b"\t")
            mode, kind, obj, size = meta.split()
            name = raw_name.decode("utf-8", "replace")
            if kind != b"blob" or not name.endswith(YAML_SUFFIXES):
                continue
            shown = name if shown_dir in ("", ".") else f"{shown_dir}/{name}"
            if mode == b"120000":
                problems.append(SpecError(shown, 0, "is a symbolic link; commit the file itself"))
            elif int(size) > MAX_FILE_BYTES:
                problems.append(SpecError(shown, 0, (
                    f"is larger than {MAX_FILE_BYTES // 1024} KiB, the most a Deployment file may hold; "
                    "split it into several files")))
            else:
                wanted.append((shown, obj.decode()))
        if len(wanted) > MAX_FILES:
            return [], [SpecError(shown_dir, 0, f"holds {len(wanted)} YAML files, over the limit of {MAX_FILES}")]
        if not wanted:
            return [], problems
        blob = self.git("cat-file", "--batch", stdin="".join(obj + "\n" for _, obj in wanted).encode())
        items: list[tuple[str, str]] = []
        pos = 0
        for shown, _obj in wanted:
            header_end = blob.index(b"\n", pos)
            size = int(blob[pos:header_end].split()[2])
            data = blob[header_end + 1:header_end + 1 + size]
            pos = header_end + 1 + size + 1
            try:
                items.append((shown, data.decode("utf-8")))
            except UnicodeDecodeError:
                problems.append(SpecError(shown, 0, "is not UTF-8 text; save it as UTF-8"))
        return items, problems


@dataclass
class Refusal:
    commit: Commit
    errors: list[str]
    at: float

    def to_json(self) -> dict:
        return {**self.commit.to_json(), "errors": self.errors[:MAX_ERRORS_SHOWN],
                "error_count": len(self.errors), "at": self.at}


def mirror_dir(state_dir: Path, opts: GitOptions) -> Path:
    """One mirror per repository and branch, named by a hash (the URL may hold userinfo)."""
    key = hashlib.sha256(f"{opts.repo}\n{opts.branch}".encode()).hexdigest()[:16]
    return state_dir / "git" / key


class GitSource:
    kind = "git"

    def __init__(self, opts: GitOptions, mirror: GitMirror, load_args: LoadArgs,
                 on_event: Callable[[str, str], None] | None = None) -> None:
        self.opts = opts
        self.mirror = mirror
        self.load_args = load_args
        self._on_event = on_event or (lambda kind, msg: None)
        self._lock = threading.Lock()
        self.live: Commit | None = None
        self.live_at: float | None = None
        self.fetched_commit: str | None = None
        self.fetched_at: float | None = None
        self.last_attempt = 0.0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.failures = 0
        self.refused: Refusal | None = None
        self._seen_tree: str | None = None  # the tree under `path` last considered (applied or refused)

    # ------------------------------------------------------------------ Source
    def initial(self, now: float) -> SourceUpdate | None:
        update = self.poll(now)
        if update is not None:
            return update
        # Nothing new and valid at the tip (fetch failed, or the tip is refused): serve the
        # commit the previous run served, if there was one.
        try:
            self.mirror.ensure()
            live = self.mirror.live()
        except GitError as exc:
            log.warning("cannot read the mirror's last good commit: %s", exc)
            return None
        if live is None:
            return None
        commit = self.mirror.commit(live)
        result = self._load(live, commit)
        if result.errors:
            log.error("the last good commit %s no longer validates: serving nothing from git yet", live[:12])
            return None
        self._event("resumed", f"serving the last good commit {_describe(commit)} from the previous run "
                               f"until the branch tip is fetched and valid")
        return SourceUpdate(result, commit)

    def poll(self, now: float) -> SourceUpdate | None:
        with self._lock:
            self.last_attempt = now
        try:
            self.mirror.ensure()
            self.mirror.fetch()
            tip = self.mirror.tip()
        except GitError as exc:
            self._fetch_failed(str(exc), now)
            return None
        with self._lock:
            recovered = self.failures > 0
            self.failures, self.last_error, self.last_error_at = 0, None, None
            self.fetched_at, self.fetched_commit = now, tip
        if recovered:
            self._event("fetch_recovered", f"fetched {self.opts.shown_repo} {self.opts.branch} again: {tip[:12]}")
        return self._consider(tip, now)

    def applied(self, update: SourceUpdate, now: float) -> None:
        assert update.commit is not None
        with self._lock:
            self.live, self.live_at = update.commit, now
            if update.commit.sha == self.fetched_commit:  # the tip (not the last good one resumed)
                self.refused = None
        self._set_live_ref(update.commit.sha)
        self._event("applied", f"commit {_describe(update.commit)} is live "
                               f"({len(update.result.deployments)} deployment(s) under {self.opts.path})")

    def next_poll_at(self) -> float:
        with self._lock:
            return next_poll_at(self.last_attempt, self.failures, self.opts.interval_s)

    def status(self) -> dict:
        with self._lock:
            return {
                "kind": self.kind, "repo": self.opts.shown_repo, "branch": self.opts.branch,
                "path": self.opts.path, "interval_s": self.opts.interval_s,
                "live_commit": None if self.live is None else {**self.live.to_json(), "applied_at": self.live_at},
                "fetched_commit": self.fetched_commit, "last_fetch_at": self.fetched_at,
                "last_attempt_at": self.last_attempt or None,
                "last_fetch_error": self.last_error, "last_fetch_error_at": self.last_error_at,
                "consecutive_failures": self.failures,
                "next_fetch_at": next_poll_at(self.last_attempt, self.failures, self.opts.interval_s),
                "refused_commit": None if self.refused is None else self.refused.to_json(),
            }

    def sync_outcome(self) -> dict:
        status = self.status()
        if status["last_fetch_error"]:
            raise AutoDeployError(errors.GIT_FETCH_FAILED, status["last_fetch_error"])
        refused = status["refused_commit"]
        if refused is not None and refused["sha"] == status["fetched_commit"]:
            raise AutoDeployError(errors.GIT_COMMIT_REFUSED, f"commit {refused['short']} ({refused['subject']}): "
                                  + "; ".join(refused["errors"]))
        return status

    # ------------------------------------------------------------------ helpers
    def _consider(self, tip: str, now: float) -> SourceUpdate | None:
        tree = self.mirror.tree(tip, self.opts.path)
        key = tree or f"missing@{tip}"
        with self._lock:
            unchanged = key == self._seen_tree
            self._seen_tree = key
            refused = self.refused is not None
        if unchanged:
            if not refused and self.live is not None and self.live.sha != tip:
                # A commit outside `path`: the same desired state, now at this commit.
                commit = self.mirror.commit(tip)
                with self._lock:
                    self.live = commit
                self._set_live_ref(tip)
            return None
        commit = self.mirror.commit(tip)
        result = self._load(tip, commit, tree)
        if result.errors:
            self._refuse(commit, result, now)
            return None
        return SourceUpdate(result, commit)

    def _load(self, sha: str, commit: Commit, tree: str | None = None) -> LoadResult:
        tree = tree or self.mirror.tree(sha, self.opts.path)
        if tree is None:
            return LoadResult([], [SpecError(self.opts.path, 0, f"no such folder in commit {sha[:12]}; check "
                                                                "--git-path (autodeploy:git path)")], [])
        items, unreadable = self.mirror.read_yaml(tree, self.opts.path)
        return load_texts(items, unreadable=unreadable, **self.load_args())

    def _refuse(self, commit: Commit, result: LoadResult, now: float) -> None:
        errs = [str(e) for e in result.errors]
        with self._lock:
            self.refused = Refusal(commit, errs, now)
            live = self.live
        keeps = f"commit {live.sha[:12]} keeps serving" if live else "nothing from git was serving yet"
        for err in errs:
            log.error("commit %s refused: %s", commit.sha[:12], err)
        self._event("refused", f"commit {_describe(commit)} refused, {len(errs)} error(s); {keeps}: "
                               + "; ".join(errs[:10]) + (" ..." if len(errs) > 10 else ""))

    def _fetch_failed(self, message: str, now: float) -> None:
        with self._lock:
            self.failures += 1
            repeated = self.last_error == message
            self.last_error, self.last_error_at = message, now
            failures = self.failures
            delay = next_poll_at(now, failures, self.opts.interval_s) - now
        log.warning("fetching %s %s failed (%d in a row, next try in %.1f s): %s", self.opts.shown_repo,
                    self.opts.branch, failures, delay, message)
        if not repeated:  # one event per distinct error, not one per retry
            self._event("fetch_failed", f"{message} (serving continues; retrying with backoff)")

    def _set_live_ref(self, sha: str) -> None:
        try:
            self.mirror.set_live(sha)
        except GitError as exc:
            log.warning("cannot record the live commit in the mirror: %s", exc)

    def _event(self, kind: str, message: str) -> None:
        message = self.mirror.redact(message)
        log.info("git %s: %s", kind, message)
        self._on_event(kind, message)


def _describe(commit: Commit) -> str:
    return f"{commit.sha[:12]} ({commit.subject!r} by {commit.author})"
