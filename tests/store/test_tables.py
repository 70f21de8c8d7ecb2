import os

import polars as pl
import pytest

from milcache.errors import LabelError, ManifestError
from milcache.store import read_labels, read_manifest


@pytest.fixture
def images(tmp_path):
    for name in ("a.tif", "b.tif", "c1.dcm", "c2.dcm"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def write(path, text):
    path.write_text(text)
    return path


def test_multi_image_bags_and_kept_columns(images):
    m = read_manifest(
        write(
            images / "m.csv",
            "bag_id,path,label,group,view\n1,a.tif,0,p1,\n2,b.tif,1,p2,\n3,c1.dcm,1,p3,CC\n3,c2.dcm,1,p3,MLO\n",
        )
    )
    bags = m.bags()
    assert [b.bag_id for b in bags] == ["1", "2", "3"]  # ids are text, even when they look numeric
    assert bags[2].paths == [images / "c1.dcm", images / "c2.dcm"]  # relative to the manifest
    assert bags[2].label == 1 and bags[2].group == "p3"
    assert [r["view"] for r in bags[2].rows] == ["CC", "MLO"]
    assert len(m) == 3


def test_parquet_manifest(images):
    pl.DataFrame({"bag_id": ["x"], "path": [str(images / "a.tif")]}).write_parquet(images / "m.parquet")
    assert read_manifest(images / "m.parquet").bags()[0].paths == [images / "a.tif"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bag_id,file\n1,a.tif\n", r"missing column\(s\) path; found bag_id, file"),
        ("bag_id,path\n1,a.tif\n,b.tif\n", r"empty bag_id:\n  row 2"),
        ("bag_id,path\n1,a.tif\n2,nope.tif\n", r"row 2: .*nope.tif: does not exist"),
        ("bag_id,path,label\n1,a.tif,0\n1,b.tif,1\n", r"disagree on label:\n  bag '1' \(rows 1, 2\)"),
        ("bag_id,path,group\n1,a.tif,p1\n1,b.tif,p2\n", r"disagree on group"),
        ("bag_id,path\n1,a.tif\n1,a.tif\n", r"listed twice for one bag:\n  row 1: bag '1'"),
        ("bag_id,path\n1,\n", r"empty path:\n  row 1"),
    ],
)
def test_manifest_errors_name_rows(images, text, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(write(images / "m.csv", text))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file(images):
    (images / "a.tif").chmod(0)
    with pytest.raises(ManifestError, match="cannot be read"):
        read_manifest(write(images / "m.csv", "bag_id,path\n1,a.tif\n"))


def test_not_a_table(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "missing.csv")
    with pytest.raises(ManifestError, match="expected a .csv"):
        read_manifest(write(tmp_path / "m.xlsx", "x"))
    with pytest.raises(ManifestError, match="is a folder; expected a table file"):
        read_labels(tmp_path)  # a store or image folder given where the labels go


def test_labels_from_table_and_from_manifest(images):
    labels = read_labels(write(images / "l.csv", "bag_id,label,group\n1,0,p\n2,1,q\n"))
    assert labels.to_dicts() == [{"bag_id": "1", "label": 0, "group": "p"}, {"bag_id": "2", "label": 1, "group": "q"}]
    manifest = write(images / "m.csv", "bag_id,path,label\n3,c1.dcm,1\n3,c2.dcm,1\n4,a.tif,0\n")
    assert read_labels(manifest).to_dicts() == [{"bag_id": "3", "label": 1}, {"bag_id": "4", "label": 0}]
    with pytest.raises(LabelError, match=r"missing labels \(.*\):\n  row 2: bag '2'"):
        read_labels(write(images / "l2.csv", "bag_id,label\n1,0\n2,\n"))


def test_a_manifest_path_with_spaces_around_it_is_the_file(tmp_path):
    (tmp_path / "slide.tif").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("bag_id,path\ns,slide.tif  \n")
    bags = read_manifest(tmp_path / "m.csv").bags()
    assert bags[0].paths == [tmp_path.resolve() / "slide.tif"]
