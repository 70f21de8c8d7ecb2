"""README's two commands must stay exactly what works (CI runs the test one verbatim)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    test_command = _commands()[1]
    assert test_command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    install_and_test = test_command.split(". .venv/bin/activate && ", 1)[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci_lines
