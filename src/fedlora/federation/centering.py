"""DP feature centring: the classifier reads e − μ, μ the clients' mean feature, estimated under DP.

Why. The shipped encoder's unit-norm sentence embeddings e share a large common component
(‖mean e‖ ≈ 0.46 on the shipped data). Uncentred, every per-example gradient of the head,
(p − y)·eᵀ, points mostly along that one direction, and a few dozen noisy DP-SGD steps learn
little else: measured on the validation split, DP (ε = 3) training of the head on frozen
features reaches 0.63 uncentred and 0.74 centred, and the full FFA-LoRA run 0.60 → 0.71 after
one round. A public centre does not do: the mean embedding of random vocabulary or of English
prose from Python's docstrings is too far from this data's (validation 0.66 and 0.63).

The query, once, before round 1: a message of its own (`Transport.ask_center`; on Flower a
query message asking "center"), answered by `LocalTrainer.answer_center_query` and recorded in
the client's ledger as the entry `LEDGER_ENTRY`. Client k draws a Poisson sample of its
examples at rate q_m = min(1, m/n_k) (m = `model.center_examples`) and uploads

    S̃_k = Σ_{i ∈ sample} e_i + N(0, σ_m² I)        and        c_k = q_m·n_k,

features e_i computed by the model it was sent (B = 0: the pre-trained encoder's). ‖e_i‖ = 1,
so adding or removing one example moves the sum by at most 1: a Poisson-subsampled Gaussian
mechanism with noise multiplier σ_m (`privacy.center_noise`), recorded in the client's
accountant like a DP-SGD step and included when the DP-SGD noise is calibrated, so the total ε
stays within the target. n_k is treated as public, as it already is in DP-SGD's q·n. The server
sets μ = Σ_k S̃_k / Σ_k c_k; it becomes the model's `feature_center` buffer, a statistic of the
global state (`GlobalState.statistics`, key `keys.CENTER`): installed with the model, sent down
with every download, checkpointed and resumed, never trained and not a weight. Exported heads
fold it in: W·(e − μ) + b = W·e + (b − W·μ).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from fedlora.config import Config
from fedlora.data.batching import collate
from fedlora.device import device_of, to_device
from fedlora.methods import keys
from fedlora.methods.base import GlobalState, State
from fedlora.privacy.randomness import Stream

LEDGER_ENTRY = "center"  # the query's entry in a client's privacy ledger (rounds are 0, 1, …)
SELECTION_TAG = -1  # the tag its client sample is drawn with (`select_clients`), as always
SUM = "feature_sum"
COUNT = "feature_count"


def centering_enabled(config: Config) -> bool:
    """`model.center = "auto"` and the classifier reads unit-norm features (mean_normalized)."""
    if config.model.center == "off":
        return False
    from fedlora.model import resolve_model_path
    from fedlora.pooling import resolve_pooling

    return resolve_pooling(config.model.pooling, resolve_model_path(config.model.path)) \
        == "mean_normalized"


def pooled_classifier(model: nn.Module) -> nn.Module:
    """The `MeanPoolingClassifier` inside a PEFT model (LoRA layers included)."""
    from fedlora.pooling import MeanPoolingClassifier

    for module in model.modules():
        if isinstance(module, MeanPoolingClassifier):
            return module
    raise ValueError("feature centring needs a mean-pooled classifier (model.pooling)")


@torch.no_grad()
def noisy_feature_sum(model: nn.Module, token_ids: list[list[int]], rate: float, noise: float,
                      pad_id: int, micro_batch: int, stream: Stream) -> State:
    """{SUM: Σ_{i ∈ Poisson(rate) sample} e_i + N(0, noise² I), COUNT: rate·n} (see module doc).

    Features are computed on the model's device; the sample and the noise are drawn from
    the client's "center" `stream` on the CPU (secret by default: `fedlora.privacy.randomness`),
    and the answer — what leaves the client — is on the CPU."""
    classifier = pooled_classifier(model)
    device = device_of(model)
    was_training = model.training
    model.eval()
    chosen = (stream.uniform(len(token_ids)) < rate).nonzero().flatten().tolist()
    chosen.sort(key=lambda i: len(token_ids[i]))  # length-sorted: little padding
    total = classifier.feature_center.new_zeros(classifier.feature_center.shape, dtype=torch.float64)
    for start in range(0, len(chosen), micro_batch):
        batch = to_device(collate(token_ids, chosen[start:start + micro_batch], pad_id), device)
        total += classifier.features(**batch).to(torch.float64).sum(0)
    total += stream.normal(tuple(total.shape), 1.0, torch.float64).to(device) * noise
    model.train(was_training)
    return {SUM: total.to(torch.float32).cpu(), COUNT: torch.tensor(rate * len(token_ids))}


def check_answer(upload: State, hidden: int) -> str | None:
    """Why a client's answer to the query cannot be used (None: it can)."""
    if set(upload) != {SUM, COUNT}:
        return f"sent {sorted(upload)} instead of {[COUNT, SUM]}"
    s, c = upload[SUM], upload[COUNT]
    if tuple(s.shape) != (hidden,) or c.numel() != 1:
        return f"sent a feature sum of shape {tuple(s.shape)} (expected ({hidden},))"
    if not torch.isfinite(s).all() or not math.isfinite(float(c)) or float(c) <= 0:
        return "sent a non-finite feature sum or a non-positive count"
    return None


def center_from(answers: list[State]) -> Tensor:
    """μ = Σ_k S̃_k / Σ_k c_k."""
    total = sum(a[SUM].to(torch.float64) for a in answers)
    count = sum(float(a[COUNT]) for a in answers)
    return (total / count).to(torch.float32)


def with_center(glob: GlobalState, center: Tensor) -> GlobalState:
    return replace(glob, statistics={**glob.statistics, keys.CENTER: center})


def has_center(glob: GlobalState) -> bool:
    return keys.CENTER in glob.statistics


def fold_center(state: State) -> State:
    """The same model without μ: b ← b − W·μ for the head (`*classifier.weight/bias`), μ dropped.

    W·(e − μ) + b = W·e + (b − W·μ), so predictions are unchanged; the result loads into a model
    whose `feature_center` is 0, e.g. with `PeftModel.from_pretrained` on a fresh base model."""
    if keys.CENTER not in state:
        return dict(state)
    out = {k: v for k, v in state.items() if not keys.is_center(k)}
    center = state[keys.CENTER]
    weights = [k for k in out if keys.is_head(k) and k.endswith("classifier.weight")]
    for w in weights:
        b = w[: -len("weight")] + "bias"
        out[b] = out[b] - out[w] @ center
    return out
