"""MoLE's gated mixture of LoRA experts on every LoRA layer (Wu, Huang & Wei, "Mixture of LoRA
Experts", ICLR 2024, arXiv 2404.13628, §3: the gating function and its balancing loss).

Each LoRA-wrapped linear layer W0 of the PEFT model gets N experts, E_j(x) = s·B_j·A_j·x
(s = α/r, one rank-r LoRA each), and a gate of its own. Per token x of the layer's input:

    z    = Norm([E_1(x); …; E_N(x)])              the experts' outputs, concatenated, normalised
    ε(x) = softmax(G·z / τ)                      G ∈ R^{N × N·d_out} (no bias), temperature τ
    y    = W0·x + Σ_j ε_j(x)·E_j(x)              the layer's output

MoLE flattens a whole block output of fixed length into one gate input; fedlora's sequences vary
in length, so the gate reads one token at a time (the same G for every position). Norm is the
L2 normalisation of the concatenation (the gate sees the experts' relative directions, not their
scale; all-zero experts give z = 0, so a zero-initialised G starts as the uniform mixture 1/N).

The gate-balancing loss (MoLE §3) keeps the gate from collapsing onto one expert:

    L_balance = −log Π_j q_j = −Σ_j log q_j,     q_j = expert j's mean gate weight

Under DP-SGD every loss term must be per example (clipping is per example), so q is averaged
over one example's own real tokens and over the layers — never over the batch (a batch mean
would couple the examples' gradients). It is added as α·L_balance to each example's loss.

Every tensor that trains is owned by an nn.Linear that runs once per forward (A_j, B_j, G), so
the per-example gradients of `fedlora.privacy.dpsgd` are exact: the gradient reaching B_j's
output sums both of E_j's paths, into the mixture and into the gate's input.

State keys (`fedlora.methods.keys`): `<layer>.lora_expert_A.<j>.weight`,
`<layer>.lora_expert_B.<j>.weight` and `<layer>.lora_gate.weight`, beside PEFT's own
`lora_A`/`lora_B`, which the mixture's forward does not use.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora.seeding import derive_seed

LOG_ATTR = "_fedlora_gate_log"


class GateLog:
    """The gate weights ε of one forward pass, per layer, while `recording()` (else nothing is
    kept: evaluation never grows it)."""

    def __init__(self):
        self.weights: list[Tensor] = []
        self.on = False

    @contextmanager
    def recording(self):
        self.weights, self.on = [], True
        try:
            yield self
        finally:
            self.on = False

    def add(self, eps: Tensor) -> None:
        if self.on:
            self.weights.append(eps)

    def balance(self, lengths: list[int]) -> Tensor:
        """−Σ_j log q_ij per example i, q_ij = mean of ε_j over example i's first `lengths[i]`
        tokens (its real ones: batches are right-padded) and over the recorded layers."""
        if not self.weights:
            raise RuntimeError("no gate weights were recorded: run the model inside recording()")
        first = self.weights[0]
        width = first.shape[1]
        n = torch.as_tensor(lengths, device=first.device)
        mask = (torch.arange(width, device=first.device)[None, :] < n[:, None]).to(first.dtype)
        total = sum((eps * mask[..., None]).sum(1) for eps in self.weights)  # (n, N)
        q = total / (mask.sum(1, keepdim=True) * len(self.weights))
        return -q.clamp_min(1e-12).log().sum(-1)


def gate_log(model: nn.Module) -> GateLog:
    log = model.__dict__.get(LOG_ATTR)
    if log is None:
        raise ValueError("this model has no mixture of experts (fedlora.mixture.attach_experts)")
    return log


def expert_a(shape: tuple[int, int], seed: int, layer: int, expert: int) -> Tensor:
    """Expert j's A in LoRA layer `layer`: PEFT's initialisation U(−1/√d_in, 1/√d_in), from the
    run's seed, the layer and j, so every client and the server build the same A_j without a
    byte on the wire (and no two layers or experts share one)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "mole_A", layer, expert))
    bound = 1.0 / math.sqrt(shape[1])
    return (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1).mul(bound).float()


def attach_experts(model: nn.Module, experts: int, rank: int, scaling: float,
                   temperature: float, seed: int) -> nn.Module:
    """Give every PEFT LoRA layer of `model` `experts` LoRA experts (A_j from `seed`, B_j = 0)
    and a zero gate, and make its forward the gated mixture above. All frozen; returns `model`."""
    from peft.tuners.lora import LoraLayer

    log = GateLog()
    model.__dict__[LOG_ATTR] = log
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for index, layer in enumerate(layers):
        d_in, d_out = layer.in_features, layer.out_features
        layer.lora_expert_A = nn.ModuleList(nn.Linear(d_in, rank, bias=False) for _ in range(experts))
        layer.lora_expert_B = nn.ModuleList(nn.Linear(rank, d_out, bias=False) for _ in range(experts))
        layer.lora_gate = nn.Linear(experts * d_out, experts, bias=False)
        with torch.no_grad():
            for j, (a, b) in enumerate(zip(layer.lora_expert_A, layer.lora_expert_B)):
                a.weight.copy_(expert_a(tuple(a.weight.shape), seed, index, j))
                b.weight.zero_()
            layer.lora_gate.weight.zero_()
        for p in [*layer.lora_expert_A.parameters(), *layer.lora_expert_B.parameters(),
                  *layer.lora_gate.parameters()]:
            p.requires_grad_(False)
        # an instance attribute: nn.Module.__call__ runs self.forward, so PEFT's sum of
        # adapters is replaced by the mixture for this layer only
        layer.forward = _MixtureForward(layer, log, scaling, temperature)
    return model


class _MixtureForward:
    """y = W0·x + Σ_j ε_j(x)·E_j(x), ε = softmax(G·Norm([E_1; …; E_N]) / τ), per token."""

    def __init__(self, layer: nn.Module, log: GateLog, scaling: float, temperature: float):
        self.layer, self.log = layer, log
        self.scaling, self.temperature = scaling, temperature

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        layer = self.layer
        result = layer.base_layer(x, *args, **kwargs)
        outs = torch.stack([self.scaling * b(a(x)) for a, b in
                            zip(layer.lora_expert_A, layer.lora_expert_B)], dim=-2)  # (…, N, d)
        eps = gate_weights(layer.lora_gate, outs, self.temperature)  # (…, N)
        self.log.add(eps)
        return result + (eps.unsqueeze(-1) * outs).sum(-2).to(result.dtype)


def gate_weights(gate: nn.Linear, outs: Tensor, temperature: float) -> Tensor:
    """softmax(G·Norm(concat_j E_j) / τ) over the experts; `outs` is (…, N, d_out)."""
    z = F.normalize(outs.flatten(-2), dim=-1)
    return torch.softmax(gate(z) / temperature, dim=-1)


def with_balance(loss, alpha: float):
    """The task's per-example loss plus α·L_balance of each example's own gate weights."""
    def balanced(model, token_ids, labels, idx, pad_id):
        log = gate_log(model)
        with log.recording():
            task = loss(model, token_ids, labels, idx, pad_id)
        if alpha == 0 or not idx:
            return task
        return task + alpha * log.balance([len(token_ids[i]) for i in idx]).to(task.dtype)
    return balanced


MIXTURE_FILE = "mixture.safetensors"


def save_mixture(state: dict[str, Tensor], folder: Path) -> None:
    """A mixture model's tensors by state key (PEFT cannot hold a gate): `folder/mixture.safetensors`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / MIXTURE_FILE))
