"""DP-SGD: per-example gradients against one-example-at-a-time backward, clipping, noise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedlora.privacy.dpsgd import clip_and_noise, clip_factors, per_sample_gradients, per_sample_norms

LENGTHS = [3, 9, 5, 12, 1]  # different lengths: the batch is padded


def _tiny_lora_model(freeze_a: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertForSequenceClassification(config), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero; make it non-zero so lora_A gets gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    if freeze_a:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model.train()


def _padded_batch(lengths, vocab=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    labels = torch.randint(0, 2, (len(lengths),), generator=g)
    return ids, mask, labels


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _reference_grads(model, one_example_loss, n):
    """Per-example gradients the slow way: each example alone, loss.backward()."""
    out = []
    for i in range(n):
        model.zero_grad(set_to_none=True)
        one_example_loss(i).backward()
        out.append({name: p.grad.clone() for name, p in _trainable(model).items()})
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["A-trainable", "A-frozen"])
def lora(request):
    return request.param, _tiny_lora_model(freeze_a=request.param)


# --------------------------------------------------------------------------- per-example grads


def test_lora_per_example_grads_match_one_at_a_time(lora):
    freeze_a, model = lora
    ids, mask, labels = _padded_batch(LENGTHS)

    def losses():
        logits = model(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits, labels, reduction="none")

    def alone(i):  # unpadded: the example as if it were the whole batch
        n = LENGTHS[i]
        logits = model(input_ids=ids[i:i + 1, :n], attention_mask=mask[i:i + 1, :n]).logits
        return F.cross_entropy(logits, labels[i:i + 1])

    grads = per_sample_gradients(model, losses)
    trainable = _trainable(model)
    assert list(grads) == list(trainable)  # every trainable parameter, in model order
    assert any("classifier.modules_to_save" in n for n in grads)  # PEFT's copy of the head
    assert any("lora_B" in n for n in grads)
    assert any("lora_A" in n for n in grads) != freeze_a
    for name, g in grads.items():
        assert g.shape == (len(LENGTHS), *trainable[name].shape)
    for i, ref in enumerate(_reference_grads(model, alone, len(LENGTHS))):
        for name, want in ref.items():
            torch.testing.assert_close(grads[name][i], want, atol=1e-5, rtol=1e-4, msg=name)


def test_lora_hooks_removed_grad_untouched_and_repeatable(lora):
    _, model = lora
    ids, mask, labels = _padded_batch(LENGTHS, seed=2)
    hooks_before = [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()]

    def losses():
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")

    first = per_sample_gradients(model, losses)
    second = per_sample_gradients(model, losses)
    assert [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()] == hooks_before
    for p in model.parameters():
        assert p.grad is None and not hasattr(p, "grad_sample")
    for name in first:
        assert torch.equal(first[name], second[name])


class EmbedNormHead(nn.Module):
    """Embedding → LayerNorm → masked mean → Linear: the other common grad-sampler types."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids, mask):
        h = self.norm(self.embed(ids))
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def test_embedding_layernorm_linear_match_one_at_a_time():
    torch.manual_seed(0)
    model = EmbedNormHead()
    ids, mask, labels = _padded_batch([4, 2, 6], vocab=20, seed=3)
    labels = labels + 1  # 3 classes

    grads = per_sample_gradients(
        model, lambda: F.cross_entropy(model(ids, mask), labels, reduction="none"))
    assert set(grads) == {"embed.weight", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    ref = _reference_grads(model, lambda i: F.cross_entropy(
        model(ids[i:i + 1], mask[i:i + 1]), labels[i:i + 1]), 3)
    for i, r in enumerate(ref):
        for name, want in r.items():
            torch.testing.assert_close(grads[name][i], want, atol=1e-6, rtol=1e-5, msg=name)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0).tanh_()  # in-place on a hooked module's output
        return self.b(h)


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_input_requiring_grad_and_in_place_ops_still_exact(input_requires_grad):
    """An input that requires grad for its own reasons must not hide any module's gradient."""
    torch.manual_seed(0)
    model = InPlace()
    x = torch.randn(3, 4, requires_grad=input_requires_grad)
    grads = per_sample_gradients(model, lambda: model(x).pow(2).sum(1))
    ref = _reference_grads(model, lambda i: model(x[i:i + 1]).pow(2).sum(), 3)
    for i, r in enumerate(ref):
        for name, want in r.items():
            torch.testing.assert_close(grads[name][i], want, msg=name)


