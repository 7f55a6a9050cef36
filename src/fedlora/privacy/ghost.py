"""DP-SGD's clipped sum without per-example gradients: ghost norms and book-keeping.

For an `nn.Linear` layer y_t = W a_t + b applied at positions t = 1..T of one example, with
output gradients g_t = ∂L/∂y_t (a_t ∈ R^d, g_t ∈ R^p):

    ∂L/∂W = Σ_t g_t a_tᵀ   (p × d),          ∂L/∂b = Σ_t g_t,
    ‖∂L/∂W‖²_F = Σ_{t,s} (a_t·a_s)(g_t·g_s) = ⟨A Aᵀ, G Gᵀ⟩_F   (A: T × d, G: T × p),

so an example's gradient norm needs two T × T Gram matrices, T²(d + p) multiply-adds, instead of
the p × d gradient itself, T·d·p ("ghost clipping", Li et al., "Large Language Models Can Be
Strong Differentially Private Learners", ICLR 2022). Once every example's norm over all trained
parameters is known, so is its clip factor c_i = min(1, C/(‖g_i‖ + 1e-6)), and the clipped sum
needs no per-example gradient either ("book-keeping", Bu et al., "Differentially Private
Optimization on Large Model at Small Cost", ICML 2023):

    Σ_i c_i ∂L_i/∂W = Σ_{i,t} (c_i g_{i,t}) a_{i,t}ᵀ   — one matmul over every position of the batch,

from the activations and output gradients the single backward pass already recorded. Both are
exact: the same quantities as materialising ∂L_i/∂W, summed in another order (float rounding
aside). A layer that runs several times per forward pass (`dpsgd.mark_reusable`) has its calls'
positions concatenated: its per-example gradient is the sum over calls, which is the same sum
over more positions.

An `nn.Embedding` (full fine-tuning trains the word embeddings) is the same with one-hot
inputs: example i's gradient puts Σ_{t: x_t = v} g_t in row v, so

    ‖∂L/∂E‖²_F = Σ_{t,s} [x_t = x_s] (g_t·g_s),        Σ_i c_i ∂L_i/∂E = index_add over (x_{i,t}, c_i g_{i,t}),

T² work per example instead of a V × d gradient (V = 30,522 words: 11.7M numbers per example
for MiniLM). As Opacus's grad sampler, every position counts, padding included (its output
gradient is zero where the loss ignores it).

Which layers take this path (`mode`):
- "off": none; every per-example gradient is materialised with Opacus's grad samplers.
- "on": every `nn.Linear` and `nn.Embedding` that owns a trained parameter.
- "auto": an `nn.Linear` seen at T > 1 positions when T·(d + p) < d·p, i.e. when the Gram
  route costs fewer multiply-adds per example than materialising. LoRA's factors (d or p = r)
  and the classifier head (T = 1) stay materialised; full weights (d = p = 384 in MiniLM,
  T ≤ 64) take the ghost route; an `nn.Embedding` when T < V (the word embeddings; not the
  two-row token-type table).
Other layer types (LayerNorm, ...) are always materialised.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fedlora.privacy.dpsgd import _fp32, _module_grad_samples, _Recorder, clip_factors, record_layers

__all__ = ["MODES", "clipped_sum", "embedding_squared_norms", "ghost_pays", "ghost_squared_norms"]

MODES = ("auto", "on", "off")


def ghost_pays(positions: int, d_in: int, d_out: int) -> bool:
    """True when the Gram route, T·(d + p) multiply-adds per example and position, is cheaper
    than materialising the p × d gradient, d·p per position. With one position (a head on
    pooled features) either route costs d·p per example and materialising is kept: such a
    layer's numbers stay bit for bit those of the materialised path."""
    return positions > 1 and positions * (d_in + d_out) < d_in * d_out


def _positions(rec: _Recorder, n: int, ids: bool = False) -> tuple[Tensor, Tensor] | None:
    """A layer's inputs and output gradients over all its calls, as (n, T, d) and (n, T, p) in
    fp32 — or, for an embedding (`ids`), its token ids as (n, T); None if no call reached the
    loss."""
    acts, grads = [], []
    for activations, backprops in zip(rec.activations, rec.backprops):
        if backprops is None:
            continue
        if backprops.shape[0] != n:
            raise ValueError(
                f"module {rec.name!r}: output batch dimension is {backprops.shape[0]}, but there "
                f"are {n} per-example losses; the batch must be the first dimension everywhere")
        a = activations[0] if ids else _fp32(activations[0])
        acts.append(a.reshape(n, -1) if ids else a.reshape(n, -1, a.shape[-1]))
        grads.append(_fp32(backprops).reshape(n, -1, backprops.shape[-1]))
    if not acts:
        return None
    if len(acts) == 1:  # one call (every layer but a reusable one): no copy
        return acts[0], grads[0]
    return torch.cat(acts, dim=1), torch.cat(grads, dim=1)


