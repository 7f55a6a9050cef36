"""FlexLoRA (Bai et al., NeurIPS 2024): aggregate the full product, give each client its top-r_k SVD.

Server, per LoRA layer: ΔW = Σ_k p_k·B_k·A_k (clients may have different ranks), then
ΔW = U·S·Vᵀ and the global factors B = U_r·S_r^½, A = S_r^½·V_rᵀ at the model's rank r_max.
Client k downloads the first r_k of them: B[:, :r_k]·A[:r_k] is the best rank-r_k
approximation of ΔW (Eckart–Young). What lies beyond r_max is dropped, as in the paper.
"""

from __future__ import annotations

from fedlora.methods import keys, lowrank
from fedlora.methods.base import GlobalState, Update
from fedlora.methods.lora import FedIT
from fedlora.methods.registry import register


@register
class FlexLoRA(FedIT):
    """FlexLoRA: ΔW = Σ p_k·B_k·A_k, truncated SVD, each client gets its top-r_k factors."""

    name = "flexlora"
    averages = False  # its server step does more than average (see the module docstring)
    needs_each_upload = ("FlexLoRA's server needs each site's B_k·A_k (the "
                         "SVD of Σ p_k·B_k·A_k, a mean of products)")
    paper = "Bai et al., NeurIPS 2024, arXiv 2402.11505"
    supports_client_ranks = True

    def aggregate(self, glob: GlobalState, updates: list[Update], round: int) -> GlobalState:
        if not updates:
            return glob
        weights = self.data_weights(updates)
        modules = keys.lora_modules(updates[0].state)
        adapter = dict(glob.adapter)
        for a, b in modules.values():
            delta = lowrank.weighted_product([u.state[a] for u in updates],
                                             [u.state[b] for u in updates], weights)
            A, B = lowrank.svd_factors(delta, self.max_rank)
            adapter[a], adapter[b] = A.to(glob.adapter[a].dtype), B.to(glob.adapter[b].dtype)
        handled = {k for pair in modules.values() for k in pair}
        return self.average_rest(glob.with_adapter(adapter), updates, handled)
