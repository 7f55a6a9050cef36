"""FFA-LoRA (Sun et al., ICLR 2024): A is drawn from a seed every client shares and frozen.

Clients train only B (zero-initialised) and the head. Because A is the same everywhere,
the server's average is exact: mean_k(B_k)·A = mean_k(B_k·A). DP noise enters B linearly
(no noise × noise product), and only B and the head cross the wire (about half of LoRA's bytes).
"""

from fedlora.methods import keys
from fedlora.methods.base import Method
from fedlora.methods.registry import register


@register
class FFALoRA(Method):
    """FFA-LoRA: A frozen from a shared seed; train and average only B and the head."""

    name = "ffa"
    averages = True
    paper = "Sun et al., ICLR 2024, arXiv 2403.12313"
    supports_chains = True  # every link's A is drawn from A_0 by each client: exact, nothing sent
    # A rank-r_k client uses the first r_k rows of the shared A (and r_k columns of B): with A
    # the same everywhere, the zero-padded average Σ p_k·B_k·A[:r_k] stays exact.
    supports_client_ranks = True

    def trainable(self, key: str, round: int) -> bool:
        return not keys.is_lora_a(key) and not keys.is_base(key)

    def communicated(self, key: str) -> bool:
        # Every client rebuilds the same A from the shared seed: it never needs sending.
        return not keys.is_lora_a(key)
