"""Sparse features (bag-of-words instances: a few nonzeros of thousands of columns) take the
instance layer through the rows of W at each instance's nonzero columns: the same numbers as the
dense product, in training (stacked models) and in inference."""

import json

import numpy as np
import pytest
import torch

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.data import BagTensor, gather_batch, sparse_rows
from milcache.aggregator.heads import SparseRows, create_head
from milcache.aggregator.run import Cohort, cross_validate
from milcache.aggregator.tasks import Task


def _bag_of_words(n: int, dim: int, most: int, seed: int = 0) -> np.ndarray:
    """Rows with 1 to ``most`` nonzero columns each (one row holds exactly ``most``)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), np.float32)
    for i in range(n):
        cols = rng.choice(dim, most if i == 3 else rng.integers(1, most + 1), replace=False)
        x[i, cols] = rng.uniform(0.1, 3.0, len(cols))
    return x


def _densified(rows: SparseRows, dim: int) -> torch.Tensor:
    x = torch.zeros((*rows.columns.shape[:-1], dim))
    return x.scatter_add(-1, rows.columns, rows.values)


def test_sparse_features_become_their_nonzero_entries_and_dense_ones_stay_dense():
    x = torch.from_numpy(_bag_of_words(300, 512, 9))
    rows = sparse_rows(x)
    assert rows is not None and rows.columns.shape == (300, 9) and rows.values.shape == (300, 9)
    torch.testing.assert_close(_densified(rows, 512), x, rtol=0, atol=0)
    assert sparse_rows(torch.randn(300, 512)) is None  # backbone embeddings
    assert sparse_rows(torch.from_numpy(_bag_of_words(300, 512, 40))) is None  # too many nonzeros a row
    assert sparse_rows(torch.from_numpy(_bag_of_words(300, 64, 2))) is None  # too few columns to gain


def test_the_instance_layer_of_sparse_rows_equals_the_dense_one_with_its_gradients():
    dim, n = 600, 40
    x = torch.from_numpy(_bag_of_words(n, dim, 12, seed=1))
    x[:, 7] = 0.0  # a feature constant in training: ignored on both paths
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    head = create_head("gated-attention", dim, 1)
    rows = sparse_rows(x)
    outputs, grads = [], []
    for given in (x, rows):
        head.zero_grad()
        h = head.embed(given, mean, std)
        (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
        outputs.append(h.detach())
        grads.append([p.grad.clone() for p in head.instance_layer.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    for sparse_grad, dense_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-3)


def test_a_batch_of_a_sparse_cohort_holds_its_bags_rows_in_groups():
    lengths = np.array([5, 2, 8, 1])
    features = torch.from_numpy(_bag_of_words(int(lengths.sum()), 512, 6))
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    data = BagTensor(features, offsets, lengths, list("abcd"), torch.device("cpu"))
    batch = gather_batch(data, np.arange(4), groups=2).grouped(2)
    assert isinstance(batch.x, SparseRows) and batch.x.columns.shape == (2, 9, 6)
    dense = _densified(batch.x, 512)
    for g, (first, second) in enumerate([(0, 1), (2, 3)]):
        bags = dense[g][batch.slots[g]]
        for row, bag in enumerate((first, second)):
            n = int(lengths[bag])
            torch.testing.assert_close(bags[row, :n], features[offsets[bag] : offsets[bag] + n])


def _cohort(bags: list[np.ndarray], y: np.ndarray, sparse: bool) -> Cohort:
    lengths = np.array([len(b) for b in bags], dtype=np.int64)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    ids = [f"bag-{i}" for i in range(len(bags))]
    data = BagTensor(torch.from_numpy(np.concatenate(bags)), offsets, lengths, ids, torch.device("cpu"))
    if not sparse:
        data.__dict__["sparse"] = None  # the dense path, for comparison
    assert (data.sparse is not None) == sparse
    return Cohort(data, Task("binary", [0, 1]), y, np.array(ids, dtype=object), None, y.tolist(), 0, {})


def test_a_cross_validation_on_sparse_features_equals_the_dense_one():
    """Stacked training (the instance layer outside vmap, all folds at once) and inference on
    sparse rows give the dense path's out-of-fold probabilities."""
    rng = np.random.default_rng(0)
    bags, y = [], np.arange(80) % 2
    for label in y:
        bag = _bag_of_words(int(rng.integers(4, 20)), 800, 10, seed=int(rng.integers(1 << 30)))
        if label:
            bag[0, :4] = 2.0  # the positive instance's words
        bags.append(bag)
    config = TrainConfig(head="gated-attention", seed=0, epochs=25)
    results = [cross_validate(_cohort(bags, y, sparse), config, 4, 1) for sparse in (False, True)]
    (dense_metrics, dense_oof, *_), (sparse_metrics, sparse_oof, *_) = results
    np.testing.assert_allclose(sparse_oof["prob_1"].to_numpy(), dense_oof["prob_1"].to_numpy(), atol=1e-4)
    assert sparse_metrics["folds"][0]["auc"] == dense_metrics["folds"][0]["auc"]
    assert np.mean([f["auc"] for f in sparse_metrics["folds"]]) > 0.75  # it learned the words (chance: 0.5)


