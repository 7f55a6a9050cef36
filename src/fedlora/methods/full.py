"""Full fine-tuning with FedAvg: the upper reference for small models.

Clients train every pre-trained weight and the head (the LoRA layers stay at B = 0 and are
unused); they upload Δ_k = W_k − W0 and the server averages: Δ = Σp_k·Δ_k, the same as FedAvg
of the weights. Everything is full-size both ways. Position embeddings stay frozen: BERT feeds
them position ids broadcast over the batch, which leaves no per-example dimension for DP-SGD's
per-example gradients (Opacus#841) — frozen in both DP and non-DP runs so the two compare.
"""

from __future__ import annotations

from fedlora.methods import keys
from fedlora.methods.base import Method
from fedlora.methods.registry import register


@register
class FullFineTuning(Method):
    """Full fine-tuning (FedAvg of all weights): the upper reference for small models."""

    name = "full"
    averages = True
    paper = "McMahan et al., AISTATS 2017 (FedAvg)"
    lora_pairs = False  # it trains the full weights, not the LoRA factors

    def trainable(self, key: str, round: int) -> bool:
        if keys.is_base(key):
            return "position_embeddings" not in key
        return keys.is_head(key)

    def communicated(self, key: str) -> bool:
        return not (keys.is_lora_a(key) or keys.is_lora_b(key))
