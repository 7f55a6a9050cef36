"""Local optimizers beyond torch's: LoRA-Pro and LoRA-RITE (a LoRA layer is a pair of factors),
and GaLore's projected Adam (`galore`, for `method.name = "galore"`).

All act on the gradient a client's DP-SGD step has already privatised (`.grad` holds
(Σ clip(g_i) + noise)/(q·n)): post-processing, so ε is unchanged, and neither ever sees an
example. Like Adam in fedlora, a new optimizer is built for every client round, so its state
(moments, preconditioners, bases) is per client and starts empty each round: nothing of it
leaves the client or survives to the next round.
"""

from fedlora.optim.pairs import LoRALayer, lora_layers
from fedlora.optim.build import build_optimizer

__all__ = ["LoRALayer", "build_optimizer", "lora_layers"]
