import numpy as np
import pytest
import torch

from milcache.aggregator.data import (
    BagTensor,
    RowBuffer,
    feature_statistics,
    fold_statistics,
    gather_batch,
    plan_batches,
    resident_dtype,
)


def _data(lengths, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    feats = torch.from_numpy(rng.standard_normal((int(offsets[-1]), dim)).astype(np.float16))
    return BagTensor(
        feats, torch.from_numpy(offsets), lengths, [str(i) for i in range(len(lengths))], torch.device("cpu")
    )


def test_statistics_use_only_the_given_bags():
    data = _data([5, 9, 3, 7])
    mean, std = feature_statistics(data, np.array([1, 3]), chunk=4)
    rows = np.concatenate([data.features[5:14].float().numpy(), data.features[17:24].float().numpy()])
    np.testing.assert_allclose(mean.numpy(), rows.mean(0), atol=1e-5)
    np.testing.assert_allclose(std.numpy(), rows.std(0), atol=1e-4)


@pytest.mark.parametrize("every_bag", [True, False])
def test_statistics_leave_a_float32_cohort_untouched(every_bag):
    """A CPU cohort is held in float32 (resident_dtype), where .float() is no copy: the statistics
    once squared the cohort itself in place, and the final model trained on squared features."""
    data = _data([5, 9, 3, 7])
    data.features = data.features.float()
    before = data.features.clone()
    feature_statistics(data, np.arange(4) if every_bag else np.array([0, 2]), chunk=4)
    fold_statistics(data, [np.array([0, 1]), np.array([2, 3])])
    torch.testing.assert_close(data.features, before, rtol=0, atol=0)


def test_a_cpu_cohort_of_a_float16_store_is_held_in_float32():
    assert resident_dtype(torch.float16, torch.device("cpu"), 1000) == torch.float32
    assert resident_dtype(torch.float32, torch.device("cpu"), 1000) == torch.float32
    assert resident_dtype(torch.float16, torch.device("cuda", 0), 1000) == torch.float16
    assert resident_dtype(torch.float16, torch.device("cpu"), 1 << 62) == torch.float16  # too big to widen


def _padded(batch):
    return batch.x[batch.slots] if batch.slots is not None else batch.x


def test_gather_packs_real_instances_masks_and_subsamples_in_order():
    data = _data([5, 2, 8])
    batch = gather_batch(data, np.array([0, 1, 2]))
    assert batch.x.shape == (15, 6)  # only real instances: 5 + 2 + 8, no padding
    x, mask = _padded(batch), batch.mask
    assert x.shape == (3, 8, 6) and mask.sum(1).tolist() == [5, 2, 8]
    torch.testing.assert_close(x[1, :2], data.features[5:7])
    torch.testing.assert_close(x[2], data.features[7:15])
    gen = torch.Generator().manual_seed(0)
    batch = gather_batch(data, np.array([2, 1]), cap=4, generator=gen)
    x, mask = _padded(batch), batch.mask
    assert x.shape == (2, 4, 6) and mask.sum(1).tolist() == [4, 2] and batch.x.shape == (6, 6)
    bag = data.features[7:15]
    picked = [int((bag == row).all(1).nonzero()[0]) for row in x[0]]
    assert picked == sorted(picked) and len(set(picked)) == 4  # distinct instances, stored order


def test_gather_in_groups_packs_each_group_apart():
    data = _data([5, 2, 8, 1])
    batch = gather_batch(data, np.array([0, 1, 2, 3]), groups=2).grouped(2)
    assert batch.x.shape == (2, 9, 6)  # group sizes 7 and 9, the shorter one filled with a real row
    for g, (first, second) in enumerate([(0, 1), (2, 3)]):
        x = batch.x[g][batch.slots[g]]
        n_first, n_second = int(data.lengths[first]), int(data.lengths[second])
        torch.testing.assert_close(x[0, :n_first], data.features[data.offsets[first] : data.offsets[first] + n_first])
        torch.testing.assert_close(
            x[1, :n_second], data.features[data.offsets[second] : data.offsets[second] + n_second]
        )
        assert batch.mask[g].sum(1).tolist() == [n_first, n_second]


def test_a_batch_gathered_into_a_reused_buffer_equals_a_fresh_one():
    """The trainer gathers each step into the previous step's rows: same values, shapes and
    masks as a fresh gather, whether the buffer has room or must grow."""
    data = _data([5, 2, 8, 1, 30])
    data.features = data.features.float()
    buffer = RowBuffer()
    for bags, groups in [([0, 1], 1), ([2, 3], 2), ([4, 0], 2), ([1, 3], 1)]:  # grows at the third
        fresh = gather_batch(data, np.array(bags), groups=groups)
        reused = gather_batch(data, np.array(bags), groups=groups, buffer=buffer)
        torch.testing.assert_close(reused.x, fresh.x, rtol=0, atol=0)
        assert torch.equal(reused.mask, fresh.mask) and torch.equal(reused.slots, fresh.slots)
        assert reused.x.data_ptr() == buffer.rows(1, data.features).data_ptr()  # in the buffer


def test_batches_group_similar_sizes_and_cover_every_bag():
    lengths = np.array([1, 100, 2, 90, 3, 95, 4, 80])
    data = _data(lengths)
    batches = plan_batches(data.lengths, np.arange(8), batch_size=4, max_tokens=10_000)
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    assert {frozenset(b.tolist()) for b in batches} == {frozenset({0, 2, 4, 6}), frozenset({1, 3, 5, 7})}
    small = plan_batches(data.lengths, np.arange(8), batch_size=8, max_tokens=200)
    assert all(len(b) * data.lengths[b].max() <= 200 or len(b) == 1 for b in small)


def test_batch_plans_are_the_greedy_plan_whether_or_not_max_tokens_binds():
    """Chunks of batch_size when the token limit never binds, the bag-by-bag greedy plan when it does."""
    from milcache.aggregator.data import _greedy_batches

    rng = np.random.default_rng(3)
    for max_tokens in (10_000, 200, 60):
        lengths = rng.integers(1, 50, 97)
        indices = rng.permutation(97)[:80]
        plan = plan_batches(lengths, indices, 6, max_tokens, rng=np.random.default_rng(5), shuffle=False)
        size = lengths[indices]
        order = np.argsort(size * np.random.default_rng(5).uniform(0.85, 1.15, len(size)), kind="stable")
        expected = _greedy_batches(indices, order, size, 6, max_tokens)
        assert [b.tolist() for b in plan] == [b.tolist() for b in expected]
        assert sorted(np.concatenate(plan).tolist()) == sorted(indices.tolist())
