"""Pure aggregation functions over states (`dict[str, Tensor]`)."""

from __future__ import annotations

import torch
from torch import Tensor


def weighted_mean(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """Σ_k p_k · state_k[key] for every key, with p_k = w_k / Σ w_k.

    All states must hold the same keys with the same shapes (validated upstream).
    """
    if not states:
        raise ValueError("weighted_mean needs at least one state")
    if len(states) != len(weights):
        raise ValueError("one weight per state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    keys = list(states[0])
    out = {}
    for key in keys:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += state[key].to(torch.float64) * (w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out
