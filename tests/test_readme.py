"""The README is the manual: its error table and commands must match the code."""
from __future__ import annotations

from pathlib import Path

from controller.errors import markdown_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_error_table_lists_every_code_as_the_code_does():
    assert markdown_table() in README


def test_readme_opens_with_the_two_setup_commands_that_exist():
    root = Path(__file__).resolve().parent.parent
    setup = README[README.index("## Set up"):README.index("## How it works")]
    assert "bash scripts/serve-examples.sh" in setup and "bash scripts/test.sh" in setup
    assert (root / "scripts" / "serve-examples.sh").exists() and (root / "scripts" / "test.sh").exists()
    assert "scripts/test.sh" in (root / ".ci" / "run").read_text()
