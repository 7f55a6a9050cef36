"""LoRA-Pro (Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", arXiv 2407.18242).

One LoRA step moves W = W0 + s·B·A (to first order) by −η·g̃, the *equivalent gradient*

    g̃ = s·(B·g_A + g_B·A)                                             (paper §2, Def. of g̃)

LoRA-Pro replaces (g_A, g_B) by the pair whose g̃ best approximates the full gradient G,
min ‖s·(B·g_A + g_B·A) − G‖_F. Knowing only the LoRA gradients g_A = s·Bᵀ·G and
g_B = s·G·Aᵀ, the optimum is (paper §2, closed-form theorem; X ∈ ℝ^{r×r} free)

    g_A = (1/s²)·(BᵀB)⁻¹·g_A + X·A
    g_B = (1/s²)·[I − B(BᵀB)⁻¹Bᵀ]·g_B·(AAᵀ)⁻¹ − B·X

and every X gives the same g̃ = P_B·G + (I − P_B)·G·P_A — the orthogonal projection of G on
the matrices a LoRA step can reach (P_B = B(BᵀB)⁻¹Bᵀ, P_A = Aᵀ(AAᵀ)⁻¹A). X is chosen to keep
the adjusted gradients closest to the plain ones, min ‖g_A' − g_A‖² + ‖g_B' − g_B‖², which is
the Sylvester equation (paper §2, theorem on the optimal X)

    BᵀB·X + X·AAᵀ = −(1/s²)·(BᵀB)⁻¹·g_A·Aᵀ

solved here through the eigendecompositions of the two symmetric r×r Gram matrices.
(The section's equation numbers could not be checked against the paper's PDF from here; the
formulas were checked against the authors' code and, in the tests, against a direct
least-squares solve over the vectorised unknowns.)

One factor frozen, the problem has one unknown and no X:
  A frozen (FFA-LoRA, FedSVD, RoLoRA's even rounds): g_B ← (1/s²)·g_B·(AAᵀ)⁻¹, a fixed linear
  map of g_B (g̃ = G·P_A); FFA's exact aggregation is untouched (A is still the same everywhere).
  B frozen (RoLoRA's odd rounds): g_A ← (1/s²)·(BᵀB)⁻¹·g_A.

Adam: the paper's Adam variant (its algorithm "LoRA-Pro with Adam", as in the authors' code):
Adam's moments are kept for the full-size equivalent gradient g̃ (d_out×d_in per layer, the
price of the method: two full-size tensors per layer), the Adam direction D = m̂/(√v̂ + ε) is
mapped back to LoRA gradients (s·Bᵀ·D, s·D·Aᵀ), adjusted by the closed form above with the
optimal X, and the factors take a plain step A ← A − η·g_A', B ← B − η·g_B'. Both passes act on
the privatised gradient only. Under DP the privatised (g_A, g_B) need not come from one G (the
noise in each is independent); the first pass applies the closed form to them as they are —
g̃ does not depend on X, so the Sylvester step, whose right-hand side assumes one G, is only
used in the second pass, where (s·Bᵀ·D, s·D·Aᵀ) do come from one matrix D.

Inverses: (BᵀB)⁻¹ and (AAᵀ)⁻¹ are pseudo-inverses of the r×r Gram matrices in float64,
eigenvalues below 1e-8·λ_max counted as zero (`pairs.gram_pinv`). B starts at zero, where BᵀB
is singular: there (BᵀB)⁺ = 0, so the first step is exactly the paper's first step —
g_B' = (1/s²)·g_B·(AAᵀ)⁻¹ and A does not move (its true gradient s·Bᵀ·G is 0) — and a
rank-deficient B still gives the exact projection. State (step count, the two full-size
moments per layer) lives in this optimizer, which fedlora builds anew each client round.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.optim.pairs import LoRALayer, LoRAOptimizer, gram_pinv, grad_of


def sylvester(p: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """X with P·X + X·Q = C for symmetric PSD P, Q: in their eigenbases the equation is
    entrywise, X̃_ij = C̃_ij / (λ_i + μ_j); where λ_i + μ_j = 0, C̃_ij is 0 too here (a zero B
    and a zero A direction both) and X̃_ij is set to 0."""
    lam, u = torch.linalg.eigh((p + p.T) / 2)
    mu, v = torch.linalg.eigh((q + q.T) / 2)
    denom = lam.clamp(min=0)[:, None] + mu.clamp(min=0)[None, :]
    ct = u.T @ c @ v
    xt = torch.where(denom > 0, ct / denom.clamp(min=torch.finfo(denom.dtype).tiny),
                     torch.zeros_like(ct))
    return u @ xt @ v.T


def adjusted(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, s: float, train_a: bool = True,
             train_b: bool = True, optimal_x: bool = True) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted (g_A, g_B) from the LoRA gradients (module docstring); a frozen
    factor's adjusted gradient is zero. `optimal_x=False` takes X = 0 (same g̃). float64 inside,
    returned in the factors' dtype."""
    a, b, ga, gb = A.double(), B.double(), gA.double(), gB.double()
    k = 1.0 / s ** 2
    if not train_a:
        out_a, out_b = torch.zeros_like(ga), k * gb @ gram_pinv(a @ a.T)
    elif not train_b:
        out_a, out_b = k * gram_pinv(b.T @ b) @ ga, torch.zeros_like(gb)
    else:
        btb, aat = b.T @ b, a @ a.T
        btb_inv, aat_inv = gram_pinv(btb), gram_pinv(aat)
        out_a = k * btb_inv @ ga
        out_b = k * (gb - b @ (btb_inv @ (b.T @ gb))) @ aat_inv
        if optimal_x:
            x = sylvester(btb, aat, -k * btb_inv @ ga @ a.T)
            out_a, out_b = out_a + x @ a, out_b - b @ x
    return out_a.to(A.dtype), out_b.to(B.dtype)


def equivalent_gradient(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, s: float) -> Tensor:
    """g̃ = s·(B·g_A + g_B·A): the full-weight gradient step a LoRA step amounts to."""
    return s * (B @ gA + gB @ A)


class LoRAPro(LoRAOptimizer):
    """LoRA-Pro with Adam on the equivalent gradient (module docstring); other tensors: Adam."""

    def _layer_step(self, layer: LoRALayer, state: dict) -> None:
        A, B, s = layer.A, layer.B, layer.scaling
        ta, tb = layer.train_a, layer.train_b
        ga, gb = adjusted(A, B, grad_of(A, ta), grad_of(B, tb), s, ta, tb, optimal_x=False)
        g = equivalent_gradient(A, B, ga, gb, s)
        if not state:
            state.update(step=0, m=torch.zeros_like(g), v=torch.zeros_like(g))
        beta1, beta2 = self.betas
        state["step"] += 1
        t = state["step"]
        state["m"].mul_(beta1).add_(g, alpha=1 - beta1)
        state["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        direction = (state["m"] / (1 - beta1 ** t)) / (
            (state["v"] / (1 - beta2 ** t)).sqrt() + self.eps)
        step_a, step_b = adjusted(A, B, s * B.T @ direction, s * direction @ A.T, s, ta, tb)
        if ta:
            A.sub_(self.lr * step_a)
        if tb:
            B.sub_(self.lr * step_b)
