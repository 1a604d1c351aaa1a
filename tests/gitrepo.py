"""A real git remote for tests: a bare repository in a temp folder and a clone to commit from."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

AUTHOR = "Ada Lovelace <ada@example.com>"
_GIT_ENV = dict(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_COMMITTER_NAME="CI",
            GIT_COMMITTER_EMAIL="ci@example.com", GIT_AUTHOR_NAME="CI", GIT_AUTHOR_EMAIL="ci@example.com")


def git(*args: str, cwd: Path | None = None) -> str:
    # The environment of the moment (not of import): a push hook needs the test's AUTODEPLOY_TOKEN.
    proc = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **_GIT_ENV}, capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout.strip()


class Remote:
    """`git init --bare` plus a working clone; every commit is pushed to the bare repository."""

    def __init__(self, root: Path, branch: str = "main", path: str = "deployments") -> None:
        self.bare = root / "remote.git"
        self.work = root / "work"
        self.branch = branch
        self.path = path
        git("init", "--bare", "--quiet", f"--initial-branch={branch}", str(self.bare))
        git("clone", "--quiet", str(self.bare), str(self.work))
        git("checkout", "--quiet", "-B", branch, cwd=self.work)
        (self.work / path).mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def write(self, name: str, text: str) -> None:
        (self.work / self.path / name).write_text(text)

    def remove(self, name: str) -> None:
        git("rm", "--quiet", f"{self.path}/{name}", cwd=self.work)

    def commit(self, subject: str, author: str = AUTHOR, **files: str) -> str:
        for name, text in files.items():
            self.write(name.replace("_yaml", ".yaml"), text)
        git("add", "-A", cwd=self.work)
        git("commit", "--quiet", "--allow-empty", f"--author={author}", "-m", subject, cwd=self.work)
        self.push()
        return self.head()

    def revert(self, sha: str) -> str:
        git("revert", "--no-edit", sha, cwd=self.work)
        self.push()
        return self.head()

    def force_reset(self, sha: str) -> str:
        """Rewrite history: the branch goes back to `sha`, pushed with --force."""
        git("reset", "--quiet", "--hard", sha, cwd=self.work)
        git("push", "--quiet", "--force", "origin", f"HEAD:refs/heads/{self.branch}", cwd=self.work)
        return self.head()

    def push(self) -> None:
        git("push", "--quiet", "origin", f"HEAD:refs/heads/{self.branch}", cwd=self.work)

    def head(self) -> str:
        return git("rev-parse", "HEAD", cwd=self.work)


class AuthGitServer:
    """The bare repository over git's "dumb" HTTP protocol (plain files, as a static web
    server would serve them), behind HTTP Basic authentication: a real remote that needs a
    credential. Records the Authorization headers it saw."""

    def __init__(self, bare: Path, username: str, password: str) -> None:
        import base64
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        seen = self.seen = []

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *_args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                seen.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="deploy"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super().do_GET()

        self.bare = bare
        self.refresh()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(bare)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def refresh(self) -> None:
        """The dumb protocol reads info/refs: regenerate it after a push."""
        git("--git-dir", str(self.bare), "update-server-info")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
