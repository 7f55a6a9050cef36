"""Ghost clipping and book-keeping (fedlora.privacy.ghost) against materialised per-example
gradients (one backward per example, and Opacus's grad samplers) and Opacus's own norm sampler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample.linear import compute_linear_norm_sample
from torch import nn

from fedlora.privacy.dpsgd import clip_and_sum, mark_reusable, per_sample_gradients
from fedlora.privacy.ghost import clipped_sum, embedding_squared_norms, ghost_pays, ghost_squared_norms
from tests.test_dpsgd import _padded_batch, _tiny_lora_model


def _params(lin):
    return [("weight", lin.weight), ("bias", lin.bias)]


@pytest.mark.parametrize("positions", [1, 7])
def test_ghost_norms_equal_materialised_and_opacus_norm_sampler(positions):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    a, g = torch.randn(4, positions, 6), torch.randn(4, positions, 5)
    ours = ghost_squared_norms(lin, _params(lin), a, g)
    full_w = torch.einsum("ntp,ntd->npd", g, a)  # Σ_t g_t a_tᵀ, one example at a time
    torch.testing.assert_close(ours["weight"], full_w.pow(2).sum((1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["bias"], g.sum(1).pow(2).sum(1), rtol=1e-5, atol=1e-5)
    theirs = compute_linear_norm_sample(lin, [a], g)  # an independent implementation
    torch.testing.assert_close(ours["weight"].sqrt(), theirs[lin.weight], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["bias"].sqrt(), theirs[lin.bias], rtol=1e-5, atol=1e-5)


def test_embedding_norms_equal_materialised_and_opacus_norm_sampler():
    from opacus.grad_sample.embedding import compute_embedding_grad_sample, compute_embedding_norm_sample

    torch.manual_seed(0)
    emb = nn.Embedding(7, 5)
    ids = torch.tensor([[1, 1, 3, 0], [2, 0, 2, 2], [6, 5, 4, 3]])  # repeats within an example
    g = torch.randn(3, 4, 5)
    ours = embedding_squared_norms(ids, g)
    full = compute_embedding_grad_sample(emb, [ids], g)[emb.weight]  # (n, V, d), materialised
    torch.testing.assert_close(ours, full.pow(2).sum((1, 2)), rtol=1e-5, atol=1e-6)
    theirs = compute_embedding_norm_sample(emb, [ids], g)[emb.weight]  # an independent one
    torch.testing.assert_close(ours.sqrt(), theirs, rtol=1e-5, atol=1e-6)


def test_ghost_pays_by_multiply_adds():
    assert not ghost_pays(64, 384, 8)    # LoRA's B at r = 8: 64·392 > 3072, materialise
    assert not ghost_pays(64, 8, 384)    # and A
    assert ghost_pays(64, 384, 384)      # a full 384 × 384 weight: 64·768 < 147,456
    assert not ghost_pays(1, 384, 384)   # one position (a head): the same cost, materialised
    assert not ghost_pays(300, 384, 384)  # long sequences: the T × T Gram matrices cost more


class FullyTrained(nn.Module):
    """A tiny encoder-like stack with every kind of layer trained: embedding, linear over
    positions, layer norm, and a head on the first position."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.inner = nn.Linear(12, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, ids, mask):
        h = torch.tanh(self.inner(self.embed(ids))) * mask[..., None]
        return self.head(self.norm(h)[:, 0])


def _compare(model, loss_fn, clip, mode, atol=1e-5):
    want, want_norms = clip_and_sum(per_sample_gradients(model, loss_fn), clip)
    got, norms = clipped_sum(model, loss_fn, clip, mode)
    assert list(got) == list(want)
    torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=atol)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=name)
    return norms


@pytest.mark.parametrize("mode", ["on", "auto", "off"])
@pytest.mark.parametrize("clip", [0.05, 100.0], ids=["clipped", "unclipped"])
def test_clipped_sum_equals_the_materialised_one_on_a_fully_trained_model(mode, clip):
    torch.manual_seed(0)
    model = FullyTrained()
    ids, mask, labels = _padded_batch([4, 2, 6, 1, 5], vocab=20, seed=3)
    norms = _compare(model, lambda: F.cross_entropy(model(ids, mask), labels + 1, reduction="none"),
                     clip, mode)
    assert (norms > 0.05).all()  # the small clip bound does clip every example


@pytest.mark.parametrize("freeze_a", [False, True], ids=["lora", "ffa"])
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_clipped_sum_equals_the_materialised_one_on_a_lora_model(freeze_a, mode):
    model = _tiny_lora_model(freeze_a)
    ids, mask, labels = _padded_batch([3, 9, 5, 12, 1])
    _compare(model, lambda: F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits,
                                            labels, reduction="none"), 0.01, mode)