def test_unused_trainable_parameter_gets_zero_grads():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(4, 1), "unused": nn.Linear(4, 1)})
    x = torch.randn(3, 4)
    grads = per_sample_gradients(model, lambda: model["used"](x).squeeze(1) ** 2)
    assert torch.equal(grads["unused.weight"], torch.zeros(3, 1, 4))
    assert grads["used.weight"].abs().sum() > 0


def test_empty_batch_gives_zero_size_grads():
    model = nn.Linear(4, 2)
    grads = per_sample_gradients(model, lambda: model(torch.zeros(0, 4)).sum(1))
    assert {n: g.shape for n, g in grads.items()} == {"weight": (0, 2, 4), "bias": (0, 2)}


def test_unsupported_module_type_raises_naming_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="BatchNorm1d"):
        per_sample_gradients(model, lambda: model(torch.randn(3, 4)).sum(1))
    model[1].requires_grad_(False)  # frozen: fine
    assert set(per_sample_gradients(model.eval(), lambda: model(torch.randn(3, 4)).sum(1))) == {
        "0.weight", "0.bias"}


def test_custom_module_with_own_parameter_raises():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(TypeError, match="Scale"):
        per_sample_gradients(model, lambda: model(torch.randn(2, 4)).sum(1))


def test_tied_parameter_raises():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="tied"):
        per_sample_gradients(model, lambda: model(torch.randn(2, 4)).sum(1))


def test_module_called_twice_raises_and_leaves_no_hooks():
    lin = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="more than once"):
        per_sample_gradients(lin, lambda: lin(lin(torch.randn(2, 4))).sum(1))
    assert not lin._forward_hooks and not lin._backward_hooks and lin.weight.grad is None


def test_reusable_module_gradient_is_summed_over_its_calls():
    """A module marked reusable may run twice (y = W·tanh(W·x)): its per-example gradient is
    the one of each example's own loss, through both calls (one backward per example)."""
    from fedlora.privacy.dpsgd import mark_reusable

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    mark_reusable(lin)
    x = torch.randn(3, 5, 4)
    losses = lambda: lin(torch.tanh(lin(x))).pow(2).sum((1, 2))  # noqa: E731
    fast = per_sample_gradients(lin, losses)
    each = losses()
    for i in range(3):
        gw, gb = torch.autograd.grad(each[i], [lin.weight, lin.bias], retain_graph=True)
        assert torch.allclose(fast["weight"][i], gw, atol=1e-5)
        assert torch.allclose(fast["bias"][i], gb, atol=1e-5)
    assert not lin._forward_hooks


def test_losses_must_be_per_example():
    lin = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="1-D"):
        per_sample_gradients(lin, lambda: lin(torch.randn(3, 4)).mean())
    with pytest.raises(ValueError, match="require grad"):
        with torch.no_grad():
            per_sample_gradients(lin, lambda: lin(torch.randn(3, 4)).squeeze(1))
    assert not lin._forward_hooks and not lin._backward_hooks


# --------------------------------------------------------------------------- clipping


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.floats(1e-3, 10.0), st.floats(1e-4, 1e3), st.integers(0, 2**31 - 1))
def test_clipped_per_example_norm_is_at_most_clip(n, clip, scale, seed):
    g = torch.Generator().manual_seed(seed)
    samples = {"a": torch.randn(n, 3, 5, generator=g) * scale, "b": torch.randn(n, 7, generator=g)}
    norms = per_sample_norms(samples)
    flat = torch.cat([s.flatten(1) for s in samples.values()], dim=1)
    torch.testing.assert_close(norms, flat.norm(dim=1))  # flat: over all parameters together
    factors = clip_factors(norms, clip)
    assert torch.all(factors <= 1.0) and torch.all(factors > 0)
    assert torch.all((factors * norms) <= clip * (1 + 1e-6))
    small = norms + 1e-6 <= clip
    assert torch.all(factors[small] == 1.0)  # examples within the bound are left alone


def test_no_noise_gives_clipped_sum_over_expected_batch_size():
    samples = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.tensor([[0.0], [0.0]])}
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    out, norms = clip_and_noise(samples, clip=1.0, noise_multiplier=0.0, expected_batch_size=4.0,
                                generator=gen)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    # example 0 clipped to norm 1: (0.6, 0.8); example 1 unchanged
    torch.testing.assert_close(out["w"], (torch.tensor([0.6, 0.8]) * 5 / (5 + 1e-6) + torch.tensor([0.3, 0.4])) / 4)
    assert torch.equal(out["b"], torch.zeros(1))
    assert list(out) == ["w", "b"]
    assert torch.equal(gen.get_state(), state)  # σ = 0: no noise drawn


