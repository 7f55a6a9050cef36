"""FedSA-LoRA (Guo et al., ICLR 2025): A is shared and averaged, B stays with its client.

The paper finds A learns general knowledge and B client-specific knowledge. Clients train A, B
(and the head); only A (and a shared head) is uploaded and averaged; each client keeps its own B
from round to round. The model is personalised: it is evaluated per client on its own data.
"""

from __future__ import annotations

from fedlora.methods import keys
from fedlora.methods.lora import FedIT
from fedlora.methods.registry import register


@register
class FedSALoRA(FedIT):
    """FedSA-LoRA: train A and B; average only A; each client keeps its own B."""

    name = "fedsa"
    averages = True
    paper = "Guo et al., ICLR 2025, arXiv 2410.01463"
    supports_chains = False  # each client keeps its own B: no one link to merge
    always_personalised = True

    def personal(self, key: str) -> bool:
        return keys.is_lora_b(key) or super().personal(key)
