"""Manifests and label tables (CSV or parquet, read with polars), validated row by row.

A manifest has one row per image: ``bag_id`` and ``path`` are required; ``label``, ``group`` (patient or
case, for grouped splits) and any other columns are optional and kept. Several rows sharing a bag id
make one bag of several images (for example the CC and MLO views of one breast). Relative paths are
relative to the manifest's own folder, so a dataset folder can move as a whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from milcache.errors import LabelError, ManifestError

_MAX_LISTED = 20
_ROW = "__row__"  # 1-based data row number, kept so that errors can name rows


def read_table(path, string_columns: tuple[str, ...] = ("bag_id",)) -> pl.DataFrame:
    """A CSV/TSV/parquet file (or a polars / pandas DataFrame a notebook holds) as a polars
    DataFrame, with ``string_columns`` as text."""
    if hasattr(path, "columns"):  # a DataFrame already
        table = path if isinstance(path, pl.DataFrame) else pl.from_pandas(path)
        casts = [pl.col(c).cast(pl.Utf8) for c in string_columns if c in table.columns]
        return table.with_columns(casts) if casts else table
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; expected a table file (.csv, .tsv or .parquet)")
    if not path.is_file():
        raise ManifestError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pl.read_parquet(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            separator = "\t" if suffix == ".tsv" else ","
            # Override only columns that exist: older polars reads overrides of absent ones by position.
            header = pl.read_csv(path, separator=separator, n_rows=0).columns
            table = pl.read_csv(
                path,
                separator=separator,
                schema_overrides={c: pl.Utf8 for c in string_columns if c in header},
                infer_schema_length=10_000,
            )
        else:
            raise ManifestError(f"{path}: expected a .csv, .tsv or .parquet file, not {suffix or 'no suffix'}")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ManifestError(f"{path}: cannot read it as a table: {exc}") from None
    twice = sorted({c.split("_duplicated_")[0] for c in table.columns if "_duplicated_" in c})
    if twice:  # polars renames a repeated header (label, label_duplicated_0): which one is meant?
        raise ManifestError(f"{path}: the column(s) {', '.join(twice)} appear twice in the header; keep one")
    casts = [pl.col(c).cast(pl.Utf8) for c in string_columns if c in table.columns]
    return table.with_columns(casts) if casts else table


def _problem_list(path: Path, what: str, problems: list[str]) -> ManifestError:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return ManifestError(f"{path}: {what}:\n  " + "\n  ".join(shown) + more)


def _require_columns(table: pl.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns) or 'none'}"
        )


def _check_ids(table: pl.DataFrame, path: Path) -> None:
    empty = table.filter(pl.col("bag_id").is_null() | (pl.col("bag_id").str.strip_chars() == ""))
    if empty.height:
        raise _problem_list(path, "empty bag_id", [f"row {r}" for r in empty[_ROW]])


def _check_consistent(table: pl.DataFrame, path: Path, column: str) -> None:
    """Rows of one bag must agree on a bag-level column (label, group)."""
    if column not in table.columns:
        return
    bad = (
        table.group_by("bag_id", maintain_order=True)
        .agg(pl.col(column).unique(maintain_order=True).alias("values"), pl.col(_ROW).alias("rows"))
        .filter(pl.col("values").list.len() > 1)
    )
    if bad.height:
        problems = [
            f"bag {b!r} (rows {', '.join(map(str, rows))}) has {column}s {', '.join(map(str, values))}"
            for b, values, rows in bad.select("bag_id", "values", "rows").iter_rows()
        ]
        raise _problem_list(path, f"rows of one bag disagree on {column}", problems)


@dataclass
class BagSpec:
    """One bag of a manifest: its images and bag-level fields."""

    bag_id: str
    paths: list[Path]
    label: object = None
    group: object = None
    rows: list[dict] = field(default_factory=list)  # every column of each image row, as read


@dataclass
class Manifest:
    path: Path
    table: pl.DataFrame  # one row per image; ``path`` resolved to absolute paths

    def bags(self) -> list[BagSpec]:
        """Bags in the order of their first row."""
        specs: dict[str, BagSpec] = {}
        has_label, has_group = "label" in self.table.columns, "group" in self.table.columns
        for row in self.table.drop(_ROW).iter_rows(named=True):
            spec = specs.get(row["bag_id"])
            if spec is None:
                spec = specs[row["bag_id"]] = BagSpec(
                    row["bag_id"],
                    [],
                    row["label"] if has_label else None,
                    row["group"] if has_group else None,
                )
            spec.paths.append(Path(row["path"]))
            spec.rows.append(row)
        return list(specs.values())

    def __len__(self) -> int:
        return self.table["bag_id"].n_unique()


def read_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate a manifest; every problem names its rows."""
    path = Path(path)
    table = read_table(path, ("bag_id", "path", "group"))
    _require_columns(table, path, ("bag_id", "path"))
    table = table.with_row_index(_ROW, offset=1)
    if table.height == 0:
        raise ManifestError(f"{path} has no rows: give one row per image (bag_id, path)")
    _check_ids(table, path)
    table = table.with_columns(pl.col("path").str.strip_chars())  # "slide.svs " in a hand-made CSV
    empty_paths = table.filter(pl.col("path").is_null() | (pl.col("path").str.strip_chars() == ""))
    if empty_paths.height:
        raise _problem_list(path, "empty path", [f"row {r}" for r in empty_paths[_ROW]])
    base = path.parent.resolve()
    table = table.with_columns(
        pl.col("path").map_elements(lambda p: str(base / os.path.expanduser(p)), return_dtype=pl.Utf8)
    )
    dup = table.filter(pl.struct("bag_id", "path").is_duplicated())
    if dup.height:
        raise _problem_list(
            path,
            "the same image is listed twice for one bag",
            [f"row {r}: bag {b!r}, {p}" for r, b, p in dup.select(_ROW, "bag_id", "path").iter_rows()],
        )
    _check_consistent(table, path, "label")
    _check_consistent(table, path, "group")
    if check_files:
        problems = [
            f"row {r}: {p}: {why}" for r, p in table.select(_ROW, "path").iter_rows() if (why := _unreadable(Path(p)))
        ]
        if problems:
            raise _problem_list(path, "image files that cannot be read", problems)
    return Manifest(path, table)


