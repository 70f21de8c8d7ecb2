"""Checks of option values and output paths, shared by the Python API and the CLI.

Each raises one ``MilcacheError`` naming the option (as the CLI spells it) or the path and what was
expected, so that a bad value is refused before any work starts, never read as something else.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from milcache.errors import OptionError

MIN_FREE_BYTES = 64 << 20  # an output on a disk with less free space than this is refused up front


def at_least(option: str, value, low: float) -> None:
    """``value`` (unless None) is a finite number ≥ ``low``."""
    if value is not None and not (_finite(value) and value >= low):
        raise OptionError(f"{option} must be at least {low:g}, got {value!r}")


def whole(option: str, value, low: int) -> None:
    """``value`` (unless None) is a whole number ≥ ``low`` (2.7 folds is refused, not rounded)."""
    import numbers

    if value is not None and not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low):
        raise OptionError(f"{option} must be a whole number, at least {low}; got {value!r}")


def above(option: str, value, low: float) -> None:
    """``value`` (unless None) is a finite number > ``low``."""
    if value is not None and not (_finite(value) and value > low):
        raise OptionError(f"{option} must be greater than {low:g}, got {value!r}")


def within(option: str, value, low: float, high: float, high_open: bool = False) -> None:
    """``value`` (unless None) lies in [low, high] (or [low, high) with ``high_open``)."""
    if value is None:
        return
    ok = _finite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        raise OptionError(f"{option} must lie in [{low:g}, {high:g}{')' if high_open else ']'}, got {value!r}")


def one_of(option: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise OptionError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def output_dir(path: str | Path, option: str = "--out") -> Path:
    """A folder we are about to fill: not an existing file, inside a writable folder, on a disk with
    room. Checked before the work starts, so that hours of work never end in 'cannot write'."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"{option} {path} is a file; give a folder (new or existing)")
    _writable(path if path.exists() else _existing_parent(path, option), path, option)
    return path


def output_file(path: str | Path, option: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """A file we are about to write: not a folder, its folder writable (or creatable), room on disk."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"{option} {path} is a folder; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OptionError(f"{option} {path}: expected a file ending in {' or '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OptionError(f"{option} {path} exists and is read-only")
    _writable(path.parent if path.parent.exists() else _existing_parent(path, option), path, option)
    return path


def _existing_parent(path: Path, option: str) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(f"{option} {path}: {parent} is a file, so nothing can be created under it")
    return parent


def _writable(folder: Path, path: Path, option: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: the folder {folder} is not writable")
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise OptionError(
            f"{option} {path}: the disk holding {folder} has only {free >> 20} MiB free (at least "
            f"{MIN_FREE_BYTES >> 20} MiB needed to start); free some space or write elsewhere"
        )
