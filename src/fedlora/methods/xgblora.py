"""XGBLoRA (Zhang et al., "Less is More: Extreme Gradient Boost Rank-1 Adaption for Efficient
Finetuning of LLMs", arXiv 2410.19694), federated: boosting with rank-1 LoRA boosters.

Gradient boosting fits a sequence of weak learners, each to what the sum of the previous ones
left unexplained, and adds it to the model. XGBLoRA's weak learner is a rank-1 LoRA: booster t
is a pair (a_t ∈ R^{1×d_in}, b_t ∈ R^{d_out×1}) trained on the current model, then merged,

    W_t = W_{t-1} + s·b_t·a_t          (s = α/r, r = 1),

and booster t+1 starts fresh (b = 0, a new a). After T boosters W_T = W0 + Σ_t s·b_t·a_t has rank
up to T while every step trains and sends only rank-1 factors — the "less is more" of the title.
As in the paper each booster trains both of its factors (LoRA, not FFA-LoRA: for the exact FFA
variant use `method.name=ffa method.rank=1 method.chain_every=1`).

Federated, a booster lives `method.chain_every` rounds (0, the default, means one round: a new
booster every round). Inside a booster the clients train as FedIT does and the server averages
a and b (`fedlora.methods.lora`); at the booster's end every client and the server merge it
(`fedlora.methods.chain`, whose links are exactly the merged boosters). Nothing else is sent:
bytes are those of a rank-1 LoRA plus the merged boosters' factors.

Random layer selection. The paper adapts a random subset of the layers in each booster (fewer
trained weights per step). Here each LoRA layer joins booster t with probability
`method.boost_fraction`, by a coin that is a public function of the layer's name and t
(SHA-256), so every site and the server agree on the subset without a message; a layer outside
the subset keeps b = 0 and is neither trained nor sent in that booster. (The paper fixes the
number of layers, κ; a per-layer coin keeps the choice a function of one layer's name.) With the
default 1.0 every layer is in every booster. The subset is the same in every run (it does not
depend on the seed); it depends on no data, so it costs no ε.
"""

from __future__ import annotations

import hashlib

from fedlora.methods import chain, keys
from fedlora.methods.base import GlobalState
from fedlora.methods.lora import FedIT
from fedlora.methods.registry import register


def in_booster(layer: str, booster: int, fraction: float) -> bool:
    """Does LoRA layer `layer` (its module prefix) take part in booster `booster`?

    u = SHA-256("fedlora/xgblora/<booster>/<layer>") read as a number in [0, 1); in iff u < p."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"fedlora/xgblora/{booster}/{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@register
class XGBLoRA(FedIT):
    """XGBLoRA: boosting with rank-1 LoRA boosters, each merged before the next starts."""

    name = "xgblora"
    paper = "Zhang et al. 2024, arXiv 2410.19694"
    always_chained = True
    fixed_rank = 1
    # a merge is not a step of the adapter: no server optimizer (config.py refuses it)
    averages = False

    def booster(self, round: int) -> int:
        """The booster trained in round `round` (0-based)."""
        return round // self.chain_period

    def trainable(self, key: str, round: int) -> bool:
        if keys.is_lora_a(key) or keys.is_lora_b(key):
            layer = key.split(".lora_A." if keys.is_lora_a(key) else ".lora_B.")[0]
            return in_booster(layer, self.booster(round), self.config.boost_fraction)
        return super().trainable(key, round)

    def end_round(self, glob: GlobalState, round: int) -> GlobalState:
        """The chain's merge; then a booster's layers that sat out (b = 0, nothing learnt) are
        dropped from the merged links, so they are never sent. Link 0 is kept whole: every later
        booster's fresh a is drawn from it (`chain.fresh_a`)."""
        glob = super().end_round(glob, round)
        idle = {k for k, b in glob.links.items()
                if keys.is_lora_b(k) and chain.unlink(k)[0] > 0 and not b.any()}
        idle |= {k.replace(".lora_B.", ".lora_A.") for k in idle}
        if not idle:
            return glob
        return GlobalState(adapter=glob.adapter, base_delta=glob.base_delta,
                           statistics=glob.statistics,
                           links={k: v for k, v in glob.links.items() if k not in idle})
