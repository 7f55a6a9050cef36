"""ResLoRA (Shi et al., ACL Findings 2024, arXiv 2402.18039) with its block shortcut, federated
as FedIT: clients train A, B and the head; the server averages each.

During training every LoRA layer n also adds the blocks of the m previous layers of its kind
to its own (`method.reslora_blocks` = m, the paper's number of previous blocks):

    h_n = W_n x_n + s·(B_n·A_n + Σ_{k=1..m} B_{n−k}·A_{n−k}) x_n,     s = α/r,

so layer n−k's factors get a gradient from layer n's output directly — the paper's shorter
backward path. For inference the paper merges the shortcut away; for this shortcut the merge is
exact (the extra term is a weight), and fedlora exports it as a plain PEFT LoRA of rank (m+1)·r
that computes exactly the training-time model (`fedlora.methods.residual`). The paper's input-
and middle-shortcuts are not built: their merges are approximations (a factor estimated from
activation norms), so their exported model would differ from the one trained and evaluated.

Privacy: layer n−k's lora_A / lora_B run again inside layer n, and their per-example gradients
are the sums over those calls (`fedlora.privacy.dpsgd.mark_reusable`): every trainable tensor is
clipped and noised as under `lora`, and ε is accounted the same way. The wire carries what
FedIT's does (A, B, head at rank r); only the exported adapter has rank (m+1)·r.
"""

from fedlora.methods import keys, residual
from fedlora.methods.base import Method
from fedlora.methods.registry import register


@register
class ResLoRA(Method):
    """ResLoRA (block shortcut): FedIT + previous layers' LoRA blocks in training, merged exactly."""

    name = "reslora"
    averages = True
    paper = "Shi et al., ACL Findings 2024 (ResLoRA), arXiv 2402.18039"
    # LoRA-Pro / LoRA-RITE treat each layer's (A, B) as that layer's alone; here B_n·A_n also
    # enters the next m layers' weights, so their per-layer rules would not mean what they say
    lora_pairs = False

    def trainable(self, key: str, round: int) -> bool:
        return not keys.is_base(key)

    def extend_model(self, model, config) -> None:
        residual.install_paths(model, self.config.reslora_blocks)

    def finish_export(self, folder) -> None:
        residual.write_plain_adapter(folder, self.config.reslora_blocks)
