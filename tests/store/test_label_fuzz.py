"""Fuzzed label tables and manifests: any table either loads to what it says or is refused with a
milcache error naming what is wrong — never a traceback from polars or numpy."""

from __future__ import annotations

import csv
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milcache.errors import MilcacheError
from milcache.store.tables import read_labels, read_manifest, read_survival_labels

_CELLS = st.one_of(
    st.integers(-3, 3).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["", " ", "NA", "nan", "yes", "no", " 0", "1.0", "true", "False", "-", "?", "é", "a,b", '"q"']),
    st.text(min_size=0, max_size=4),
)
_IDS = st.one_of(st.sampled_from(["a", "b", "c", "", " ", "a/b"]), st.text(min_size=0, max_size=3))
_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@_FUZZ
@given(rows=st.lists(st.tuples(_IDS, _CELLS, _CELLS), min_size=0, max_size=8))
def test_a_label_table_loads_to_what_it_says_or_is_refused_by_name(tmp_path, rows):
    path = tmp_path / "labels.csv"
    _write(path, ["bag_id", "label", "group"], [list(r) for r in rows])
    try:
        table = read_labels(path)
    except MilcacheError as exc:
        assert str(exc)  # a message, naming the file
        return
    ids = {r[0] for r in rows}
    assert table.height == len(ids) and set(table["bag_id"].to_list()) == ids
    labels = table["label"].to_list()
    assert all(v is not None and not (isinstance(v, float) and not math.isfinite(v)) for v in labels)


@_FUZZ
@given(rows=st.lists(st.tuples(_IDS, _CELLS, _CELLS), min_size=0, max_size=8))
def test_a_survival_table_loads_to_positive_times_and_0_1_events_or_is_refused(tmp_path, rows):
    path = tmp_path / "labels.csv"
    _write(path, ["bag_id", "time", "event"], [list(r) for r in rows])
    try:
        table = read_survival_labels(path)
    except MilcacheError as exc:
        assert str(exc)
        return
    assert table.height == len({r[0] for r in rows})
    assert all(t > 0 and math.isfinite(t) for t in table["time"].to_list())
    assert set(table["event"].to_list()) <= {0, 1}


@_FUZZ
@given(rows=st.lists(st.tuples(_IDS, st.sampled_from(["x.tif", " x.tif ", "", "missing.tif", "sub/"])), max_size=6))
def test_a_manifest_loads_or_is_refused_by_name(tmp_path, rows):
    (tmp_path / "x.tif").write_bytes(b"not really a tiff")
    (tmp_path / "sub").mkdir(exist_ok=True)
    path = tmp_path / "manifest.csv"
    _write(path, ["bag_id", "path"], [list(r) for r in rows])
    try:
        manifest = read_manifest(path)
    except MilcacheError as exc:
        assert str(exc)
        return
    assert len(manifest) == len({r[0] for r in rows}) > 0


@pytest.mark.parametrize("header", [["bag_id"], ["label"], [], ["bag_id", "label", "label"]])
def test_a_table_without_its_columns_is_refused_by_name(tmp_path, header):
    path = tmp_path / "labels.csv"
    _write(path, header, [["a"] * len(header)] if header else [])
    with pytest.raises(MilcacheError):
        read_labels(path)
