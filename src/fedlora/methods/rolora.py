"""RoLoRA (Chen et al., 2024): alternate rounds train and average only B, then only A.

Round 0, 2, 4, …: A frozen, clients train B (and the head); round 1, 3, …: B frozen, they train A.
With one factor the same on every client, the average is exact each round:
mean(B_k)·A = mean(B_k·A) and B·mean(A_k) = mean(B·A_k). B goes first because it starts at zero
(A's gradient Bᵀ·g·xᵀ would be zero). Only the trained factor (and the head) is uploaded.
"""

from __future__ import annotations

from fedlora.methods import keys
from fedlora.methods.base import Method
from fedlora.methods.registry import register


@register
class RoLoRA(Method):
    """RoLoRA: alternate rounds training/averaging only B (A frozen) and only A (B frozen)."""

    name = "rolora"
    averages = True
    paper = "Chen et al., 2024, arXiv 2409.02346"
    supports_chains = True

    def trainable(self, key: str, round: int) -> bool:
        if keys.is_base(key):
            return False
        if keys.is_lora_b(key):
            return round % 2 == 0
        if keys.is_lora_a(key):
            return round % 2 == 1
        return True  # the head, every round
