"""Server optimizers (FedOpt: Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The round's aggregate x̄ (whatever the method's `aggregate` returns) is read as a step
Δ_t = x̄ − x_{t−1} from the previous global state, and the server applies its own update rule
to it, tensor by tensor:

* `avg` (FedAvg): x_t = x̄, i.e. x_{t−1} + Δ_t.
* `momentum` (FedAvgM, Hsu et al. 2019): m_t = β·m_{t−1} + Δ_t, x_t = x_{t−1} + η·m_t.
* `adam` (FedAdam, Reddi et al. Algorithm 2): m_t = β₁·m_{t−1} + (1−β₁)·Δ_t,
  v_t = β₂·v_{t−1} + (1−β₂)·Δ_t², x_t = x_{t−1} + η·m_t / (√v_t + τ) (no bias correction,
  as in the paper; τ = 1e-3 controls the adaptivity).

Both read only the aggregate of DP-protected uploads: post-processing, no ε cost. Δ of a tensor
that does not move (FFA-LoRA's frozen A) is 0, so it stays put. A method whose aggregate is
not a step from the previous state (a merge-and-restart, a re-factoring, a residual folded into
the base) cannot take one: `Method.averages` says which can. The buffers m (and v) live in
`FederationState.server_buffers` and go into checkpoints, so a resumed run takes the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fedlora.methods.base import GlobalState, State

ADAM_BETAS = (0.9, 0.99)
ADAM_TAU = 1e-3


@dataclass(frozen=True)
class ServerOptimizer:
    kind: str = "avg"      # avg | momentum | adam
    lr: float = 1.0        # η
    momentum: float = 0.9  # β of momentum


def server_step(opt: ServerOptimizer, old: GlobalState, new: GlobalState,
                buffers: State) -> tuple[GlobalState, State]:
    """The global state after the server's step from `old` given the aggregate `new`, and the
    updated buffers (a new dict; inputs are not changed)."""
    if opt.kind == "avg":
        return new, buffers
    buffers = dict(buffers)
    adapter = {k: _step(opt, k, old.adapter.get(k), v, buffers) for k, v in new.adapter.items()}
    base = {k: _step(opt, "base:" + k, old.base_delta.get(k), v, buffers)
            for k, v in new.base_delta.items()}
    return replace(new, adapter=adapter, base_delta=base), buffers


def _step(opt: ServerOptimizer, name: str, before: torch.Tensor | None, after: torch.Tensor,
          buffers: State) -> torch.Tensor:
    if before is None:
        before = torch.zeros_like(after)  # a base change that did not exist yet is Δ = 0
    if before.shape != after.shape:  # e.g. a re-shaped factor: nothing to step from
        return after
    delta = (after - before).double()
    if opt.kind == "momentum":
        m = buffers[f"m:{name}"] = opt.momentum * buffers.get(f"m:{name}", 0 * delta) + delta
        out = before.double() + opt.lr * m
    elif opt.kind == "adam":
        b1, b2 = ADAM_BETAS
        m = buffers[f"m:{name}"] = b1 * buffers.get(f"m:{name}", 0 * delta) + (1 - b1) * delta
        v = buffers[f"v:{name}"] = b2 * buffers.get(f"v:{name}", 0 * delta) + (1 - b2) * delta * delta
        out = before.double() + opt.lr * m / (v.sqrt() + ADAM_TAU)
    else:
        raise ValueError(f"unknown server optimizer {opt.kind!r}")
    return out.to(after.dtype)