def ghost_squared_norms(module: nn.Linear, params: list[tuple[str, nn.Parameter]],
                        a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """‖∂L_i/∂θ‖² for the layer's trained parameters θ from inputs a (n, T, d) and output
    gradients g (n, T, p): ⟨a_i a_iᵀ, g_i g_iᵀ⟩_F for the weight, ‖Σ_t g_{i,t}‖² for the bias."""
    out = {}
    for name, p in params:
        if p is module.weight:
            if a.shape[1] == 1:  # one position: ‖g aᵀ‖² = ‖g‖²‖a‖², no Gram matrix needed
                out[name] = a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
            else:
                out[name] = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
                             ).sum((1, 2)).clamp(min=0)
        elif p is module.bias:
            out[name] = g.sum(1).pow(2).sum(1)
        else:
            raise RuntimeError(f"parameter {name!r} of an nn.Linear is neither its weight nor its bias")
    return out


def embedding_squared_norms(ids: Tensor, g: Tensor) -> Tensor:
    """‖∂L_i/∂E‖² of an embedding table from token ids (n, T) and output gradients g (n, T, d):
    Σ_{t,s} [x_t = x_s] (g_t·g_s)."""
    same = ids[:, :, None] == ids[:, None, :]
    return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2)).clamp(min=0)


def _ghost_sum(module: nn.Module, params, a: Tensor, g: Tensor, factors: Tensor) -> dict[str, Tensor]:
    """Σ_i c_i ∂L_i/∂θ = Σ_{i,t} (c_i g_{i,t}) a_{i,t}ᵀ (weight) and Σ_{i,t} c_i g_{i,t} (bias);
    for an embedding, each c_i g_{i,t} added to the row of token a_{i,t}."""
    cg = (g * factors[:, None, None]).flatten(0, 1)
    out = {}
    for name, p in params:
        if isinstance(module, nn.Embedding):
            total = torch.zeros(p.shape, dtype=cg.dtype, device=cg.device).index_add_(0, a.flatten(), cg)
        else:
            total = cg.T @ a.flatten(0, 1) if p is module.weight else cg.sum(0)
        out[name] = total.to(p.dtype)
    return out


def _squared_norms(module: nn.Module, params, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    if isinstance(module, nn.Embedding):
        return {name: embedding_squared_norms(a, g) for name, _ in params}
    return ghost_squared_norms(module, params, a, g)


def _takes_ghost(module: nn.Module, positions: int, mode: str) -> bool:
    if mode == "off" or type(module) not in (nn.Linear, nn.Embedding):
        return False
    if mode == "on":
        return True
    if type(module) is nn.Embedding:
        return positions < module.num_embeddings
    return ghost_pays(positions, module.in_features, module.out_features)


def clipped_sum(model: nn.Module, per_example_loss: Callable[[], Tensor], clip: float,
                mode: str = "auto") -> tuple[dict[str, Tensor], Tensor]:
    """Σ_i min(1, C/(‖g_i‖+1e-6)) · g_i for every trainable parameter (flat clipping over all
    of them together) and the per-example norms ‖g_i‖ before clipping, shape (n,): what
    `dpsgd.clip_and_sum(dpsgd.per_sample_gradients(model, per_example_loss), clip)` returns,
    with the layers chosen by `mode` (see the module docstring) never materialising a
    per-example gradient. One forward and one backward pass, as there."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip!r}")
    owners, recorders, n = record_layers(model, per_example_loss)
    if not owners:
        raise ValueError("the model has no trainable parameters")
    layers, per_param = [], []  # per_param: each parameter's per-example norms, shape (n,)
    for (_, module, params), rec in zip(owners, recorders):
        # positions per example, read off the output gradients' shapes: the layer's tensors are
        # reshaped (and upcast under bf16) only when it takes the Gram route
        positions = sum(g[0].numel() // g.shape[-1] for g in rec.backprops if g is not None) \
            if n > 0 else 0
        seen = _positions(rec, n, ids=type(module) is nn.Embedding) \
            if positions and _takes_ghost(module, positions, mode) else None
        if seen is not None:
            per_param.extend(v.sqrt() for v in _squared_norms(module, params, *seen).values())
            layers.append((module, params, seen))
        else:
            grads = _module_grad_samples(module, params, rec, n)
            per_param.extend(g.flatten(start_dim=1).norm(2, dim=1) for g in grads.values())
            layers.append((module, params, grads))
    # combined as dpsgd.per_sample_norms does, so that with every layer materialised the result
    # is bit for bit clip_and_sum's
    norms = torch.stack(per_param).norm(2, dim=0)
    factors = clip_factors(norms, clip)
    summed: dict[str, Tensor] = {}
    for module, params, data in layers:
        if isinstance(data, tuple):
            summed.update(_ghost_sum(module, params, *data, factors))
        elif n == 0:
            summed.update({name: p.new_zeros(p.shape) for name, p in params})
        else:
            summed.update({name: torch.einsum("i,i...->...", factors.to(g.dtype), g)
                           for name, g in data.items()})
    return summed, norms
