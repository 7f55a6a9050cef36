"""FedIT (vanilla federated LoRA): clients train A, B and the head; the server averages each.

The aggregate is inexact: mean(B_k)·mean(A_k) ≠ mean(B_k·A_k) once clients' A differ.
"""

from fedlora.methods import keys
from fedlora.methods.base import Method
from fedlora.methods.registry import register


@register
class FedIT(Method):
    """FedIT / vanilla LoRA: train and average A, B and the head separately."""

    name = "lora"
    averages = True
    paper = "Zhang et al., ICASSP 2024 (FedIT), arXiv 2305.05644"
    supports_chains = True

    def trainable(self, key: str, round: int) -> bool:
        return not keys.is_base(key)
