"""HetLoRA (Cho et al., EMNLP 2024): zero-pad to the largest rank, aggregate, truncate back.

Server, per LoRA layer: pad every A_k (rows) and B_k (columns) with zeros to r_max and average
them with the paper's sparsity weights w_k ∝ ‖B_k·A_k‖_F (a client whose update is larger counts
more; data weights p_k when every norm is zero). Client k downloads the first r_k rows of A and
columns of B. Inexact, like FedIT. The paper's local rank self-pruning is not implemented.
"""

from __future__ import annotations

from fedlora.methods import keys, lowrank
from fedlora.methods.aggregate import weighted_mean
from fedlora.methods.base import GlobalState, Update
from fedlora.methods.lora import FedIT
from fedlora.methods.registry import register


def norm_weights(As, Bs, fallback: list[float]) -> list[float]:
    """w_k = ‖B_k·A_k‖_F (HetLoRA's sparsity-weighted aggregation), or `fallback` if all are 0."""
    norms = [float((B.double() @ A.double()).norm()) for A, B in zip(As, Bs)]
    return norms if sum(norms) > 0 else fallback


@register
class HetLoRA(FedIT):
    """HetLoRA: zero-pad to r_max, average weighted by ‖B_k·A_k‖, truncate to each client's rank."""

    name = "hetlora"
    averages = False  # its server step does more than average (see the module docstring)
    needs_each_upload = "HetLoRA weights each site by the norm of its own B_k·A_k"
    paper = "Cho et al., EMNLP 2024, arXiv 2401.06432"
    supports_chains = False  # its clients hold different ranks
    supports_client_ranks = True
    lora_pairs = False  # its point is unequal ranks: factors masked beyond each client's rank

    def aggregate(self, glob: GlobalState, updates: list[Update], round: int) -> GlobalState:
        if not updates:
            return glob
        modules = keys.lora_modules(updates[0].state)
        padded = lowrank.pad_like([u.state for u in updates], glob.adapter)
        adapter = dict(glob.adapter)
        for a, b in modules.values():
            w = norm_weights([s[a] for s in padded], [s[b] for s in padded], self.data_weights(updates))
            adapter.update(weighted_mean([{a: s[a], b: s[b]} for s in padded], w))
        handled = {k for pair in modules.values() for k in pair}
        return self.average_rest(glob.with_adapter(adapter), updates, handled)
