"""Server-side checks of each client's reply before it can touch the global model.

What a client must send is exactly what `method.upload` would produce for it: the method's
uploaded keys for that round, cut to the client's rank (`lowrank.slice_to_rank`), in the
model's dtypes. The expectation is computed from a template of the local state (every tensor
a client can hold, zeros of the right shape), so unequal ranks and base-weight changes need no
special case. A reply is rejected when any key is missing or unexpected, a shape or dtype
differs, a value is not finite, the example count is not a positive integer, ε is not a
number, or (optionally) when the update's L2 norm

    ‖u − s‖₂ = sqrt(Σ_key ‖upload[key] − sent[key]‖²)

exceeds `max_update_norm`, with `sent[key]` what the client started from: its download, or the
initial value for keys it was not sent (zero for base-weight changes).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fedlora.methods import keys, lowrank
from fedlora.methods.base import Method, State


class UpdateValidator:
    def __init__(self, method: Method, template: State, max_norm: float = 0.0):
        """`template`: every tensor a client can hold, at the model's rank (values are the
        initial ones; base-weight keys hold zero changes)."""
        self.method = method
        self.template = template
        self.max_norm = max_norm
        self._cache: dict[tuple[int, int], dict[str, tuple[torch.Size, torch.dtype]]] = {}

    def expected(self, client: int, round: int) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Key → (shape, dtype) of what `client` must upload in `round`."""
        key = (client, round)
        if key not in self._cache:
            upload = self.method.upload(self.template, round, client)
            sliced = lowrank.slice_to_rank(upload, self.method.client_rank(client))
            self._cache = {key: {k: (v.shape, v.dtype) for k, v in sliced.items()}}  # one round kept
        return self._cache[key]

    def check(self, client: int, upload: object, num_examples: object, epsilon: object,
              sent: State, round: int) -> str | None:
        """None if the reply is acceptable, else the reason it is not (one line)."""
        if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
            return f"example count {num_examples!r} is not a positive integer"
        if not isinstance(epsilon, numbers.Real) or math.isnan(epsilon) or epsilon < 0:
            return f"reported ε {epsilon!r} is not a number ≥ 0"
        if not isinstance(upload, dict) or not all(isinstance(v, Tensor) for v in upload.values()):
            return "upload is not a mapping of tensors"
        want = self.expected(client, round)
        missing, extra = sorted(set(want) - set(upload)), sorted(set(upload) - set(want))
        if missing or extra:
            parts = ([f"missing {_few(missing)}"] if missing else []) + (
                [f"unexpected {_few(extra)}"] if extra else [])
            return "wrong keys: " + "; ".join(parts)
        for k, (shape, dtype) in want.items():
            v = upload[k]
            if v.shape != shape:
                return f"{k} has shape {tuple(v.shape)}, expected {tuple(shape)}"
            if v.dtype != dtype:
                return f"{k} has dtype {v.dtype}, expected {dtype}"
            if not torch.isfinite(v).all():
                return f"{k} has non-finite values (NaN or ±inf)"
        if self.max_norm > 0:
            norm = self.update_norm(client, upload, sent)
            if not norm <= self.max_norm:
                return f"update norm {norm:.4g} exceeds federation.max_update_norm={self.max_norm:g}"
        return None

    def update_norm(self, client: int, upload: State, sent: State) -> float:
        start = lowrank.slice_to_rank(self.template, self.method.client_rank(client))
        total = 0.0
        for k, v in upload.items():
            ref = sent.get(k)
            if ref is None:
                ref = torch.zeros_like(v) if keys.is_base(k) else start[k]
            total += float((v.double() - ref.double()).pow(2).sum())
        return math.sqrt(total)


def template_state(handle, initial: State) -> State:
    """Every tensor a client can hold: the initial adapter, and each base weight as a shape-only
    (meta) tensor — a base-weight change's reference value is zero, so no copy is needed."""
    base = {k: torch.empty(p.shape, dtype=p.dtype, device="meta") for k, p in handle.base.items()}
    return {**base, **initial}


def _few(names: list[str], n: int = 2) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
