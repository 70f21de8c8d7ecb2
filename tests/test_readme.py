"""README's two commands must stay what works on a fresh machine: CI runs them verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_the_demo_and_the_test_command():
    demo, tests = _commands()[:2]
    assert demo == "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && milcache demo"
    assert tests == 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && python -m pytest'


def test_ci_runs_both_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command 1" in ci and "readme_command 0" in ci and "ruff check" in ci


def test_every_listed_head_is_registered():
    from milcache.aggregator.heads import list_heads

    text = (ROOT / "README.md").read_text()
    for head in list_heads():
        assert f"`{head}`" in text, head
