"""GaLore with direct weight averaging ("Why Gradient Subspace? Identifying and Mitigating
LoRA's Bottlenecks in Federated Fine-Tuning of Large Language Models", arXiv 2410.23111).

Clients train the full weight matrices of `method.target_modules` (and the head) with GaLore's
projected Adam (`fedlora.optim.galore`: rank `method.rank`, projector refreshed every
`method.galore_update_every` steps from the privatised gradient), under the same per-example
clipping as every method: one example's gradient over all trained weights together has norm
≤ C. They upload Δ_k = W_k − W0 of those matrices and the head; the server averages,
Δ = Σ p_k·Δ_k — FedAvg of the weights, exact. No LoRA factor is used (B stays 0). The bytes are
honest: full-size deltas of the target modules, both ways.
"""

from __future__ import annotations

from fedlora.methods import keys
from fedlora.methods.base import Method
from fedlora.methods.registry import register


@register
class GaLore(Method):
    """GaLore: clients train the target modules' full weights with projected Adam; FedAvg of the deltas."""

    name = "galore"
    averages = True
    paper = "Zhao et al., ICML 2024 (GaLore); direct weight averaging: arXiv 2410.23111"
    lora_pairs = False  # it trains the target modules' full weights, not the LoRA factors

    def trainable(self, key: str, round: int) -> bool:
        return self._target_weight(key) or keys.is_head(key)

    def communicated(self, key: str) -> bool:
        return self.trainable(key, 0)

    def _target_weight(self, key: str) -> bool:
        return keys.is_base(key) and any(key.endswith(f".{t}.base_layer.weight")
                                         for t in self.config.target_modules)

    def local_optimizer(self, params: dict, lr: float, head_lr: float = 0.0):
        from fedlora.optim.build import param_groups
        from fedlora.optim.galore import GaLoreAdam

        c = self.config
        return GaLoreAdam(param_groups(params, lr, head_lr), lr=lr, rank=c.rank,
                          update_every=c.galore_update_every, scale=c.galore_scale)