def test_a_store_of_word_counts_trains_from_the_cli_and_predicts_as_the_dense_path(tmp_path, monkeypatch):
    """Imported bag-of-words features: train-head from the CLI takes the sparse path, and the run's
    predictions equal those computed with the features held dense."""
    from click.testing import CliRunner

    import milcache.aggregator.data as data_module
    from milcache.aggregator.predict import predict
    from milcache.cli import cli
    from tests.conftest import make_meta, write_store

    rng = np.random.default_rng(3)
    bags, rows = {}, []
    for i in range(48):
        x = _bag_of_words(int(rng.integers(5, 25)), 512, 8, seed=i)
        if i % 2:
            x[0, :4] = 2.0  # the positive instance's words
        bags[f"page-{i:02d}"] = (x, np.zeros((len(x), 2), np.int32), {})
        rows.append((f"page-{i:02d}", i % 2))
    store = write_store(tmp_path / "store", bags, make_meta(dim=512, dtype="float32"))
    labels_file = tmp_path / "labels.csv"
    labels_file.write_text("bag_id,label\n" + "".join(f"{b},{y}\n" for b, y in rows))
    converted = []
    real = data_module.sparse_rows
    monkeypatch.setattr(data_module, "sparse_rows", lambda f: converted.append(real(f)) or converted[-1])
    args = ["train-head", "--store", store, "--labels", labels_file, "--head", "gated-attention"]
    args += ["--out", tmp_path / "run", "--folds", "3", "--epochs", "15", "--device", "cpu"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert converted and all(c is not None for c in converted)  # every cohort it loaded went sparse
    sparse = predict(tmp_path / "run", store, device="cpu")
    monkeypatch.setattr(data_module, "sparse_rows", lambda f: None)
    dense = predict(tmp_path / "run", store, device="cpu")
    np.testing.assert_allclose(sparse["prob_1"].to_numpy(), dense["prob_1"].to_numpy(), atol=1e-5)
    # The same instances in the same order; their scores are printed to 6 decimals, where the two
    # paths' float rounding may differ in the last one.
    for ours, theirs in zip(sparse["top_instances"].to_list(), dense["top_instances"].to_list(), strict=True):
        ours, theirs = json.loads(ours), json.loads(theirs)
        assert [i["index"] for i in ours] == [i["index"] for i in theirs]
        np.testing.assert_allclose([i["score"] for i in ours], [i["score"] for i in theirs], atol=2e-6)


@pytest.mark.parametrize("head", ["dsmil", "clam-sb", "transformer", "linear"])
def test_every_head_trains_alike_on_sparse_rows_with_subsampled_bags(head):
    """The instance layer is the heads' common first step: any head, with ``--instances`` drawing
    random instances, gives the dense path's probabilities (CLAM's top-k instance loss amplifies
    rounding the most)."""
    rng = np.random.default_rng(0)
    bags, y = [], np.arange(40) % 2
    for label in y:
        bag = _bag_of_words(int(rng.integers(4, 20)), 800, 10, seed=int(rng.integers(1 << 30)))
        if label:
            bag[0, :4] = 2.0
        bags.append(bag)
    config = TrainConfig(head=head, seed=0, epochs=4, instances=4)
    (_, dense, *_), (_, sparse, *_) = [cross_validate(_cohort(bags, y, s), config, 4, 1) for s in (False, True)]
    np.testing.assert_allclose(sparse["prob_1"].to_numpy(), dense["prob_1"].to_numpy(), atol=2e-3)
