import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from milcache import __version__
from milcache.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_version_and_help():
    assert __version__ in run("--version").output
    assert "train" in run("--help").output or "store" in run("--help").output


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


@pytest.mark.parametrize("command", list(_commands(cli)), ids=" ".join)
def test_every_command_explains_itself(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output
    assert len(result.output.split("\n\n", 2)[1].strip()) > 20  # a real description


def test_help_does_not_import_torch():
    code = "import sys; from milcache.cli import cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_synth_info_verify(tmp_path):
    assert run("store", "synth", tmp_path / "s", "--bags", 10, "--dim", 8).exit_code == 0
    info = json.loads(run("store", "info", tmp_path / "s", "--json").output)
    assert info["bags"] == 10 and info["dim"] == 8 and info["backbone"] == "synthetic"
    assert info["instances"] > 0 and info["failures"] == {}
    result = run("store", "verify", tmp_path / "s")
    assert result.exit_code == 0 and "10 of 10 bags are sound" in result.output
    assert (tmp_path / "s" / "labels.csv").is_file()


def test_user_errors_exit_2_without_traceback(tmp_path):
    result = run("store", "info", tmp_path)
    assert result.exit_code == 2
    assert "store.json is missing" in result.output and "Traceback" not in result.output


def test_import_export_commands(small_store, tmp_path):
    path, bags = small_store
    assert run("store", "export", path, "--out", tmp_path / "h5").exit_code == 0
    result = run("store", "import", tmp_path / "h5", "--out", tmp_path / "back", "--backbone", "test-net")
    assert result.exit_code == 0, result.output
    assert f"imported {len(bags)} bags" in result.output
    result = run("store", "import", tmp_path / "h5", "--out", tmp_path / "back", "--backbone", "other")
    assert result.exit_code == 2 and "refusing to write" in result.output
