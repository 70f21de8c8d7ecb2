"""Reading TOML / YAML settings files (extract --config, tune --space) into one mapping."""

from __future__ import annotations

from pathlib import Path

from milcache.errors import MilcacheError


def read_settings(path: str | Path) -> dict:
    """A TOML (.toml) or YAML (anything else) file as a dict, keys with '-' turned into '_'."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # both parsers raise their own error types
        raise MilcacheError(f"{path}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise MilcacheError(f"{path}: expected a table of name = value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
