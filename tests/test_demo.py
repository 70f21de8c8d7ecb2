import json

from milcache.demo import run_demo


def test_demo_end_to_end_at_reduced_size(tmp_path):
    lines = []
    result = run_demo(tmp_path / "demo", device="cpu", bags=48, trials=2, echo=lines.append)
    assert result["auc"] >= 0.9 and result["heldout_bags"] == 12
    assert result["attention_on_nines"] > 5 * result["attention_on_others"]  # attention sits on the 9s
    commands = [line for line in lines if line.startswith("\n$ milcache ")]
    assert [c.split()[2] for c in commands] == ["extract", "tune", "train-head", "predict"]
    root = tmp_path / "demo"
    for name in (
        "backbone.safetensors",
        "slides.csv",
        "store/store.json",
        "study/best.json",
        "study/history.png",
        "model/model.safetensors",
        "model/roc.png",
        "heldout_predictions.csv",
        "demo.json",
    ):
        assert (root / name).is_file(), name
    assert len(result["heatmaps"]) == 12
    assert json.loads((root / "demo.json").read_text())["auc"] == result["auc"]


def test_the_survival_demo_ranks_held_out_patients_by_their_nines(tmp_path):
    lines = []
    result = run_demo(tmp_path / "demo", device="cpu", bags=64, trials=2, echo=lines.append, task="survival")
    assert result["task"] == "survival" and result["heldout_bags"] == 16
    assert result["c_index"] > 0.6  # 8 held-out patients: the risk follows the 9s
    assert result["attention_on_nines"] > 2 * result["attention_on_others"]
    root = tmp_path / "demo"
    for name in ("model/kaplan_meier.png", "heldout_kaplan_meier.png"):
        assert (root / name).stat().st_size > 10_000, name
    assert "C-index (patients)" in "\n".join(lines)
