"""`train.precision = "bf16"`: autocast forward/backward, everything DP does in fp32.

References: the fp32 per-example gradients of the same examples (bf16 must agree to a stated
tolerance, and must differ, or autocast was not on); the clip bound C, checked on each example's
contribution to the clipped sum.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import build_experiment
from fedlora.privacy.dpsgd import clip_and_sum, per_sample_gradients, per_sample_norms


@pytest.fixture(scope="module")
def overrides(tiny_model_dir, toy_csv):
    return [f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "federation.rounds=2",
            "federation.local_steps=2", "train.batch_size=16", "threads=1",
            "federation.eval_examples=0", "privacy.noise=seeded", "method.name=lora"]


def _grads(overrides, precision, idx):
    exp = build_experiment(load_config(None, overrides + [f"train.precision={precision}"]))
    trainer, client = exp.trainer, exp.clients[0]
    trainer.handle.install(exp.method.client_state(exp.initial, {}, exp.method.download(
        exp.method.init_global(exp.initial), 0), 0))
    # a trained-looking adapter: B ≠ 0, so A's gradients are not zero
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for k in trainer.handle.shapes():
            if ".lora_B." in k:
                trainer.handle.param(k).copy_(0.1 * torch.randn(trainer.handle.param(k).shape, generator=gen))
    trainer.handle.set_trainable(lambda k: exp.method.trainable(k, 0))
    return per_sample_gradients(trainer.model, lambda: trainer.per_example_loss(client, idx))


def test_bf16_per_example_gradients_match_fp32_and_are_fp32(overrides):
    idx = list(range(12))
    ref = _grads(overrides, "fp32", idx)
    got = _grads(overrides, "bf16", idx)
    assert set(got) == set(ref) and len(ref) > 4
    differs = False
    for name, g in got.items():
        assert g.dtype == torch.float32, name  # handed to clipping in fp32
        r = ref[name]
        # per example: relative error of the gradient below 5% (bf16 keeps 8 bits of mantissa:
        # ~0.4% per rounding, compounded through the tiny BERT's layers)
        err = (g - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-12)
        assert err.max() < 0.05, (name, float(err.max()))
        differs |= not torch.equal(g, r)
    assert differs  # autocast was on: bf16 results are not bit-identical to fp32
    norms_ref, norms = per_sample_norms(ref), per_sample_norms(got)
    assert torch.allclose(norms, norms_ref, rtol=0.03)


def test_bf16_clipped_contributions_stay_within_c(overrides):
    grads = _grads(overrides, "bf16", list(range(12)))
    clip = 0.01  # far below every example's norm: every example is clipped
    assert per_sample_norms(grads).min() > clip
    summed, _ = clip_and_sum(grads, clip)
    # each example's contribution, clipped in fp32, has norm ≤ C (up to fp32 rounding)
    factors = clip / (per_sample_norms(grads) + 1e-6)
    each = per_sample_norms({k: g * factors.view(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()})
    assert each.max() <= clip * (1 + 1e-5)
    total = math.sqrt(sum(float(v.pow(2).sum()) for v in summed.values()))
    assert total <= 12 * clip * (1 + 1e-5)  # the sum of 12 such contributions


def test_a_bf16_private_run_uploads_fp32_and_accounts_as_fp32(overrides, tmp_path):
    bf16 = fedlora.run(None, tmp_path / "bf16", overrides=overrides + ["train.precision=bf16"],
                       progress=None)
    fp32 = fedlora.run(None, tmp_path / "fp32", overrides=overrides, progress=None)
    assert bf16["epsilon"] == fp32["epsilon"]  # precision changes no privacy parameter
    assert bf16["noise_multiplier"] == fp32["noise_multiplier"]
    assert bf16["bytes_uploaded"] == fp32["bytes_uploaded"]  # fp32 on the wire
    assert math.isfinite(bf16["test_loss"]) and abs(bf16["test_loss"] - fp32["test_loss"]) < 0.05


def test_an_unknown_precision_is_refused(overrides):
    with pytest.raises(ConfigError, match="train.precision must be one of fp32, bf16"):
        load_config(None, overrides + ["train.precision=fp8"])
