import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milcache.aggregator.heads import create_head, head_class, list_heads, noisy_and
from milcache.errors import MilcacheError

DIM = 12


def _head(name: str, n_outputs: int = 2):
    torch.manual_seed(0)
    small = {k: v for k, v in {"hidden": 16, "dropout": 0.0}.items() if k in head_class(name).options()}
    return create_head(name, DIM, n_outputs, **small).eval()


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
        "linear",
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
        batched = head(x, mask)
        alone = [head(b[None], torch.ones(1, len(b), dtype=torch.bool)) for b in bags]
    torch.testing.assert_close(batched.logits, torch.cat([a.logits for a in alone]), rtol=1e-4, atol=1e-4)
    for row, (bag, out) in enumerate(zip(bags, alone, strict=True)):  # every head's instance scores, per bag
        if out.scores is not None:
            torch.testing.assert_close(batched.scores[row, : len(bag)], out.scores[0], rtol=1e-4, atol=1e-5)
            assert torch.all(batched.scores[row, len(bag) :] == 0)


@pytest.mark.parametrize("name", ["attention", "gated-attention"])
def test_attention_matches_ilse_written_out(name):
    """Ilse et al. 2018, eq. 8 and 9, written out per bag."""
    head = _head(name, n_outputs=1)
    x = torch.randn(1, 5, DIM)
    with torch.no_grad():
        out = head(x, torch.ones(1, 5, dtype=torch.bool))
        h = torch.relu(x[0] @ head.instance_layer.weight.T + head.instance_layer.bias)
        d = head.attention.attention_dim
        W, b = head.attention.VU.weight, head.attention.VU.bias
        V, U = W[:d], W[d:]
        if name == "gated-attention":
            inner = torch.tanh(h @ V.T + b[:d]) * torch.sigmoid(h @ U.T + b[d:])
        else:
            inner = torch.tanh(h @ W.T + b)
        a = inner @ head.attention.w.weight[0] + head.attention.w.bias
        weights = torch.softmax(a, 0)
        expected = head.classifier(weights @ h)
    torch.testing.assert_close(out.scores[0], weights)
    torch.testing.assert_close(out.logits[0], expected)


@pytest.mark.parametrize("n_outputs", [1, 3])
def test_linear_probe_is_logistic_regression_on_the_mean_standardised_embedding(n_outputs):
    """SimpleMI written out per bag: standardise, average the bag's instances, one affine map;
    each instance's score is its own logit for the last class."""
    from milcache.aggregator.model import MILModel
    from milcache.aggregator.tasks import Task

    torch.manual_seed(1)
    task = Task("binary", [0, 1]) if n_outputs == 1 else Task("multiclass", ["a", "b", "c"])
    model = MILModel(create_head("linear", DIM, n_outputs), DIM, task).eval()
    model.mean.copy_(torch.randn(DIM))
    model.std.copy_(torch.rand(DIM) + 0.5)
    x = torch.randn(1, 6, DIM) * 3
    weight, bias = model.head.instance_layer.weight, model.head.instance_layer.bias
    with torch.no_grad():
        out = model(x, torch.ones(1, 6, dtype=torch.bool))
        z = (x[0] - model.mean) / model.std
        torch.testing.assert_close(out.logits[0], z.mean(0) @ weight.T + bias)
        torch.testing.assert_close(out.scores[0], z @ weight[-1] + bias[-1])
    assert head_class("linear").options() == []
    with pytest.raises(MilcacheError, match="has no option"):
        create_head("linear", DIM, 1, hidden=16)


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


