"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT plus an exact residual folded into the base.

Server: A ← Σp_k·A_k, B ← Σp_k·B_k, and W0 += s·(Σ_k p_k·B_k·A_k − B·A) with s = α/r, so the
global effective weight W0 + s·B·A equals Σ_k p_k·(W0 + s·B_k·A_k) exactly. The residual is
full-size (d_out×d_in per layer) and goes down to every client each round: it is counted in the
download bytes.
"""

from __future__ import annotations

from dataclasses import replace

from fedlora.methods import keys, lowrank
from fedlora.methods.base import GlobalState, Update
from fedlora.methods.lora import FedIT
from fedlora.methods.registry import register


@register
class FedExLoRA(FedIT):
    """FedEx-LoRA: average A and B; add the residual mean(B_k·A_k) − mean(B)·mean(A) to W0."""

    name = "fedex"
    averages = False  # its server step does more than average (see the module docstring)
    needs_each_upload = ("FedEx-LoRA's server needs each site's B_k·A_k (its residual Σ p_k·B_k·A_k − "
                         "B̄·Ā is a mean of products, not a product of means)")
    paper = "Singhal et al., ACL 2025, arXiv 2410.09432"
    supports_chains = False  # it folds residuals into the base weights itself

    def aggregate(self, glob: GlobalState, updates: list[Update], round: int) -> GlobalState:
        if not updates:
            return glob
        new = super().aggregate(glob, updates, round)
        weights = self.data_weights(updates)
        base = dict(new.base_delta)
        for prefix, (a, b) in keys.lora_modules(updates[0].state).items():
            target = lowrank.weighted_product([u.state[a] for u in updates],
                                              [u.state[b] for u in updates], weights)
            residual = self.scaling * (target - new.adapter[b].double() @ new.adapter[a].double())
            key = keys.base_of(prefix)
            old = base.get(key)
            base[key] = (residual if old is None else old.double() + residual).to(new.adapter[a].dtype)
        return replace(new, base_delta=base)
