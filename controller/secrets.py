"""Secrets for `spec.env` entries written `{secret: KEY}`, and the environment an instance gets.

A secret resolves, in this order, from serve's environment variable
`AUTODEPLOY_SECRET_<KEY>` (upper-case, every non-alphanumeric becomes `_`), then from the
stack config (`KEY`, or `autodeploy:KEY` when KEY has no namespace), as a plain value or
as a Pulumi secret. The controller cannot decrypt a Pulumi secret (`{secure: ...}`): the
Pulumi program resolves those itself, so for the local and docker drivers such a key must
also be given through the environment variable.

Values live only in memory and in the instance's environment: the spec, the store and
revision hashes hold the key names. `Redactor` replaces any resolved value with `[secret]`
in text the controller writes (events, its log).
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from controller import errors
from controller.errors import AutoDeployError
from controller.loader import SpecError
from controller.spec import Deployment

ENV_PREFIX = "AUTODEPLOY_SECRET_"
NAMESPACE = "autodeploy"
# What an instance inherits from serve's own environment; everything else is left out.
INHERITED = ("PATH", "HOME", "LANG", "TZ")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
MASK = "[secret]"


def env_name(key: str) -> str:
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", key).upper()


def _config_key(key: str) -> str:
    return key if ":" in key else f"{NAMESPACE}:{key}"


@dataclass(frozen=True)
class Lookup:
    value: str | None       # None: not usable here (missing, or encrypted)
    found: bool             # present somewhere (a Pulumi secret counts)
    encrypted: bool = False


class SecretSource:
    """Where `{secret: KEY}` values come from: an environment, then the stack config's
    verbatim keys (`StackConfig.extra`)."""

    def __init__(self, environ: Mapping[str, str] | None = None, stack_config: Mapping[str, Any] | None = None,
                 stack_file: str = "the stack config",
                 decrypt: Callable[[str], str | None] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.config = dict(stack_config or {})
        self.stack_file = stack_file
        self.decrypt = decrypt  # config key -> plain value, for Pulumi secrets (the Pulumi CLI)
        self._decrypted: dict[str, str | None] = {}

    def lookup(self, key: str) -> Lookup:
        value = self.environ.get(env_name(key))
        if value:
            return Lookup(value, True)
        raw = self.config.get(_config_key(key))
        if isinstance(raw, dict) and set(raw) == {"secure"}:
            if self.decrypt is not None:
                if key not in self._decrypted:
                    self._decrypted[key] = self.decrypt(_config_key(key)) or None
                if self._decrypted[key]:
                    return Lookup(self._decrypted[key], True, encrypted=True)
            return Lookup(None, True, encrypted=True)
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) and str(raw) != "":
            return Lookup(str(raw), True)
        return Lookup(None, False)

    def problem(self, key: str, usable_encrypted: bool) -> str | None:
        """Why `key` cannot be used, or None."""
        found = self.lookup(key)
        if found.value is not None or (found.encrypted and usable_encrypted):
            return None
        if found.encrypted:
            return (f"secret {key} is a Pulumi secret in {self.stack_file} and the Pulumi CLI, which decrypts it, "
                    f"is not on PATH (or could not decrypt it); set {env_name(key)} in serve's environment")
        return (f"secret {key} not found: set {env_name(key)} in serve's environment, or "
                f"`pulumi config set --secret {_config_key(key)} VALUE` ({self.stack_file})")

    def resolve(self, dep: Deployment) -> dict[str, str]:
        """env name -> value for an instance of `dep`; a coded error naming the key if any is missing."""
        out = {}
        for name, key in sorted(dep.secret_env.items()):
            found = self.lookup(key)
            if found.value is None:
                raise AutoDeployError(errors.SPEC_INVALID, f"{dep.source_file}: env {name}: "
                                      f"{self.problem(key, usable_encrypted=False)}")
            out[name] = found.value
        return out

    def stack_only(self) -> "SecretSource":
        """What the Pulumi program sees: the stack config alone (it reads no environment)."""
        return SecretSource({}, self.config, self.stack_file, self.decrypt)

    def values(self, deployments: Iterable[Deployment]) -> list[str]:
        vals = []
        for dep in deployments:
            for key in dep.secret_env.values():
                found = self.lookup(key)
                if found.value:
                    vals.append(found.value)
        return vals


def missing_secrets(deployments: Iterable[Deployment], source: SecretSource,
                    usable_encrypted: bool) -> list[SpecError]:
    """FILE:LINE errors for every `{secret: KEY}` that cannot be resolved."""
    out = []
    for dep in deployments:
        for name, key in sorted(dep.secret_env.items()):
            problem = source.problem(key, usable_encrypted)
            if problem is not None:
                out.append(SpecError(dep.source_file, dep.secret_lines.get(name, dep.source_line),
                                     f"env {name}: {problem}"))
    return out


def instance_env(dep: Deployment, secrets: Mapping[str, str], ours: Mapping[str, str],
                 environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment: PATH, HOME, LANG, TZ from serve, then spec.env, the resolved
    secrets and the controller's own variables (PORT, AUTODEPLOY_*, CUDA_VISIBLE_DEVICES).
    Nothing else of serve's: not its tokens, not its AUTODEPLOY_SECRET_* variables."""
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in INHERITED if environ.get(k)}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(dep.env)
    env.update(secrets)
    env.update(ours)
    return env


class Redactor:
    """Replaces known secret values in text; shared by the store's events and the log."""

    MIN_LEN = 6  # shorter values would mask ordinary words

    def __init__(self) -> None:
        self._values: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def set_values(self, values: Iterable[str]) -> None:
        with self._lock:
            self._values = tuple(sorted({v for v in values if len(v) >= self.MIN_LEN}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for v in self._values:
            if v in text:
                text = text.replace(v, MASK)
        return text

    def json_text(self, text: str) -> str:
        """Mask values inside the strings of a JSON document (never in its syntax or numbers)."""
        if not any(v in text for v in self._values):
            return text
        import json

        def walk(obj: Any) -> Any:
            if isinstance(obj, str):
                return self(obj)
            if isinstance(obj, list):
                return [walk(x) for x in obj]
            if isinstance(obj, dict):
                return {self(k) if isinstance(k, str) else k: walk(v) for k, v in obj.items()}
            return obj
        return json.dumps(walk(json.loads(text)))


class RedactingFilter(logging.Filter):
    """A logging filter that masks secret values in every record it passes."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        masked = self.redactor(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def pulumi_decrypter(stack: Any, project_dir: Any) -> Callable[[str], str | None] | None:
    """`pulumi config get KEY` when the Pulumi CLI is installed (it holds the stack's secrets
    provider: passphrase, cloud KMS...); None without it. Its errors name the key, never a value."""
    import shutil
    import subprocess
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        return None

    def decrypt(config_key: str) -> str | None:
        try:
            proc = subprocess.run([pulumi, "config", "get", config_key, "--stack", stack.name, "--cwd",
                                   str(project_dir)], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        value = proc.stdout.decode("utf-8", "replace").rstrip("\r\n")
        return value if proc.returncode == 0 and value else None
    return decrypt


def redact_logs(redactor: Redactor) -> None:
    """Mask secret values in everything serve logs (every handler of the root logger)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(redactor))