# --------------------------------------------------------------------------- noise


def test_noise_has_the_calibrated_std():
    sigma, clip, batch = 1.3, 0.7, 8.0
    zeros = {"a": torch.zeros(4, 300, 100), "b": torch.zeros(4, 10_000)}
    out, _ = clip_and_noise(zeros, clip=clip, noise_multiplier=sigma, expected_batch_size=batch,
                            generator=torch.Generator().manual_seed(0))
    noise = torch.cat([out["a"].flatten(), out["b"]])  # 40 000 draws
    want = sigma * clip / batch
    assert noise.std().item() == pytest.approx(want, rel=0.02)
    assert abs(noise.mean().item()) < 4 * want / math.sqrt(noise.numel())


def test_same_seed_same_noise_different_seed_different():
    samples = {"z": torch.randn(3, 5, 2), "a": torch.randn(3, 4)}

    def run(seed):
        out, _ = clip_and_noise(samples, clip=1.0, noise_multiplier=1.0, expected_batch_size=3.0,
                                generator=torch.Generator().manual_seed(seed))
        return out

    one, two, other = run(7), run(7), run(8)
    assert all(torch.equal(one[k], two[k]) for k in samples)
    assert not torch.equal(one["a"], other["a"])


def test_noise_order_is_by_sorted_name_not_dict_order():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    kw = dict(clip=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
    x, _ = clip_and_noise({"a": a, "b": b}, generator=torch.Generator().manual_seed(0), **kw)
    y, _ = clip_and_noise({"b": b, "a": a}, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(x["a"], y["a"]) and torch.equal(x["b"], y["b"])


def test_empty_batch_is_pure_noise():
    empty = {"w": torch.zeros(0, 50, 40), "b": torch.zeros(0, 50)}
    out, norms = clip_and_noise(empty, clip=2.0, noise_multiplier=1.5, expected_batch_size=10.0,
                                generator=torch.Generator().manual_seed(0))
    assert norms.shape == (0,)
    assert out["w"].shape == (50, 40) and out["b"].shape == (50,)
    assert out["w"].std().item() == pytest.approx(1.5 * 2.0 / 10.0, rel=0.05)
    silent, _ = clip_and_noise(empty, clip=2.0, noise_multiplier=0.0, expected_batch_size=10.0,
                               generator=None)
    assert torch.equal(silent["w"], torch.zeros(50, 40))


def test_end_to_end_private_gradient_on_lora_model(lora):
    _, model = lora
    ids, mask, labels = _padded_batch(LENGTHS, seed=4)
    grads = per_sample_gradients(model, lambda: F.cross_entropy(
        model(input_ids=ids, attention_mask=mask).logits, labels, reduction="none"))
    out, norms = clip_and_noise(grads, clip=0.1, noise_multiplier=0.0, expected_batch_size=5.0,
                                generator=None)
    assert norms.shape == (5,)
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in out.values()))
    assert total <= 0.1 * 5 / 5.0 + 1e-6  # ≤ n·C / B
    assert {n: g.shape for n, g in out.items()} == {n: p.shape for n, p in _trainable(model).items()}


@pytest.mark.parametrize("kwargs,match", [
    (dict(clip=0.0), "clip"), (dict(clip=-1.0), "clip"), (dict(noise_multiplier=-0.1), "noise"),
    (dict(expected_batch_size=0.0), "expected_batch_size"),
])
def test_clip_and_noise_rejects_bad_arguments(kwargs, match):
    args = dict(clip=1.0, noise_multiplier=1.0, expected_batch_size=2.0, generator=None) | kwargs
    with pytest.raises(ValueError, match=match):
        clip_and_noise({"w": torch.zeros(2, 3)}, **args)


def test_clip_and_noise_rejects_inconsistent_batches():
    with pytest.raises(ValueError, match="batch size"):
        clip_and_noise({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, clip=1.0,
                       noise_multiplier=0.0, expected_batch_size=1.0, generator=None)
    with pytest.raises(ValueError, match="empty"):
        clip_and_noise({}, clip=1.0, noise_multiplier=0.0, expected_batch_size=1.0, generator=None)