def _clam_instance_loss_one_bag(head, h, attention, label):
    """CLAM-SB's instance loss for one bag, as its reference code computes it bag by bag."""
    n = len(attention)
    k = min(head.k_sample, n // 2)
    if k < 1:
        return None
    top = torch.topk(attention, k).indices
    bottom = torch.topk(-attention, k).indices
    logits = head.instance_classifiers(h).view(n, head.n_classes, 2)
    ce = torch.nn.functional.cross_entropy
    own = ce(logits[torch.cat([top, bottom]), label], torch.cat([torch.ones(k), torch.zeros(k)]).long())
    if head.n_classes <= 2:
        return own
    total = own
    for c in range(head.n_classes):
        if c != label:
            total = total + ce(logits[top, c], torch.zeros(k, dtype=torch.long))
    return total / head.n_classes


@pytest.mark.parametrize("n_classes", [2, 4])
def test_clam_instance_loss_equals_the_per_bag_reference(n_classes):
    torch.manual_seed(0)
    n_outputs = 1 if n_classes == 2 else n_classes
    head = create_head("clam-sb", DIM, n_outputs, n_classes=n_classes, hidden=16, k_sample=3, dropout=0.0).eval()
    lengths = [9, 5, 1, 4]  # 5 < 2k: k = 2; one instance: no instance loss; 4 instances: k = 2
    x = torch.randn(len(lengths), max(lengths), DIM)
    mask = torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)
    labels = torch.tensor([1, 0, 1, n_classes - 1])
    targets = labels.float() if n_classes == 2 else labels
    out = head(x, mask)
    batched = head.instance_loss(out.extra["h"], out.scores, targets, torch.ones(len(lengths)))
    per_bag = []
    for b, n in enumerate(lengths):
        h = head.embed(x[b : b + 1, :n])[0]
        attention = out.scores[b, :n]
        loss = _clam_instance_loss_one_bag(head, h, attention, int(labels[b]))
        if loss is not None:
            per_bag.append(loss)
    torch.testing.assert_close(batched, torch.stack(per_bag).mean(), rtol=1e-5, atol=1e-6)
    # A padded bag slot (weight 0) changes nothing.
    weighted = head.instance_loss(out.extra["h"], out.scores, targets, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(weighted, torch.stack(per_bag[:2]).mean(), rtol=1e-5, atol=1e-6)


def test_clam_loss_weights_bag_and_instance_losses_as_the_paper():
    from milcache.aggregator.model import build_model
    from milcache.aggregator.tasks import Task

    torch.manual_seed(0)
    model = build_model(
        "clam-sb", {"hidden": 16, "k_sample": 2, "instance_loss_weight": 0.3}, DIM, Task("binary", [0, 1])
    )
    x, mask, y = torch.randn(2, 6, DIM), torch.ones(2, 6, dtype=torch.bool), torch.tensor([0.0, 1.0])
    model.eval()
    out = model(x, mask)
    bag = model.task.loss(out.logits, y)
    instance = model.head.instance_loss(out.extra["h"], out.scores, y, torch.ones(2))
    torch.testing.assert_close(model.loss(out, y), 0.7 * bag + 0.3 * instance)
    model.loss(out, y).backward()
    assert model.head.instance_classifiers.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_dsmil_averages_stream_losses_and_probabilities(kind):
    """Li et al. 2021's code: loss = ½ (loss of the max-instance stream + loss of the bag stream),
    prediction = ½ (probability of one + probability of the other)."""
    from milcache.aggregator.model import build_model
    from milcache.aggregator.tasks import Task

    torch.manual_seed(0)
    task = Task(kind, [0, 1] if kind == "binary" else [0, 1, 2])
    model = build_model("dsmil", {"hidden": 16, "dropout": 0.0}, DIM, task).eval()
    x, mask = torch.randn(3, 5, DIM), torch.ones(3, 5, dtype=torch.bool)
    y = torch.tensor([0.0, 1.0, 1.0]) if kind == "binary" else torch.tensor([0, 2, 1])
    out = model(x, mask)
    critical, bag = out.streams
    if kind == "binary":
        expected = 0.5 * (torch.sigmoid(critical) + torch.sigmoid(bag))
        torch.testing.assert_close(task.outputs(out.logits)[:, 1:], expected, rtol=1e-5, atol=1e-6)
    else:
        expected = 0.5 * (torch.softmax(critical, 1) + torch.softmax(bag, 1))
        torch.testing.assert_close(task.outputs(out.logits), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.loss(out, y), 0.5 * (task.loss(critical, y) + task.loss(bag, y)))


@pytest.mark.parametrize("instances", [3, 400])  # below and above the size that folds into W
def test_embed_standardises_the_same_whether_or_not_folded_into_the_weights(instances):
    """On the CPU a batch much larger than W has the standardisation folded into W and b; a
    smaller one is standardised itself. Both are ReLU(W (x − mean) / std + b), constant
    features (std ≈ 0) ignored, and give W the same gradient."""
    from milcache.aggregator.heads import _FOLD_RATIO

    torch.manual_seed(0)
    head = _head("attention")
    x = torch.randn(2, instances, DIM) * 3 + 1
    folds = x.numel() > _FOLD_RATIO * head.instance_layer.weight.numel()
    assert folds == (instances > 40)
    mean, std = torch.randn(DIM), torch.rand(DIM) + 0.5
    std[0] = 0.0  # a feature constant in training
    ours = head.embed(x, mean, std)
    z = (x - mean) / std
    z[..., 0] = 0.0
    expected = torch.relu(torch.nn.functional.linear(z, head.instance_layer.weight, head.instance_layer.bias))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(ours.sum(), head.instance_layer.weight)
    (expected_grad,) = torch.autograd.grad(expected.sum(), head.instance_layer.weight)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-3)


def test_embed_under_cpu_bf16_autocast_standardises_before_the_matmul():
    """`--precision bf16` on the CPU: raw values far from zero (mean 1,000, std 1) are
    standardised in float32 before the reduced-precision matmul. Folded into W, the bf16 matmul
    would round x·W/std to ~1,000/256 and subtract mean·W/std after: errors of whole units."""
    torch.manual_seed(0)
    head = _head("attention")
    x = torch.randn(2, 400, DIM) + 1000.0  # large enough to fold in float32
    mean, std = torch.full((DIM,), 1000.0), torch.ones(DIM)
    expected = torch.relu(torch.nn.functional.linear(x - mean, head.instance_layer.weight, head.instance_layer.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = head.embed(x, mean, std)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, rtol=0.05, atol=0.05)
