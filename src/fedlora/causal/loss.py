"""The causal-LM loss of a prompt/answer pair: only the answer's tokens count.

For pair i with tokens x_1..x_T whose answer starts at s (x_s..x_T: the answer and its eos),

    L_i = (1 / (T − s + 1)) · Σ_{t=s..T} −log p(x_t | x_<t)

the **mean** over the answer's tokens. Mean, not sum: under DP-SGD each pair's gradient is
clipped to C whatever its length, and with the mean an unclipped gradient has the same scale for
a 2-token answer as for a 20-token one, so one clip bound C fits every pair and long answers do
not dominate the update (with the sum, long answers would be clipped harder). One pair is one
example: its gradient, however many tokens it has, is what DP-SGD clips.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora.data.batching import collate
from fedlora.device import device_of, to_device


def answer_mask(starts: Tensor, lengths: Tensor, width: int) -> Tensor:
    """(n, width − 1) booleans: is shifted position t (predicting token t + 1) an answer token?"""
    target = torch.arange(1, width, device=starts.device).unsqueeze(0)
    return (target >= starts.unsqueeze(1)) & (target < lengths.unsqueeze(1))


def answer_token_losses(logits: Tensor, input_ids: Tensor, starts: Tensor, lengths: Tensor,
                        first: int = 0) -> Tensor:
    """Per-pair mean cross-entropy over answer tokens → (n,).

    `logits` (n, P, V) are those of positions first … first + P − 1 (all of them: `first` = 0,
    P = T); `input_ids` (n, T). Every answer token t must be predicted by a kept position t − 1.
    """
    width = input_ids.shape[1]
    mask = answer_mask(starts, lengths, width)[:, first:first + logits.shape[1]]
    targets = input_ids[:, first + 1:first + 1 + logits.shape[1]]
    logits = logits[:, :targets.shape[1]]
    mask = mask[:, :targets.shape[1]]
    token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    mask = mask.to(token.dtype)
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def causal_lm_loss(model: nn.Module, token_ids: list[list[int]], starts: list[int],
                   idx: list[int], pad_id: int) -> Tensor:
    """`answer_token_losses` of pairs `idx`, right-padded: in a causal model the padding after a
    pair cannot change its logits, so a pair's loss does not depend on its batch-mates.

    Only the positions that predict some answer token of the batch get logits (transformers'
    `logits_to_keep`, where the model has it): with a 49k vocabulary the output layer and the
    softmax over every prompt position would cost more than the answers need.
    """
    device = device_of(model)
    batch = to_device(collate(token_ids, idx, pad_id), device)
    start = torch.tensor([starts[i] for i in idx], device=device)
    lengths = batch["attention_mask"].sum(1)
    first = max(int(start.min()) - 1, 0) if len(idx) else 0
    keep = {}
    if len(idx) and _keeps_logits(model):
        keep["logits_to_keep"] = torch.arange(first, int(lengths.max()) - 1, device=device)
    else:
        first = 0
    logits = model(**batch, **keep).logits
    return answer_token_losses(logits, batch["input_ids"], start, lengths, first)


def _keeps_logits(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
