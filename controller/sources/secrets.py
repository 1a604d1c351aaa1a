"""The git credential from a stack secret: `autodeploy:git: {credential: autodeploy:gitToken}`
names a key set with `pulumi config set --secret`. The stack file holds it encrypted; the
Pulumi CLI decrypts it (with the stack's secrets provider: passphrase, cloud KMS, ...),
once, when serve starts. The value lives only in serve's memory and in the environment of
the git credential helper; it is never logged."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from controller.errors import SPEC_INVALID, AutoDeployError
from controller.stack import StackConfig

PULUMI_TIMEOUT_S = 60.0


def resolve_credential(stack: StackConfig, key: str | None, project_dir: Path) -> str | None:
    if key is None:
        return None
    where = f"{stack.source}: autodeploy:git credential {key}"
    set_it = f"`pulumi config set --secret {key} TOKEN --stack {stack.name}`"
    raw = stack.extra.get(key)
    if raw is None:
        raise AutoDeployError(SPEC_INVALID, f"{where} is not set in the stack config; set it with {set_it}")
    if not (isinstance(raw, dict) and set(raw) == {"secure"}):
        raise AutoDeployError(SPEC_INVALID, f"{where} is stored in plain text; a credential must be a secret: "
                                            f"set it with {set_it}")
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        raise AutoDeployError(SPEC_INVALID, f"{where} is a Pulumi secret and the Pulumi CLI (not found on PATH) "
                                            "is what decrypts it; install it, or drop `credential` and let git "
                                            "find its credentials itself (a credential helper, ssh keys)")
    try:
        proc = subprocess.run([pulumi, "config", "get", key, "--stack", stack.name, "--cwd", str(project_dir)],
                              capture_output=True, timeout=PULUMI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AutoDeployError(SPEC_INVALID, f"{where}: `pulumi config get` took longer than "
                                            f"{PULUMI_TIMEOUT_S:g} s") from None
    value = proc.stdout.decode("utf-8", "replace").rstrip("\r\n")
    if proc.returncode != 0 or not value:
        # Its stderr names the key and the provider, never the value (which it could not read).
        detail = proc.stderr.decode("utf-8", "replace").strip()[-500:] or f"exit code {proc.returncode}"
        raise AutoDeployError(SPEC_INVALID, f"{where}: `pulumi config get` could not decrypt it ({detail}); "
                                            "set PULUMI_CONFIG_PASSPHRASE or log in to the stack's backend")
    return value
