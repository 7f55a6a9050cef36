"""The honest baseline: a private linear probe — only the task head is trained and averaged.

No adapter moves: every LoRA B stays at zero (so the encoder is the pre-trained one) and no A or
B crosses the wire. Clients run the same DP-SGD on the head alone and the server takes FedAvg of
the heads, h = Σ p_k·h_k. Whatever an adapter method scores above this, at the same ε and budget,
is what training the encoder bought.
"""

from fedlora.methods import keys
from fedlora.methods.base import Method
from fedlora.methods.registry import register


@register
class HeadOnly(Method):
    """Head only (private linear probe): no adapter; train and average only the task head."""

    name = "head"
    averages = True
    paper = "the linear-probe baseline (no adapter); FedAvg of the head"
    trains_adapter = False
    lora_pairs = False  # no adapter is trained

    def trainable(self, key: str, round: int) -> bool:
        return keys.is_head(key)

    def communicated(self, key: str) -> bool:
        return keys.is_head(key)
