"""Tokenising once, then building dynamically padded batches.

- `encode(tokenizer, texts, max_length)` — token ids per text (special tokens added, truncated
  to `max_length`, not padded), from one batched call of a Hugging Face tokenizer.
- `collate(token_ids, indices, pad_id)` — ``input_ids`` / ``attention_mask`` long tensors of
  shape (len(indices), longest selected sequence), right-padded with `pad_id`.
- `length_groups(lengths, max_size)` — indices cut into groups of similar length, at most
  `max_size` each, with the least padding for the number of passes (training micro-batches).
- `eval_batches(lengths, batch_size)` — the same groups, longest first, for evaluation.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedlora.errors import DataError

__all__ = ["PASS_COST_TOKENS", "collate", "encode", "eval_batches", "length_groups", "micro_batching"]

#: What one padded pass costs beyond its tokens, in tokens. Measured on one CPU core with
#: all-MiniLM-L6-v2 (CPU time of a pass ≈ a + b·tokens): a/b ≈ 33 tokens for a DP-SGD
#: forward + backward, ≈ 38 for an evaluation forward. It only decides where `length_groups`
#: cuts — fewer, larger passes against less padding —; any value gives valid groups.
PASS_COST_TOKENS = 32

#: `train.micro_batch_size = 0` ("for the device"): examples per DP-SGD pass, and what a pass
#: costs beyond its tokens, per device type. On a CPU compute grows with the tokens and a pass
#: costs ~32 tokens more (measured above), so passes of 64 grouped by length waste little. On a
#: GPU the tokens of a pass run in parallel and its fixed cost (kernel launches, the Python of
#: every layer and every per-example gradient hook, ~milliseconds) is worth thousands of tokens:
#: fewer, larger passes. The GPU values are an estimate, not a measurement;
#: `benchmarks/pass_cost.py` measures a pass's fixed cost in tokens on the device at hand, and
#: `train.micro_batch_size` set to a number overrides the size on any device.
DEVICE_MICRO_BATCH = {"cpu": 64, "cuda": 256}
DEVICE_PASS_COST_TOKENS = {"cpu": PASS_COST_TOKENS, "cuda": 4096}


def micro_batching(size: int, device_type: str) -> tuple[int, float]:
    """(examples per pass, pass cost in tokens) for `train.micro_batch_size = size` on a device of
    type `device_type` ("cpu", "cuda", ...): size 0 takes the device's size; the pass cost is
    always the device's (a CPU's for devices without an entry)."""
    cost = DEVICE_PASS_COST_TOKENS.get(device_type, PASS_COST_TOKENS)
    return (size or DEVICE_MICRO_BATCH.get(device_type, DEVICE_MICRO_BATCH["cpu"])), cost


def _is_whole(value: Any, minimum: int) -> bool:
    return (
        isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    )


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text: special tokens added, truncated to `max_length`, no padding.

    `tokenizer` is a Hugging Face tokenizer; it is called once on the whole list (fast
    tokenizers then work in parallel in Rust).
    """
    if not _is_whole(max_length, 2):
        raise DataError(
            f"max_length must be a whole number >= 2 (room for the special tokens), got "
            f"{max_length!r} — e.g. 128"
        )
    texts = list(texts)
    if not texts:
        return []
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=int(max_length),
        padding=False,
        add_special_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return [list(ids) for ids in enc["input_ids"]]


def collate(
    token_ids: Sequence[Sequence[int]], indices: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """A right-padded batch of the sequences ``token_ids[i] for i in indices`` (in that order).

    Returns ``input_ids`` and ``attention_mask``, both ``torch.long`` of shape
    (len(indices), L) with L the longest selected sequence; padding positions hold `pad_id` in
    ``input_ids`` and 0 in ``attention_mask`` (1 elsewhere). An empty `indices` gives shape
    (0, 0).
    """
    seqs = [token_ids[int(i)] for i in indices]
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            input_ids[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            attention_mask[row, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def length_groups(lengths: Sequence[int], max_size: int,
                  pass_cost: float = PASS_COST_TOKENS) -> list[list[int]]:
    """Indices 0..n-1 of `lengths` in groups of at most `max_size`, for padded passes.

    The indices are sorted by length (stably: equal lengths keep their order) and cut into
    consecutive groups g that minimise

        Σ_g ( pass_cost + |g| · max_{i∈g} lengths[i] )

    — the tokens the right-padded passes compute, plus a fixed cost per pass — exactly, by
    dynamic programming over the cut points: with L sorted ascending,
    f(0) = 0, f(i) = pass_cost + min_{i−max_size ≤ j < i} f(j) + (i − j)·L[i−1]
    (O(n·max_size); ties go to the larger group). Cutting every `max_size` examples instead
    pads the shortest text of each group to its longest (about 20% wasted on the default
    data with groups of 64); these groups waste about 3%. Groups come shortest first.
    """
    if not _is_whole(max_size, 1):
        raise DataError(f"batch_size must be a whole number >= 1, got {max_size!r} — e.g. 64")
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    ascending = np.asarray(lengths, dtype=np.float64)[order]
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)  # start[i]: where the group ending before i begins
    for i in range(1, n + 1):
        lo = max(0, i - int(max_size))
        cost = best[lo:i] + (i - np.arange(lo, i)) * ascending[i - 1]
        k = int(np.argmin(cost))
        best[i] = cost[k] + pass_cost
        start[i] = lo + k
    groups, i = [], n
    while i > 0:
        groups.append(order[start[i]:i].tolist())
        i = int(start[i])
    return groups[::-1]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of indices into `lengths` for evaluation: `length_groups` (at most `batch_size`
    each, little padding), longest first — a memory problem shows at once.

    Every index 0..len(lengths)-1 appears in exactly one batch; reading the batches in order
    gives the indices sorted by length, longest first.
    """
    return [group[::-1] for group in length_groups(lengths, batch_size)[::-1]]
