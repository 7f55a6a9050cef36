"""LoRA-FAIR (Bian et al., ICCV 2025): FedIT plus a server-side correction of B.

Server, per LoRA layer: Ā = Σp_k·A_k, B̄ = Σp_k·B_k, target T = Σ_k p_k·B_k·A_k; then
B = B̄ + ΔB with ΔB = argmin ‖(B̄ + ΔB)·Ā − T‖_F, i.e. B = T·Ā⁺ (least squares). ΔB = 0 is a
candidate, so the product error is never larger than FedIT's. The paper adds a cosine-similarity
regulariser on ΔB; this is the plain least-squares form the issue specifies.
"""

from __future__ import annotations

import torch

from fedlora.methods import keys, lowrank
from fedlora.methods.base import GlobalState, Update
from fedlora.methods.lora import FedIT
from fedlora.methods.registry import register


def corrected_b(A_mean, target):
    """argmin_B ‖B·Ā − T‖_F = T·Ā⁺ (minimum-norm least squares, float64)."""
    return target.double() @ torch.linalg.pinv(A_mean.double())


@register
class LoRAFAIR(FedIT):
    """LoRA-FAIR: average A and B, then correct B so mean(B)·mean(A) best matches Σ p_k·B_k·A_k."""

    name = "fair"
    averages = False  # its server step does more than average (see the module docstring)
    needs_each_upload = ("LoRA-FAIR's server needs each site's B_k·A_k (its "
                         "target Σ p_k·B_k·A_k is a mean of products)")
    paper = "Bian et al., ICCV 2025, arXiv 2411.14961"

    def aggregate(self, glob: GlobalState, updates: list[Update], round: int) -> GlobalState:
        if not updates:
            return glob
        new = super().aggregate(glob, updates, round)
        weights = self.data_weights(updates)
        adapter = dict(new.adapter)
        for a, b in keys.lora_modules(updates[0].state).values():
            target = lowrank.weighted_product([u.state[a] for u in updates],
                                              [u.state[b] for u in updates], weights)
            adapter[b] = corrected_b(adapter[a], target).to(adapter[b].dtype)
        return new.with_adapter(adapter)
