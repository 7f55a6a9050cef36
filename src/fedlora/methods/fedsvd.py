"""FedSVD (Lee et al., NeurIPS 2025): FFA-LoRA clients, and a server that re-orients A every round.

Clients do exactly what FFA-LoRA clients do: A is frozen, they train B (and the head) under
DP and upload only those. The server averages B as FFA-LoRA does — exact, since every client
holds the same A: B̄·A = Σ_k p_k·B_k·A — then re-factors each layer's product by its SVD,

    B̄·A = U·S·Vᵀ,   A ← V_rᵀ (orthonormal rows),   B ← U_r·S_r,

which leaves the model (B·A, hence every output) unchanged but turns A towards the directions
the federation's update actually uses: the next round's B trains in the principal subspace
of what was learnt, not in FFA-LoRA's fixed random one. The re-factoring reads only the
aggregate of DP-protected uploads, so it is post-processing and costs no ε.

On the wire: uploads are FFA-LoRA's (B and the head); downloads carry the new A as well
(clients cannot compute it), except for layers whose B is still zero: there A is the one every
client built from the shared seed, and it is not sent.
"""

from __future__ import annotations

from fedlora.methods import keys, lowrank
from fedlora.methods.base import GlobalState, State, Update
from fedlora.methods.ffa import FFALoRA
from fedlora.methods.registry import register


@register
class FedSVD(FFALoRA):
    """FedSVD: FFA-LoRA clients; the server re-factors B̄·A by SVD into a new orthonormal A."""

    name = "fedsvd"
    averages = False  # its server step does more than average (see the module docstring)
    paper = "Lee et al., NeurIPS 2025, arXiv 2505.12805"
    supports_chains = False  # its server re-orients A itself (compared with chains, not combined)
    # A rank-r_k client would train in the first r_k rows of A; they change every round, and
    # the clients' zero-padded B columns beyond r_k would shrink the global B: not supported.
    supports_client_ranks = False

    def communicated(self, key: str) -> bool:
        return True  # A goes down (it changes every round); it is never trained, so never up

    def aggregate(self, glob: GlobalState, updates: list[Update], round: int) -> GlobalState:
        return refactored(super().aggregate(glob, updates, round))

    def download(self, glob: GlobalState, client: int) -> State:
        state = super().download(glob, client)
        for a, b in keys.lora_modules(state).values():
            if not state[b].any():  # never re-factored: A is still the seed's
                del state[a]
        return state


def refactored(glob: GlobalState) -> GlobalState:
    """Every LoRA layer's (A, B) replaced by `lowrank.orthonormal_refactor(A, B)`; layers whose
    B is zero (B·A = 0: no direction to turn to) keep their A."""
    adapter = dict(glob.adapter)
    for a, b in keys.lora_modules(adapter).values():
        if adapter[b].any():
            adapter[a], adapter[b] = lowrank.orthonormal_refactor(adapter[a], adapter[b])
    return glob.with_adapter(adapter)
