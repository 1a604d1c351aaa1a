"""`autodeploy validate PATH...`: check Deployment YAML before it is committed or served."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from controller.loader import load_paths

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

USAGE = "usage: autodeploy validate PATH... (Deployment YAML files, or directories of *.yaml / *.yml)"


def run_validate(paths: list[str], out: TextIO, err: TextIO, require_image: bool = False,
                 local_gateway_port: int | None = None, secrets: Any = None, output: str = "table") -> int:
    """Print every error as FILE:LINE: message to `err` and one line per valid deployment to `out`.

    Returns 0 when everything is valid, 1 when anything is invalid, 2 on a usage error.
    `require_image` applies the docker/pulumi drivers' rule that `spec.image` is set;
    `local_gateway_port` warns about commands that ignore ${PORT} (the local driver's trap).
    Warnings (`FILE:LINE: warning: ...`) go to `err` and never change the exit code.
    `secrets` (controller.secrets.SecretSource): every `{secret: KEY}` must resolve from it.
    `output="json"`: one JSON document on `out` instead (valid, deployments, errors, warnings,
    notes), with the same exit code; usage errors stay text on `err`.
    """
    if not paths:
        print(USAGE, file=err)
        return EXIT_USAGE
    missing = [p for p in paths if not Path(p).exists()]
    for p in missing:
        print(f"autodeploy validate: {p}: no such file or directory", file=err)
    if missing:
        return EXIT_USAGE

    result = load_paths(paths, require_image=require_image, local_gateway_port=local_gateway_port)
    if not result.files:
        # An empty directory is almost always a wrong path; passing it would hide that.
        print(f"autodeploy validate: no .yaml or .yml files in {', '.join(paths)}", file=err)
        return EXIT_USAGE

    if secrets is not None:
        from controller.secrets import missing_secrets
        lacking = missing_secrets(result.deployments, secrets, usable_encrypted=True)
        result.errors = sorted(result.errors + lacking, key=lambda e: (e.file, e.line))
        bad = {(e.file, e.line) for e in lacking}
        result.deployments = [d for d in result.deployments
                              if not any((d.source_file, d.secret_lines.get(n)) in bad for n in d.secret_env)]
    from controller.renames import rename_notes
    notes = [note for file in sorted({d.source_file for d in result.deployments})
             for note in rename_notes(Path(file), [d.name for d in result.deployments if d.source_file == file])]
    if output == "json":
        json.dump({"valid": not result.errors,
                   "deployments": [{"name": d.name, "file": d.source_file, "line": d.source_line,
                                    "model": d.model_id, "version": d.model_version, "revision": d.revision}
                                   for d in result.deployments],
                   "errors": [{"file": e.file, "line": e.line, "message": e.message} for e in result.errors],
                   "warnings": [{"file": w.file, "line": w.line, "message": w.message} for w in result.warnings],
                   "notes": notes}, out, indent=2)
        out.write("\n")
        return EXIT_INVALID if result.errors else EXIT_OK
    for warning in result.warnings:
        print(_warning(warning), file=err)
    for error in result.errors:
        print(error, file=err)
    for d in result.deployments:
        print(f"ok  {d.source_file}:{d.source_line}  {d.name} ({d.model_id}@{d.model_version})", file=out)
    for note in notes:
        print(note, file=out)
    if result.errors:
        bad_files = len({e.file for e in result.errors})
        print(f"{_plural(len(result.errors), 'error')} in {_plural(bad_files, 'file')}", file=err)
        return EXIT_INVALID
    return EXIT_OK


def _warning(w: object) -> str:
    file, line, message = w.file, w.line, w.message  # type: ignore[attr-defined]
    return f"{file}:{line}: warning: {message}" if line else f"{file}: warning: {message}"


def stack_gateway_port(project_dir: Path, stack: str) -> int | None:
    """The gateway port to check the PORT trap against: the stack's when it runs the local
    driver, 8080 (the default) without a stack file, None for the docker and pulumi drivers."""
    from controller.stack import load_stack
    if not (project_dir / "Pulumi.yaml").exists() and not (project_dir / "stacks").exists():
        return 8080
    try:
        config = load_stack(project_dir, stack)
    except Exception:  # noqa: BLE001 - validate checks Deployment files; the stack has its own errors
        return 8080
    return config.gateway_port if config.driver == "local" else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def stack_secrets(project_dir: Path, stack: str) -> Any:
    """Where `{secret: KEY}` resolves for validate: serve's rule (the environment, then the
    stack config, where a Pulumi secret counts as present: the Pulumi program decrypts it)."""
    import os

    from controller.secrets import SecretSource
    from controller.stack import load_stack
    try:
        config = load_stack(project_dir, stack)
    except Exception:  # noqa: BLE001 - no stack file here: the environment alone
        return SecretSource(os.environ, {}, f"stacks/Pulumi.{stack}.yaml")
    return SecretSource(os.environ, config.extra, config.source)
