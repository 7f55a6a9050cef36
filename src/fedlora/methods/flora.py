"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters, merge, restart from a fresh LoRA.

Server, per LoRA layer: A* = [p_1·A_1; …; p_K·A_K], B* = [B_1 … B_K], so that
B*·A* = Σ_k p_k·B_k·A_k exactly, whatever each client's rank r_k; W0 += s·B*·A* (s = α/r_max).
Every round starts from a fresh LoRA: B = 0 and the A every client rebuilds from the shared seed,
so only the head and the merged base change travel down (the base change is full-size).
"""

from __future__ import annotations

from dataclasses import replace

from fedlora.methods import keys, lowrank
from fedlora.methods.base import GlobalState, State, Update
from fedlora.methods.lora import FedIT
from fedlora.methods.registry import register


@register
class FLoRA(FedIT):
    """FLoRA: stack the clients' A (scaled) and B, merge B*·A* into W0, restart LoRA each round."""

    name = "flora"
    averages = False  # its server step does more than average (see the module docstring)
    needs_each_upload = "FLoRA's server stacks each site's A_k and B_k side by side"
    paper = "Wang et al., NeurIPS 2024, arXiv 2409.05976"
    supports_chains = False  # it is a chain of one-round links already
    supports_client_ranks = True

    def download(self, glob: GlobalState, client: int) -> State:
        # A and B restart from the initial (seeded) LoRA every round: nothing to send for them.
        return {k: v for k, v in glob.tensors().items() if not (keys.is_lora_a(k) or keys.is_lora_b(k))}

    def aggregate(self, glob: GlobalState, updates: list[Update], round: int) -> GlobalState:
        if not updates:
            return glob
        weights = self.data_weights(updates)
        modules = keys.lora_modules(updates[0].state)
        base = dict(glob.base_delta)
        for prefix, (a, b) in modules.items():
            A, B = lowrank.stack([u.state[a] for u in updates], [u.state[b] for u in updates], weights)
            key = keys.base_of(prefix)
            merged = self.scaling * (B @ A)
            old = base.get(key)
            base[key] = (merged if old is None else old.double() + merged).to(updates[0].state[a].dtype)
        handled = {k for pair in modules.values() for k in pair}
        # the adapter's A and B stay the fresh ones; the head is averaged
        return self.average_rest(replace(glob, base_delta=base), updates, handled)
