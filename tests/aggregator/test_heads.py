import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milcache.aggregator.heads import HeadOutput, create_head, head_class, list_heads, noisy_and
from milcache.errors import MilcacheError

DIM = 12


def _head(name: str, n_outputs: int = 2):
    torch.manual_seed(0)
    return create_head(name, DIM, n_outputs, hidden=16, dropout=0.0).eval()


def test_registry_lists_every_head_and_rejects_unknown_names():
    assert {
        "mean",
        "max",
        "lse",
        "concat",
        "attention",
        "gated-attention",
        "noisy-and",
        "transformer",
        "clam-sb",
        "dsmil",
    } <= set(list_heads())
    with pytest.raises(MilcacheError, match="unknown head 'nope'; choose one of: attention"):
        create_head("nope", 4, 1)
    with pytest.raises(MilcacheError, match="has no option"):
        create_head("mean", 4, 1, attention_dim=3)


def test_unset_options_keep_head_defaults():
    head = create_head("lse", 4, 1, temperature=None, hidden=None)
    assert head.temperature == 5.0 and head.hidden == 128


@pytest.mark.parametrize("name", list_heads())
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_padding_and_order_never_change_results(name, data):
    head = _head(name)
    n = data.draw(st.integers(1, 9), label="instances")
    pad = data.draw(st.integers(1, 6), label="padding")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, DIM, generator=gen)
    mask = torch.ones(1, n, dtype=torch.bool)
    with torch.no_grad():
        ref = head(x, mask)
        garbage = torch.randn(1, pad, DIM, generator=gen) * 100  # padded slots hold anything
        padded = head(torch.cat([x, garbage], 1), torch.cat([mask, torch.zeros(1, pad, dtype=torch.bool)], 1))
        torch.testing.assert_close(padded.logits, ref.logits, rtol=1e-4, atol=1e-4)
        if ref.scores is not None:
            torch.testing.assert_close(padded.scores[:, :n], ref.scores, rtol=1e-4, atol=1e-5)
            assert torch.all(padded.scores[:, n:] == 0)
        if head_class(name).order_invariant:
            perm = torch.randperm(n, generator=gen)
            shuffled = head(x[:, perm], mask)
            torch.testing.assert_close(shuffled.logits, ref.logits, rtol=1e-4, atol=1e-4)
            if ref.scores is not None:
                torch.testing.assert_close(shuffled.scores, ref.scores[:, perm], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_heads())
def test_batched_bags_equal_one_at_a_time(name):
    head = _head(name, n_outputs=3)
    bags = [torch.randn(n, DIM) for n in (3, 7, 1)]
    x = torch.zeros(3, 7, DIM)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)], mask[i, : len(b)] = b, True
    with torch.no_grad():
        batched = head(x, mask).logits
        single = torch.cat([head(b[None], torch.ones(1, len(b), dtype=torch.bool)).logits for b in bags])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_attention_matches_hand_computation():
    head = _head("attention", n_outputs=1)
    x = torch.randn(1, 5, DIM)
    with torch.no_grad():
        out = head(x, torch.ones(1, 5, dtype=torch.bool))
        h = head.embed(x)[0]
        a = head.attention.w(torch.tanh(head.attention.V[0](h))).squeeze(-1)
        weights = torch.softmax(a, 0)
        expected = head.classifier(weights @ h)
    torch.testing.assert_close(out.scores[0], weights)
    torch.testing.assert_close(out.logits[0], expected)


def test_noisy_and_matches_formula():
    a, b = 10.0, torch.tensor([0.3])
    p = torch.tensor([[0.5]])
    expected = (1 / (1 + np.exp(-a * (0.5 - 0.3))) - 1 / (1 + np.exp(a * 0.3))) / (
        1 / (1 + np.exp(-a * 0.7)) - 1 / (1 + np.exp(a * 0.3))
    )
    assert noisy_and(p, a, b).item() == pytest.approx(expected, rel=1e-5)
    assert noisy_and(torch.tensor([[0.0]]), a, b).item() == pytest.approx(0.0, abs=1e-6)
    assert noisy_and(torch.tensor([[1.0]]), a, b).item() == pytest.approx(1.0, abs=1e-6)
    head = _head("noisy-and", n_outputs=1)
    x = torch.randn(1, 4, DIM)
    with torch.no_grad():
        out = head(x, torch.ones(1, 4, dtype=torch.bool))
        inst = torch.sigmoid(head.instance_classifier(head.embed(x)))[0, :, 0]
        bag = noisy_and(inst.mean()[None, None], head.slope, torch.sigmoid(head.threshold_logit))
    torch.testing.assert_close(torch.sigmoid(out.logits), bag, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.scores[0], inst)


def test_clam_instance_loss_is_finite_and_trains():
    head = create_head("clam-sb", DIM, 1, hidden=16, k_sample=2)
    out = head(torch.randn(2, 6, DIM), torch.ones(2, 6, dtype=torch.bool))
    loss = head.extra_loss(out, torch.tensor([0.0, 1.0]))
    assert isinstance(out, HeadOutput) and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert head.instance_classifiers.weight.grad.abs().sum() > 0
