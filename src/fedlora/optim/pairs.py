"""What a LoRA-aware optimizer is told about each layer, and the one base class both share.

A layer is its two factors as PEFT holds them, A (r×d_in) and B (d_out×r), the scaling s of
ΔW = s·B·A (α/r), and which of the two the client trains this round: both (FedIT and its
kin), only B (A frozen: FFA-LoRA, FedSVD, RoLoRA's even rounds) or only A (RoLoRA's odd
rounds). Every other trainable tensor (the task head) gets plain Adam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedlora.methods import keys


@dataclass(frozen=True)
class LoRALayer:
    """One LoRA layer: ΔW = scaling·B·A, A (r×d_in), B (d_out×r)."""

    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    train_a: bool
    train_b: bool


def lora_layers(params: dict[str, nn.Parameter], trainable: set[str],
                scaling: float) -> list[LoRALayer]:
    """Every LoRA layer of `params` (state key → parameter) with at least one trained factor:
    `…lora_A.weight` paired with the `…lora_B.weight` of the same module prefix."""
    out = []
    for a, b in keys.lora_modules(params).values():
        if a in trainable or b in trainable:
            out.append(LoRALayer(params[a], params[b], scaling, a in trainable, b in trainable))
    return out


class LoRAOptimizer(torch.optim.Optimizer):
    """Steps each LoRA layer with `_layer_step` and every other parameter with Adam (at
    `others_lr`, default `lr`).

    Subclasses implement `_layer_step(layer, state)`; `state` is the layer's own dict, empty
    at the first step. `param_groups` holds every parameter, so `zero_grad` clears them all.
    """

    def __init__(self, layers: list[LoRALayer], others: list[Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 others_lr: float | None = None):
        factors = [p for layer in layers for p, on in ((layer.A, layer.train_a),
                                                       (layer.B, layer.train_b)) if on]
        super().__init__([{"params": factors + list(others)}],
                         {"lr": lr, "betas": betas, "eps": eps})
        self.layers = layers
        self.lr, self.betas, self.eps = lr, betas, eps
        self.rest = (torch.optim.Adam(others, lr=others_lr or lr, betas=betas, eps=eps)
                     if others else None)
        self._layer_state: list[dict] = [{} for _ in layers]

    @torch.no_grad()
    def step(self, closure=None):
        for layer, state in zip(self.layers, self._layer_state):
            self._layer_step(layer, state)
        if self.rest is not None:
            self.rest.step()
        return None

    def _layer_step(self, layer: LoRALayer, state: dict) -> None:  # pragma: no cover
        raise NotImplementedError


def grad_of(p: Tensor, on: bool) -> Tensor:
    """The privatised gradient of a trained factor (zero if the step left none); zero for a
    frozen one."""
    if on and p.grad is not None:
        return p.grad.detach()
    return torch.zeros_like(p)


def gram_pinv(m: Tensor, rtol: float = 1e-8) -> Tensor:
    """Moore–Penrose pseudo-inverse of a symmetric PSD r×r Gram matrix (BᵀB or A·Aᵀ), in
    float64: eigenvalues below rtol·λ_max count as zero. At B = 0 it is 0, not a division by
    zero, and for a rank-deficient factor B·(BᵀB)⁺·Bᵀ is still the orthogonal projector on
    B's column space."""
    m = m.double()
    m = (m + m.T) / 2
    w, v = torch.linalg.eigh(m)
    cut = rtol * float(w.max().clamp(min=0))
    inv = torch.where(w > cut, 1.0 / w.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))
    inv = torch.where(w > 0, inv, torch.zeros_like(w))
    return (v * inv) @ v.T