def _unreadable(path: Path) -> str | None:
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return None if os.access(path, os.R_OK | os.X_OK) else "folder is not readable"
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


MISSING_SPELLINGS = ("", "nan", "na", "n/a", "none", "null", "?", "-")  # what label tables write for "unknown"


def _is_missing(column: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Null, NaN, and the usual spellings of "unknown" in text columns: never a class of their own."""
    if dtype.is_float():
        return column.is_null() | column.is_nan()
    if dtype == pl.Utf8:
        return column.is_null() | column.str.strip_chars().str.to_lowercase().is_in(list(MISSING_SPELLINGS))
    return column.is_null()


def read_labels(path, label_column: str = "label") -> pl.DataFrame:
    """Bag labels from a labels table (a file, or a polars / pandas DataFrame) or a manifest: one
    row per bag, columns ``bag_id``, ``label`` and, when present, ``group`` and ``split``.
    """
    table = read_table(path, ("bag_id", "group", "split"))
    path = Path(path) if isinstance(path, (str, Path)) else Path("(the labels DataFrame)")
    _require_columns(table, path, ("bag_id", label_column))
    table = table.rename({label_column: "label"}) if label_column != "label" else table
    table = table.with_row_index(_ROW, offset=1)
    if table.height == 0:
        raise LabelError(f"{path} has no rows: give one row per bag, with its {label_column}")
    _check_ids(table, path)
    missing = table.filter(_is_missing(pl.col("label"), table.schema["label"]))
    if missing.height:
        raise _label_rows(path, "missing labels (empty, NaN or NA: drop these rows or give them a label)", missing)
    _check_label_values(table, path, label_column)
    return _bag_rows(table, path, ("label",))


def _bag_rows(table: pl.DataFrame, path: Path, targets: tuple[str, ...]) -> pl.DataFrame:
    """One row per bag: ``bag_id``, the ``targets`` columns, and ``group`` and ``split`` when
    present (none empty; rows of one bag agreeing on each)."""
    keep = ["bag_id", *targets, *(c for c in ("group", "split") if c in table.columns)]
    for column in keep[1 + len(targets) :]:
        empty = table.filter(_is_missing(pl.col(column), table.schema[column]))
        if empty.height:
            raise _label_rows(path, f"empty {column} (give every bag one, or drop the column)", empty)
    for column in keep[1:]:
        _check_consistent(table, path, column)
    return table.select(keep).unique(subset="bag_id", keep="first", maintain_order=True)


def survival_columns(
    path, *, task_kind: str | None, label_column: str = "label", time_column: str = "time", event_column: str = "event"
) -> tuple[str, str] | None:
    """The (time, event) columns when the labels are times to an event: asked for with
    ``task_kind`` survival or by naming the columns (other than time and event), or chosen when
    the table has both columns and no label column."""
    if task_kind == "survival" or (task_kind is None and (time_column, event_column) != ("time", "event")):
        return time_column, event_column
    if task_kind is not None:
        return None
    columns = read_table(path).columns
    if label_column not in columns and time_column in columns and event_column in columns:
        return time_column, event_column
    return None


def read_survival_labels(path, time_column: str = "time", event_column: str = "event") -> pl.DataFrame:
    """Times to an event from a labels table: one row per bag, columns ``bag_id``, ``time``
    (positive), ``event`` (1 observed, 0 censored) and, when present, ``group`` (the patient:
    its bags must share its time and event) and ``split``."""
    table = read_table(path, ("bag_id", "group", "split"))
    path = Path(path) if isinstance(path, (str, Path)) else Path("(the labels DataFrame)")
    _require_columns(table, path, ("bag_id", time_column, event_column))
    table = table.rename({time_column: "time", event_column: "event"}).with_row_index(_ROW, offset=1)
    if table.height == 0:
        raise LabelError(f"{path} has no rows: give one row per bag, with its {time_column} and {event_column}")
    _check_ids(table, path)
    for column, name in (("time", time_column), ("event", event_column)):
        missing = table.filter(_is_missing(pl.col(column), table.schema[column]))
        if missing.height:
            raise _label_rows(path, f"missing {name} (empty, NaN or NA: drop these rows or give them one)", missing)
    time = pl.col("time").cast(pl.Float64, strict=False)
    not_number = table.filter(time.is_null())
    if not_number.height:
        raise _label_rows(path, f"{time_column} that is not a number", not_number)
    table = table.with_columns(time)
    bad_time = table.filter((pl.col("time") <= 0) | pl.col("time").is_infinite())
    if bad_time.height:
        raise _label_rows(path, f"{time_column} that is zero, negative or infinite (a time must be > 0)", bad_time)
    event = pl.col("event").cast(pl.Utf8).str.strip_chars().str.to_lowercase()
    table = table.with_columns(event.replace_strict(_EVENT_VALUES, default=None, return_dtype=pl.Int8))
    bad_event = table.filter(pl.col("event").is_null())
    if bad_event.height:
        raise _label_rows(path, f"{event_column} other than 1 (event observed) or 0 (censored)", bad_event)
    table = _bag_rows(table, path, ("time", "event"))
    if "group" in table.columns:
        _check_patients(table, path)
    return table


_EVENT_VALUES = {"1": 1, "1.0": 1, "true": 1, "0": 0, "0.0": 0, "false": 0}


def _check_patients(table: pl.DataFrame, path: Path) -> None:
    """The bags of one patient share the patient's time and event."""
    bad = (
        table.group_by("group", maintain_order=True)
        .agg(pl.struct("time", "event").n_unique().alias("kinds"), pl.col("bag_id"))
        .filter(pl.col("kinds") > 1)
    )
    if bad.height:
        problems = [
            f"patient {g!r} (bags {', '.join(ids[:5])})" for g, ids in bad.select("group", "bag_id").iter_rows()
        ]
        raise LabelError(
            str(_problem_list(path, "bags of one patient (group) have different times or events", problems))
        )


def _label_rows(path: Path, what: str, rows: pl.DataFrame) -> LabelError:
    """A label problem listing its rows (row number and bag)."""
    listed = [f"row {r}: bag {b!r}" for r, b in rows.select(_ROW, "bag_id").iter_rows()]
    return LabelError(str(_problem_list(path, what, listed)))


def _check_label_values(table: pl.DataFrame, path: Path, label_column: str) -> None:
    """Labels mean one thing each: no infinite number, and in a text column no value with spaces
    around it, no number written two ways (1 and 1.0) and no mix of numbers and words."""
    dtype = table.schema["label"]
    if dtype.is_float():
        infinite = table.filter(pl.col("label").is_infinite())
        if infinite.height:
            raise _label_rows(path, f"infinite {label_column}", infinite)
    if dtype != pl.Utf8:
        return
    values = table.select(_ROW, "bag_id", "label").iter_rows()
    spaced = [f"row {r}: bag {b!r}: {v!r}" for r, b, v in values if v != v.strip()]
    if spaced:
        raise LabelError(str(_problem_list(path, f"{label_column} values with spaces around them", spaced)))
    distinct = table["label"].unique().to_list()
    numbers = {v: _number(v) for v in distinct}
    words = sorted(v for v, n in numbers.items() if n is None)
    numeric = sorted(v for v, n in numbers.items() if n is not None)
    if words and numeric:
        raise LabelError(
            f"{path}: the {label_column} column mixes numbers ({', '.join(numeric[:5])}) and words "
            f"({', '.join(words[:5])}); write each class one way"
        )
    if any(n is not None and (n != n or abs(n) == float("inf")) for n in numbers.values()):
        raise LabelError(f"{path}: the {label_column} column holds an infinite or NaN number; give a finite label")
    by_number: dict[float, list[str]] = {}
    for value, number in numbers.items():
        if number is not None:
            by_number.setdefault(number, []).append(value)
    twice = [sorted(forms) for forms in by_number.values() if len(forms) > 1]
    if twice:
        shown = "; ".join(" and ".join(forms) for forms in twice[:5])
        raise LabelError(f"{path}: the same {label_column} is written two ways ({shown}); write each class one way")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
