"""MoLE, federated and personalised: one LoRA expert per client, a gate per client that mixes them
(Wu, Huang & Wei, "Mixture of LoRA Experts", ICLR 2024, arXiv 2404.13628; the model is
`fedlora.mixture`).

MoLE composes LoRAs trained on different data with a learned per-layer gate. In a federation the
clients' data are those different sources, so each client k owns expert k:

* expert k is an FFA-style LoRA: A_k drawn from the run's seed (every party builds it, it never
  crosses the wire), B_k trained by client k alone under DP-SGD. With one owner per expert there
  is nothing to average (the server's copy of B_k is client k's last upload), so LoRA's inexact
  mean(B)·mean(A) problem does not arise; FFA-style halves the bytes, keeps DP noise linear in
  the update, and the experts' distinct A_k span N·r directions between them, not one r-subspace.
* every client receives every expert's B each round and uses the others frozen;
* each client's gate G (every layer) is personal: it reads the client's data, trains in the same
  DP-SGD step as B_k and the head (one per-example gradient over all of them, clipped together,
  so ε is accounted exactly as for any method) and never leaves the client;
* the head is shared (FedAvg) unless `method.head = "local"`.

The model is personalised (experts shared, gate own): each client is evaluated on its own
held-out data, as for FedSA-LoRA. Before its first round a client's gate is zero: the uniform
mixture 1/N. Bytes: each client uploads its B_k (and the head); downloads are all N B's.
"""

from __future__ import annotations

from fedlora.methods import keys
from fedlora.methods.base import GlobalState, Method, Update
from fedlora.methods.registry import register


@register
class MoLE(Method):
    """MoLE: each client owns one FFA-style LoRA expert; a personal gate per client mixes all experts."""

    name = "mole"
    paper = "Wu, Huang & Wei, ICLR 2024 (MoLE), arXiv 2404.13628"
    always_personalised = True
    supports_chains = False  # N experts and a gate are not one LoRA to merge
    averages = False  # each expert is replaced by its owner's upload, not averaged
    needs_each_upload = ("MoLE's server keeps each site's expert B_k as that site sent it "
                         "(each site uploads a different tensor: its own expert)")
    lora_pairs = False  # N experts per layer, not one (A, B) pair
    peft_export = False  # the gate has no PEFT form: exported as `mixture.safetensors`

    def trainable(self, key: str, round: int) -> bool:
        # what some client trains: an expert's B (its owner's), a gate (every client its own), the head
        return keys.is_expert_b(key) or keys.is_gate(key) or keys.is_head(key)

    def client_trains(self, key: str, round: int, client: int) -> bool:
        if keys.is_expert_b(key):
            return keys.expert_of(key) == client  # other clients' experts are frozen here
        return self.trainable(key, round)

    def communicated(self, key: str) -> bool:
        # A_j comes from the seed; PEFT's own (unused) lora_A/lora_B never move
        return keys.is_expert_b(key) or keys.is_head(key)

    def personal(self, key: str) -> bool:
        return keys.is_gate(key) or super().personal(key)

    def extend_model(self, model, config) -> None:
        from fedlora.mixture import attach_experts

        m = config.method
        attach_experts(model, config.federation.clients, m.rank, self.scaling,
                       m.mole_temperature, config.seed)

    def example_loss(self, loss):
        from fedlora.mixture import with_balance

        return with_balance(loss, self.config.mole_balance)

    def aggregate(self, glob: GlobalState, updates: list[Update], round: int) -> GlobalState:
        """B_k ← client k's upload (each expert has one owner); the head: FedAvg."""
        if not updates:
            return glob
        experts = {k: v for u in updates for k, v in u.state.items() if keys.is_expert_b(k)}
        return self.average_rest(glob.updated(experts), updates, set(experts))