def test_full_fine_tuning_of_a_bert_layer_takes_the_ghost_route_and_matches():
    """Full weights of a transformer (query/value 16 × 16 at 12 positions): auto picks the
    Gram route for them and the result is the materialised one."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).train()
    for name, p in model.named_parameters():
        p.requires_grad_("query" in name or "value" in name or "classifier" in name)
    assert ghost_pays(12, 64, 64)
    ids, mask, labels = _padded_batch([3, 9, 5, 12, 1])
    _compare(model, lambda: F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits,
                                            labels, reduction="none"), 0.01, "auto")


def test_a_reusable_layer_sums_its_calls():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    mark_reusable(lin)
    x = torch.randn(3, 5, 4)
    _compare(lin, lambda: lin(torch.tanh(lin(x))).pow(2).sum((1, 2)), 0.5, "on")


def test_sensitivity_of_the_clipped_sum_is_at_most_clip():
    """Removing one example moves the clipped sum by at most C (the bound the noise is scaled to)."""
    torch.manual_seed(0)
    model = FullyTrained()
    ids, mask, labels = _padded_batch([4, 2, 6, 1, 5], vocab=20, seed=3)
    clip = 0.3

    def total(rows):
        summed, _ = clipped_sum(model, lambda: F.cross_entropy(
            model(ids[rows], mask[rows]), labels[rows] + 1, reduction="none"), clip, "on")
        return torch.cat([v.flatten() for v in summed.values()])

    everyone = total(list(range(5)))
    for drop in range(5):
        gap = (everyone - total([i for i in range(5) if i != drop])).norm()
        assert gap <= clip * (1 + 1e-4)
        assert gap > 0.5 * clip  # each example's gradient exceeds C here, so it is clipped to C


def test_empty_batch_and_bad_arguments():
    model = FullyTrained()
    ids, mask, labels = _padded_batch([4, 2], vocab=20, seed=3)
    summed, norms = clipped_sum(model, lambda: F.cross_entropy(
        model(ids[:0], mask[:0]), labels[:0] + 1, reduction="none"), 1.0, "on")
    assert norms.shape == (0,) and all((v == 0).all() for v in summed.values())
    assert summed["inner.weight"].shape == (12, 12)
    with pytest.raises(ValueError, match="mode must be one of"):
        clipped_sum(model, lambda: None, 1.0, "always")
    with pytest.raises(ValueError, match="clip must be > 0"):
        clipped_sum(model, lambda: None, 0.0)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_private_run_is_the_same_with_and_without_ghost_clipping(method, tiny_model_dir, toy_csv,
                                                                     tmp_path):
    """The whole DP step through the client (seeded noise): the Gram route for every linear
    layer gives the materialised run's model, up to float rounding."""
    import fedlora

    overrides = [f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
                 "data.text_column=review", "data.label_column=sentiment", "federation.rounds=2",
                 "federation.local_steps=2", "train.batch_size=16", "threads=1",
                 "federation.eval_examples=0", "privacy.noise=seeded", f"method.name={method}",
                 "train.lr=0.05"]
    runs = {mode: fedlora.run(None, tmp_path / mode, overrides=overrides + [
        f"train.ghost_clipping={mode}"], progress=None) for mode in ("on", "off")}
    on, off = runs["on"], runs["off"]
    assert on["epsilon"] == off["epsilon"] and on["noise_multiplier"] == off["noise_multiplier"]
    assert on["test_loss"] == pytest.approx(off["test_loss"], rel=1e-4)
    assert on["test_accuracy"] == off["test_accuracy"]


def test_an_unknown_ghost_clipping_mode_is_refused():
    from fedlora.config import load_config
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="train.ghost_clipping must be one of auto, on, off"):
        load_config(None, ["train.ghost_clipping=always"])


def test_with_every_layer_materialised_the_result_is_bit_for_bit_the_old_path():
    """"off" (and "auto" on LoRA factors and the head) must not move a single bit: every
    figure measured before ghost clipping existed stays true."""
    for mode in ("off", "auto"):
        model = _tiny_lora_model(True)
        ids, mask, labels = _padded_batch([3, 9, 5, 12, 1])
        loss = lambda: F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits,  # noqa: E731
                                       labels, reduction="none")
        want, want_norms = clip_and_sum(per_sample_gradients(model, loss), 0.01)
        got, norms = clipped_sum(model, loss, 0.01, mode)
        assert torch.equal(norms, want_norms)
        assert all(torch.equal(got[k], want[k]) for k in want)
