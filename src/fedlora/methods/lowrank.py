"""Shared low-rank math for the aggregation rules: rank slicing and padding, stacking, SVD.

LoRA's update of a layer is ΔW = s·B·A with A: r×d_in, B: d_out×r, s = α/r. The rank is
dimension 0 of A and dimension 1 of B. All functions are pure and work in float64 inside.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.methods import keys

State = dict[str, Tensor]


def rank_dim(key: str) -> int | None:
    """The dimension that indexes the rank in tensor `key` (None for non-LoRA tensors)."""
    if keys.is_lora_a(key):
        return 0
    if keys.is_lora_b(key):
        return 1
    return None


def slice_to_rank(state: State, rank: int) -> State:
    """Keep the first `rank` rows of every A and columns of every B (a rank-r LoRA's factors)."""
    out = {}
    for key, value in state.items():
        dim = rank_dim(key)
        out[key] = value if dim is None or value.shape[dim] <= rank else value.narrow(dim, 0, rank)
    return out


def pad_to_rank(state: State, rank: int) -> State:
    """Zero-pad every A (rows) and B (columns) to `rank`: the padded product B·A is unchanged."""
    out = {}
    for key, value in state.items():
        dim = rank_dim(key)
        if dim is None or value.shape[dim] >= rank:
            out[key] = value
            continue
        shape = list(value.shape)
        shape[dim] = rank - value.shape[dim]
        out[key] = torch.cat([value, value.new_zeros(shape)], dim=dim)
    return out


def pad_like(states: list[State], reference: State) -> list[State]:
    """Zero-pad every client's factors to the rank of the same tensor in `reference` (the
    global state), or to the largest rank among `states` for keys `reference` lacks."""
    ranks: dict[str, int] = {}
    for state in states:
        for key, value in state.items():
            dim = rank_dim(key)
            if dim is not None:
                ref = reference.get(key)
                ranks[key] = ref.shape[dim] if ref is not None else max(ranks.get(key, 0),
                                                                          value.shape[dim])
    return [{k: pad_to_rank({k: v}, ranks[k])[k] if k in ranks else v for k, v in s.items()}
            for s in states]


def zero_beyond_rank(state: State, rank: int) -> State:
    """Rows ≥ `rank` of A and columns ≥ `rank` of B set to zero (shapes kept)."""
    return pad_to_rank(slice_to_rank(state, rank), max([rank, *_ranks(state)]))


def zero_beyond_rank_(tensors: dict[str, Tensor], rank: int) -> None:
    """In place: rows ≥ `rank` of A, columns ≥ `rank` of B become zero (parameters or grads)."""
    with torch.no_grad():
        for key, t in tensors.items():
            dim = rank_dim(key)
            if t is not None and dim is not None and t.shape[dim] > rank:
                t.narrow(dim, rank, t.shape[dim] - rank).zero_()


def _ranks(state: State) -> list[int]:
    return [v.shape[rank_dim(k)] for k, v in state.items() if rank_dim(k) is not None]


def weighted_product(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> Tensor:
    """Σ_k p_k·B_k·A_k with p_k = w_k/Σw (float64); A_k and B_k may have different ranks."""
    total = float(sum(weights))
    out = None
    for A, B, w in zip(As, Bs, weights):
        term = (w / total) * (B.double() @ A.double())
        out = term if out is None else out + term
    return out


def stack(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: A* = [p_1·A_1; …; p_K·A_K] (rows), B* = [B_1 … B_K] (columns).

    B*·A* = Σ_k p_k·B_k·A_k exactly, whatever the ranks r_k; A* has Σ r_k rows.
    """
    total = float(sum(weights))
    A = torch.cat([(w / total) * a.double() for a, w in zip(As, weights)], dim=0)
    B = torch.cat([b.double() for b in Bs], dim=1)
    return A, B


def svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD: B = U_r·S_r^½, A = S_r^½·V_rᵀ, so B·A is the best rank-r approximation
    of `delta` in Frobenius norm (Eckart–Young); B[:, :k]·A[:k] is the best rank-k one for k ≤ r."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    B = U[:, :k] * root
    A = root[:, None] * Vh[:k]
    if k < rank:  # fewer singular values than the rank: pad with zero directions
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    return A, B


def orthonormal_refactor(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """(A', B') with B'·A' = B·A, A'·A'ᵀ = I_r, and B' = U_r·S_r (FedSVD's re-factoring).

    B·A = U·S·Vᵀ is an SVD of a rank-≤ r product; A' = V_rᵀ, B' = U_r·S_r. Computed from two
    thin QR factorisations instead of the dense d_out × d_in SVD (cost O((d_in + d_out)·r²)):
    B = Q_B·R_B and Aᵀ = Q_A·R_A give B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, and the SVD of the r × r core
    R_B·R_Aᵀ = U_c·S·V_cᵀ yields U = Q_B·U_c and V = Q_A·V_c. A′'s rows lie in A's row space,
    also for directions whose singular value is 0. In float64; returned in A's and B's dtypes.
    """
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)
    new_a = (qa @ vch.T).T
    new_b = (qb @ uc) * s
    return new_a.to(A.dtype), new_b.to(B.dtype)
