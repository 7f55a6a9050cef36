"""GaLore: Adam in a low-rank projection of each weight matrix's gradient (Zhao et al., ICML
2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv 2403.03507,
Algorithm 2).

For a weight W ∈ R^{m×n} with gradient G_t (here: the client's privatised DP gradient, so every
quantity below is post-processing of DP outputs):

* every T steps (and at the first), the projector is refreshed from G_t's SVD G = U S Vᵀ:
  P = U[:, :r] (m×r) if m ≤ n, else Q = V[:, :r] (n×r) — the side with fewer rows;
* R_t = Pᵀ G_t (r×n), or G_t Q (m×r): the gradient in the rank-r subspace;
* Adam on R_t: M_t = β₁M + (1−β₁)R_t, V_t = β₂V + (1−β₂)R_t², N_t = M̂_t / (√V̂_t + ε) with
  bias-corrected M̂, V̂;
* the step is back-projected and scaled: W ← W − η·α·P N_t (or − η·α·N_t Qᵀ).

The moments live in the r-dimensional coordinates and are kept when the projector is refreshed,
as the paper's implementation does. Tensors that are not matrices (biases, and the head, which
is small) get plain Adam with the same β, ε and η. A fresh optimizer each round, like the other
local optimizers: its state never leaves the client.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def projector(grad: Tensor, rank: int) -> tuple[Tensor, bool]:
    """(P, left): the top-`rank` left singular vectors (m×r) of `grad` if m ≤ n (left = True),
    else the top-`rank` right singular vectors (n×r)."""
    m, n = grad.shape
    exact = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()  # no half SVD
    u, _, vh = torch.linalg.svd(exact, full_matrices=False)
    if m <= n:
        return u[:, :rank].to(grad.dtype).contiguous(), True
    return vh[:rank].T.to(grad.dtype).contiguous(), False


def project(grad: Tensor, p: Tensor, left: bool) -> Tensor:
    return p.T @ grad if left else grad @ p


def project_back(n: Tensor, p: Tensor, left: bool) -> Tensor:
    return p @ n if left else n @ p.T


class GaLoreAdam(torch.optim.Optimizer):
    """Adam with GaLore's projection for 2-D parameters (see the module docstring)."""

    def __init__(self, params, lr: float, rank: int, update_every: int, scale: float = 0.25,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if rank < 1 or update_every < 1:
            raise ValueError(f"need rank ≥ 1 and update_every ≥ 1, got {rank}, {update_every}")
        super().__init__(params, dict(lr=lr, rank=rank, update_every=update_every, scale=scale,
                                      betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                t = state["step"] = state.get("step", 0) + 1
                grad, low_rank = p.grad, p.dim() == 2 and min(p.shape) > group["rank"]
                if low_rank:
                    if (t - 1) % group["update_every"] == 0:
                        state["projector"] = projector(grad, group["rank"])
                    grad = project(grad, *state["projector"])
                if "m" not in state:
                    state["m"], state["v"] = torch.zeros_like(grad), torch.zeros_like(grad)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                normalised = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
                if low_rank:
                    normalised = group["scale"] * project_back(normalised, *state["projector"])
                p.add_(normalised, alpha=-group["lr"])
        return None
