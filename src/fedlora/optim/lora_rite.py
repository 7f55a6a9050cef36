"""LoRA-RITE (Yen et al., "LoRA Done RITE: Robust Invariant Transformation Equilibration for
LoRA Optimization", arXiv 2410.20625, Algorithm 1).

Write the layer as ΔW = s·B·A and each factor with its rank last: F_B = B (d_out×r) and
F_A = Aᵀ (d_in×r). The update of one factor F uses the other factor O through its QR
decomposition O = U·R (U orthonormal d×r, R r×r):

    ḡ   = g_F·R⁻¹                     unmagnified gradient: the gradient in U's basis, blind to
                                      how ΔW is split between the factors
    P   = Uᵀ·U_prev                   basis change of the other factor since the last step
    V   = β₂·P·V·Pᵀ + (1−β₂)·ḡᵀḡ/n    second moment (r×r), carried into the new basis
    ρ   = β₂·(ρ + d_λ(V_prev, P·V_prev·Pᵀ))   escaped mass: what the projection lost
    S̄   = ḡ·(V + ρ·I)^{-1/2}          preconditioned (ε added to each √eigenvalue)
    M   = β₁·M·Pᵀ + (1−β₁)·S̄          first moment, carried into the new basis
    F  ← F − η·M·R⁻ᵀ                  magnitude restored

with g_F the privatised gradient (g_B, or g_Aᵀ) and both factors' steps computed from the
factors before either moves. Because ḡ, V, S̄ and M change only by an orthogonal Q when B·A is
refactored as (B·T)(T⁻¹·A), and the step F ← F − η·M·R⁻ᵀ carries T back, two factorisations of
one product take the same step of the product — the paper's transformation invariance.

Choices the paper leaves open, taken from the authors' reference implementation:
β's with Adam's bias correction (as bias-corrected decays β_t = β·(1−β^{t−1})/(1−β^t), so the
first step uses the current gradient alone); ḡᵀḡ divided by the factor's row count n, which
puts η on Adam's scale (a scalar: invariance is unaffected); d_λ(X, Y) = max(0, min(max_i
(λ_i(X) − λ_i(Y)), tr X − tr Y)) with eigenvalues in ascending order; R⁻¹ a pseudo-inverse, so
at B = 0 (R = 0) A does not move. Not taken: the reference's extra clipping and skipping of
large unmagnified gradients (not in Algorithm 1; under DP every example is clipped already).

One factor frozen (FFA-LoRA, FedSVD, RoLoRA): the other's U and R never change, so P = I and
ρ = 0: B takes B ← B − η·M·R_A⁻ᵀ with ḡ = g_B·R_A⁻¹ = s·G·U_A — Adam with a full r×r
second-moment matrix (one-sided, on B's coordinates in A's fixed orthonormal row basis)
instead of Adam's per-entry one. State lives in this optimizer, built anew each client round.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.optim.pairs import LoRALayer, LoRAOptimizer, grad_of


def bias_corrected(beta: float, t: int) -> float:
    """β_t = β·(1−β^{t−1})/(1−β^t): an EMA with this decay equals Adam's bias-corrected one."""
    return beta * (1 - beta ** (t - 1)) / (1 - beta ** t)


def basis(other: Tensor) -> tuple[Tensor, Tensor]:
    """U (orthonormal columns) and R⁺ (pseudo-inverse of R) of other = U·R."""
    u, r = torch.linalg.qr(other)
    return u, torch.linalg.pinv(r)


def inverse_sqrt(v: Tensor, rho: float, eps: float) -> Tensor:
    """(V + ρI)^{-1/2} with ε added to each square root (V symmetric PSD)."""
    w, q = torch.linalg.eigh((v + v.T) / 2)
    return (q / ((w.clamp(min=0) + rho).sqrt() + eps)) @ q.T


def escaped_mass(old: Tensor, rotated: Tensor) -> float:
    """d_λ: how much of the second moment the change of basis dropped (≥ 0)."""
    drop = (torch.linalg.eigvalsh(old) - torch.linalg.eigvalsh(rotated)).max()
    return max(0.0, min(float(drop), float(torch.trace(old) - torch.trace(rotated))))


class LoRARITE(LoRAOptimizer):
    """LoRA-RITE's invariant preconditioner (Algorithm 1) for each factor; other tensors: Adam."""

    def __init__(self, layers, others, lr: float, betas=(0.9, 0.999), eps: float = 1e-6,
                 others_lr: float | None = None):
        super().__init__(layers, others, lr, betas, eps, others_lr)

    def _layer_step(self, layer: LoRALayer, state: dict) -> None:
        A, B = layer.A, layer.B
        steps = []
        if layer.train_b:  # F = B, the other factor Aᵀ
            steps.append((B, lambda d: d, self._factor_step(state.setdefault("B", {}),
                                                            grad_of(B, True), A.T)))
        if layer.train_a:  # F = Aᵀ, the other factor B
            steps.append((A, lambda d: d.T, self._factor_step(state.setdefault("A", {}),
                                                              grad_of(A, True).T, B)))
        for p, back, delta in steps:  # both computed from the factors before either moved
            p.add_(back(delta))

    def _factor_step(self, st: dict, g: Tensor, other: Tensor) -> Tensor:
        """−η·M·R⁻ᵀ for one factor with rank last; `g` its gradient, `other` the other
        factor with rank last."""
        beta1, beta2 = self.betas
        u, r_inv = basis(other)
        if not st:
            r = g.shape[1]
            st.update(t=0, v=g.new_zeros(r, r), m=torch.zeros_like(g),
                      u=torch.zeros_like(u), rho=0.0)
        st["t"] += 1
        b1, b2 = bias_corrected(beta1, st["t"]), bias_corrected(beta2, st["t"])
        g_bar = g @ r_inv
        p = u.T @ st["u"]
        rotated = p @ st["v"] @ p.T
        rotated = (rotated + rotated.T) / 2
        st["rho"] = b2 * (st["rho"] + escaped_mass(st["v"], rotated))
        st["v"] = b2 * rotated + (1 - b2) * (g_bar.T @ g_bar) / g.shape[0]
        s_bar = g_bar @ inverse_sqrt(st["v"], st["rho"], self.eps)
        st["m"] = b1 * st["m"] @ p.T + (1 - b1) * s_bar
        st["u"] = u
        return -self.lr * st["m"] @ r_inv.T
