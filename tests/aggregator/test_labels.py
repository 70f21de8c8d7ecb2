"""Labels that cannot mislead: missing values, class order, grouping hints, resolved defaults."""

import polars as pl
import pytest
from click.testing import CliRunner

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.run import grouping_hint
from milcache.aggregator.tasks import Task
from milcache.cli import cli
from milcache.errors import LabelError, OptionError
from milcache.store import read_labels
from milcache.store.synthetic import make_synthetic_store


@pytest.mark.parametrize("missing", ["nan", "NaN", "NA", "", "n/a", "null", "None"])
def test_missing_label_spellings_are_missing_not_a_class(tmp_path, missing):
    path = tmp_path / "labels.csv"
    path.write_text(f"bag_id,label\na,low\nb,{missing}\nc,high\n")
    with pytest.raises(LabelError, match=r"(?s)missing labels.*row 2: bag 'b'"):
        read_labels(path)


def test_a_nan_in_a_numeric_label_column_is_missing(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("bag_id,label\na,0.5\nb,nan\nc,1.5\n")
    with pytest.raises(LabelError, match="row 2: bag 'b'"):
        read_labels(path)


def test_ordinal_text_labels_need_an_order_and_follow_it():
    labels = ["low", "high", "medium", "low"]
    with pytest.raises(LabelError, match="--classes"):
        Task.infer(labels, "ordinal")
    task = Task.infer(labels, "ordinal", ["low", "medium", "high"])
    assert task.classes == ["low", "medium", "high"] and task.encode(labels).tolist() == [0, 2, 1, 0]
    with pytest.raises(LabelError, match="not among --classes"):
        Task.infer(labels, "ordinal", ["low", "high"])
    with pytest.raises(LabelError, match="twice"):
        Task.infer(labels, "ordinal", ["low", "medium", "high", "low"])
    numeric = Task.infer([3, 1, 2], "ordinal", ["3", "2", "1"])  # names matched to numbers
    assert numeric.classes == [3, 2, 1]


def test_grouping_hint_names_tcga_patients():
    ids = ["TCGA-A1-0001-01Z-00-DX1", "TCGA-A1-0001-01Z-00-DX2", "TCGA-B2-0002-01Z-00-DX1"]
    hint = grouping_hint(ids)
    assert "group column" in hint and "TCGA-A1-0001 for TCGA-A1-0001-01Z-00-DX1" in hint and "2 patients" in hint
    assert "TCGA" not in grouping_hint(["slide-1", "slide-2"])


def test_resolve_chooses_batch_size_from_the_cohort_and_trains_fixed_epochs():
    small, large = TrainConfig().resolve(60), TrainConfig().resolve(3000)
    assert small.batch_size == 2 and small.val_fraction == 0.0
    assert large.batch_size == 16 and large.val_fraction == 0.0  # no inner split at any size (README)
    assert TrainConfig(val_fraction=None).val_fraction == 0.0  # a trial stored by an older milcache resumes
    assert TrainConfig().resolve(320).batch_size == 10
    assert TrainConfig(batch_size=5, val_fraction=0.1).resolve(60) == TrainConfig(batch_size=5, val_fraction=0.1)


def test_a_stored_configuration_reads_as_it_was_meant():
    """Weight decay is an L2 term by default now; a trial or run stored before ``optimizer`` existed
    trained with AdamW's decoupled decay and is refit with it, not with today's default."""
    assert TrainConfig().optimizer == "adam" and TrainConfig().weight_decay == 5e-4
    old = {k: v for k, v in TrainConfig(weight_decay=1e-2).to_dict().items() if k != "optimizer"}
    assert TrainConfig.from_stored(old).optimizer == "adamw"
    assert TrainConfig.from_stored({**old, "optimizer": "adam", "retired_field": 1}).optimizer == "adam"
    with pytest.raises(OptionError, match="--optimizer"):
        TrainConfig(optimizer="sgd")


def test_train_head_cli_orders_ordinal_classes_and_says_how_to_group(tmp_path):
    labels = make_synthetic_store(tmp_path / "store", bags=60, instances=(4, 10), dim=8, seed=2, signal=2.0)
    grades = pl.Series("label", ["low", "medium", "high"] * 20)
    labels.drop("group").with_columns(grades).write_csv(tmp_path / "grades.csv")
    args = [
        "train-head",
        "--store",
        str(tmp_path / "store"),
        "--labels",
        str(tmp_path / "grades.csv"),
        "--out",
        str(tmp_path / "run"),
        "--task",
        "ordinal",
        "--epochs",
        "2",
        "--folds",
        "3",
        "--device",
        "cpu",
    ]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "--classes" in refused.output and "Traceback" not in refused.output
    result = CliRunner().invoke(cli, [*args, "--classes", "low,medium,high"])
    assert result.exit_code == 0, result.output
    assert "note: the labels have no group column" in result.output
    import json

    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"]["classes"] == ["low", "medium", "high"]
    assert config["train"]["batch_size"] == 2 and config["train"]["val_fraction"] == 0.0  # resolved, not None
    assert config["head_options"]["attention_dim"] == 64  # the head's defaults are recorded too
    assert config["train"]["optimizer"] == "adam"
    adamw = CliRunner().invoke(
        cli,
        [
            *args,
            "--classes",
            "low,medium,high",
            "--optimizer",
            "adamw",
            "--precision",
            "fp32",
            "--out",
            str(tmp_path / "w"),
        ],
    )
    assert adamw.exit_code == 0, adamw.output
    written = json.loads((tmp_path / "w" / "config.json").read_text())["train"]
    assert written["optimizer"] == "adamw" and written["precision"] == "fp32"
