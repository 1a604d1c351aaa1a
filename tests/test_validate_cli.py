"""`autodeploy validate`: output format and exit codes, in-process and as the real console script."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.validate import EXIT_INVALID, EXIT_OK, EXIT_USAGE, run_validate

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
apiVersion: autodeploy/v1
kind: Deployment
metadata:
  name: good
spec:
  model: {id: m, version: v3}
  command: python3 serve.py
  port: 8080
"""


def validate(paths: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_validate(paths, out, err)
    return code, out.getvalue(), err.getvalue()


def test_valid_examples_print_one_ok_line_each_and_exit_0(monkeypatch):
    monkeypatch.chdir(REPO)  # paths print as given, relative to the working directory
    code, out, err = validate(["deployments"])
    assert (code, err) == (EXIT_OK, "")
    assert "ok  deployments/hello.yaml:4  hello (echo@v1)\n" in out
    assert "ok  deployments/breezyvoice.yaml:" in out
    assert len(out.splitlines()) == 3


def test_invalid_files_print_every_error_with_file_and_line_and_exit_1(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD.replace("good", "Bad_Name").replace("8080", "0"))
    code, out, err = validate([str(tmp_path)])
    assert code == EXIT_INVALID
    assert out == f"ok  {tmp_path / 'a.yaml'}:1  good (m@v3)\n"
    assert err.splitlines() == [
        f"{tmp_path / 'b.yaml'}:4: metadata.name 'Bad_Name' is not a DNS label: use lowercase letters, "
        "digits and '-', starting and ending with a letter or digit, e.g. 'bad-name'",
        f"{tmp_path / 'b.yaml'}:8: spec.port must be at least 1; found 0",
        "2 errors in 1 file",
    ]


def test_no_paths_is_a_usage_error():
    code, out, err = validate([])
    assert (code, out) == (EXIT_USAGE, "")
    assert err.startswith("usage: autodeploy validate PATH...")


def test_a_missing_path_is_a_usage_error_that_names_it(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    missing = str(tmp_path / "nope.yaml")
    code, out, err = validate([str(tmp_path / "a.yaml"), missing])
    assert (code, out) == (EXIT_USAGE, "")
    assert err == f"autodeploy validate: {missing}: no such file or directory\n"


def test_a_directory_without_yaml_files_is_a_usage_error(tmp_path):
    code, _, err = validate([str(tmp_path)])
    assert code == EXIT_USAGE
    assert "no .yaml or .yml files" in err and str(tmp_path) in err


def test_require_image_applies_the_container_drivers_rule(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    out, err = io.StringIO(), io.StringIO()
    assert run_validate([str(tmp_path)], out, err, require_image=True) == EXIT_INVALID
    assert "spec.image is required" in err.getvalue()


CONSOLE_SCRIPT = Path(sys.executable).parent / "autodeploy"


@pytest.mark.skipif(not (REPO / "controller" / "cli.py").exists(),
                    reason="controller/cli.py is not written yet: `autodeploy validate` is not wired")
def test_console_script_validates_the_examples_and_fails_on_errors(tmp_path):
    assert CONSOLE_SCRIPT.exists(), "reinstall: pip install -e . (the autodeploy entry point is missing)"
    ok = subprocess.run([str(CONSOLE_SCRIPT), "validate", "deployments"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "ok  deployments/hello.yaml:4  hello (echo@v1)" in ok.stdout

    (tmp_path / "bad.yaml").write_text(GOOD.replace("  port: 8080\n", ""))
    bad = subprocess.run([str(CONSOLE_SCRIPT), "validate", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert f"{tmp_path / 'bad.yaml'}:5: spec is missing the required key 'port'" in bad.stderr

    missing = subprocess.run([str(CONSOLE_SCRIPT), "validate", "no/such/dir"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no/such/dir" in missing.stderr


def test_json_output_carries_every_deployment_error_and_warning_with_the_same_exit_code(tmp_path):
    import json
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD.replace("good", "Bad_Name"))
    out, err = io.StringIO(), io.StringIO()
    assert run_validate([str(tmp_path)], out, err, output="json") == EXIT_INVALID
    doc = json.loads(out.getvalue())
    assert err.getvalue() == "" and doc["valid"] is False
    (ok,) = doc["deployments"]
    assert (ok["name"], ok["file"], ok["line"], ok["model"], ok["version"]) == ("good", str(tmp_path / "a.yaml"), 1,
                                                                                "m", "v3")
    assert len(ok["revision"]) >= 12
    (bad,) = doc["errors"]
    assert (bad["file"], bad["line"]) == (str(tmp_path / "b.yaml"), 4) and "not a DNS label" in bad["message"]
    (tmp_path / "b.yaml").unlink()
    cli = subprocess.run([str(CONSOLE_SCRIPT), "validate", "-o", "json", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == EXIT_OK and json.loads(cli.stdout)["valid"] is True, cli.stderr


def test_a_reader_that_left_the_pipe_gets_no_traceback():
    """`autodeploy validate ... | head`: once the reader is gone the CLI stops quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already left
    try:
        done = subprocess.run([str(CONSOLE_SCRIPT), "validate", "-o", "json", "deployments"], cwd=REPO,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
