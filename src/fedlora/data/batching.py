"""Tokenising once, then building dynamically padded batches.

- `encode(tokenizer, texts, max_length)` — token ids per text (special tokens added, truncated
  to `max_length`, not padded), from one batched call of a Hugging Face tokenizer.
- `collate(token_ids, indices, pad_id)` — ``input_ids`` / ``attention_mask`` long tensors of
  shape (len(indices), longest selected sequence), right-padded with `pad_id`.
- `eval_batches(lengths, batch_size)` — index batches of similar length (longest first), for
  fast evaluation with little padding.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedlora.errors import DataError

__all__ = ["collate", "encode", "eval_batches"]


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


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of indices into `lengths`, grouped by length (longest first).

    Every index 0..len(lengths)-1 appears in exactly one batch; every batch but the last has
    `batch_size` indices. Sorting is stable, so equal lengths keep their index order. Padding
    waste is small, and the longest batch comes first (a memory problem shows at once).
    """
    if not _is_whole(batch_size, 1):
        raise DataError(f"batch_size must be a whole number >= 1, got {batch_size!r} — e.g. 64")
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i : i + int(batch_size)].tolist() for i in range(0, n, int(batch_size))]
