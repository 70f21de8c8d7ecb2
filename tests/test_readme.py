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
    from milcache.aggregator.heads import head_class, list_heads

    text = (ROOT / "README.md").read_text()
    built_in = [h for h in list_heads() if head_class(h).__module__.startswith("milcache.")]
    assert len(built_in) >= 10
    for head in built_in:
        assert f"`{head}`" in text, head


def test_the_from_python_section_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python") :]
    code = re.findall(r"```python\n(.+?)\n```", section, re.S)[0]
    monkeypatch.chdir(tmp_path)
    from milcache.aggregator.heads import HEADS

    try:
        exec(compile(code, "README.md (From Python)", "exec"), {"__name__": "readme_example"})
    finally:
        HEADS._items.pop("mean-max", None)  # other tests list the heads README documents
    assert (tmp_path / "runs" / "study" / "best" / "model.safetensors").is_file()


def test_readme_preset_table_is_the_registry():
    from milcache.extractor.presets import preset_table_markdown

    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- presets -->\n", 1)[1].split("\n<!-- /presets -->", 1)[0]
    assert table == preset_table_markdown(), "regenerate README's table from preset_table_markdown()"
