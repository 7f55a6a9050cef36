"""ResLoRA's block shortcut (Shi et al., arXiv 2402.18039, "ResLoRA_bs"): the residual paths on
the live model during training, and their exact merge into a plain LoRA for export.

Notation: the LoRA layers of one kind (e.g. every `query`) in model order n = 0, 1, …, each
W_n x + s·B_n·A_n x with s = α/r. The block shortcut adds the LoRA blocks of the m previous
layers of the same kind, applied to this layer's own input:

    h_n = W_n x_n + s·(B_n·A_n + Σ_{k=1..m} B_{n−k}·A_{n−k}) x_n         (k ≤ n)

(m is the paper's number of previous blocks, `method.reslora_blocks`). Why this shortcut, of the
paper's three: its extra term is a weight, not an activation, so it merges away *exactly* —
ΔW_n = s·Σ_{k=0..m} B_{n−k}·A_{n−k} — which the paper's input- and middle-shortcuts (x_{n−1}, or
A_{n−k}·x_{n−k}, fed into layer n) do not: their merges scale B_n·A_n by a factor estimated from
activation norms, an approximation. The price: layer n−k's lora_A / lora_B run again inside
layer n, so those `nn.Linear` modules are marked reusable for DP-SGD
(`fedlora.privacy.dpsgd.mark_reusable`), whose per-example gradients then sum every call's.

The merge, exact and still a plain PEFT LoRA: ΔW_n = s·B'_n·A'_n with
A'_n = [A_n; A_{n−1}; …; A_{n−m}] and B'_n = [B_n, B_{n−1}, …, B_{n−m}] (zero blocks for
k > n), rank r' = (m+1)·r and α' = (m+1)·α, so α'/r' = s. A user loads it with
`PeftModel.from_pretrained` and gets the training-time model's outputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

A, B = ".lora_A.weight", ".lora_B.weight"
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def chains(names: list[str]) -> list[list[str]]:
    """LoRA layers grouped by kind, each group in model order: names that differ only in their
    numeric components (the layer index) are one kind, ordered by those numbers."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_INDEX.sub("#", name), []).append(name)
    order = lambda n: [int(i) for i in _INDEX.findall(n)]  # noqa: E731
    return [sorted(group, key=order) for _, group in sorted(groups.items())]


def previous(chain: list[str], blocks: int) -> dict[str, list[str]]:
    """Each layer's m = `blocks` predecessors in its chain, nearest first (fewer at the start)."""
    return {name: chain[max(0, n - blocks):n][::-1] for n, name in enumerate(chain)}


# --------------------------------------------------------------------------- the live model


def install_paths(model: nn.Module, blocks: int, adapter: str = "default") -> int:
    """Add the block shortcut to every PEFT LoRA layer of `model` (a forward hook adding
    s·Σ_k B_{n−k}·A_{n−k} x_n to its output); returns how many shortcut paths were added.
    Layers of one kind must share a shape (the paper links only those); a model gets its
    paths once."""
    from peft.tuners.lora import Linear as LoraLinear

    from fedlora.errors import ModelError
    from fedlora.privacy.dpsgd import mark_reusable

    if model.__dict__.get("_fedlora_reslora"):
        return 0
    layers = {name: mod for name, mod in model.named_modules()
              if isinstance(mod, LoraLinear) and adapter in mod.lora_A}
    paths = 0
    for chain in chains(list(layers)):
        for name, before in previous(chain, blocks).items():
            mod = layers[name]
            prevs = [layers[p] for p in before]
            for p_name, p in zip(before, prevs):
                if p.lora_A[adapter].weight.shape != mod.lora_A[adapter].weight.shape or \
                        p.lora_B[adapter].weight.shape != mod.lora_B[adapter].weight.shape:
                    raise ModelError(f"method.name=reslora: LoRA layers '{p_name}' and '{name}' differ "
                                     "in shape, so one cannot take the other's block — target "
                                     "layers of one shape per name (method.target_modules)")
                mark_reusable(p.lora_A[adapter])
                mark_reusable(p.lora_B[adapter])
            if prevs:
                mod.register_forward_hook(_shortcut(prevs, adapter))
                paths += len(prevs)
    model.__dict__["_fedlora_reslora"] = True
    return paths


def _shortcut(prevs: list[nn.Module], adapter: str):
    def hook(module, args, output):
        if module.merged or module.disable_adapters or not args:
            return output  # PEFT's own switches: the adapter is folded in, or turned off
        x = args[0]
        extra = sum(p.lora_B[adapter](p.lora_A[adapter](x.to(p.lora_A[adapter].weight.dtype)))
                    * p.scaling[adapter] for p in prevs)
        return output + extra.to(output.dtype)
    return hook


# --------------------------------------------------------------------------- the merge


def merged_factors(state: dict[str, Tensor], blocks: int) -> dict[str, Tensor]:
    """`state` with every layer's (A_n, B_n) replaced by the merge's (A'_n, B'_n) of rank
    (m+1)·r (the module docstring); other tensors as they are. With α' = (m+1)·α,
    s·B'_n·A'_n = s·Σ_{k=0..m} B_{n−k}·A_{n−k}: the block shortcut's weight, exactly."""
    out = dict(state)
    layers = [k.removesuffix(A) for k in state if k.endswith(A)]
    for chain in chains(layers):
        for name, before in previous(chain, blocks).items():
            a, b = state[name + A], state[name + B]
            pad = blocks - len(before)
            out[name + A] = torch.cat([a] + [state[p + A] for p in before]
                                      + [torch.zeros_like(a)] * pad, dim=0)
            out[name + B] = torch.cat([b] + [state[p + B] for p in before]
                                      + [torch.zeros_like(b)] * pad, dim=1)
    return out


def write_plain_adapter(folder: Path, blocks: int) -> None:
    """Rewrite the PEFT adapter `save_pretrained` wrote to `folder` (the layers' own factors,
    rank r) as the merged plain LoRA: factors from `merged_factors`, r' = (m+1)·r, α' = (m+1)·α."""
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    merged = merged_factors(load_file(str(weights)), blocks)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(weights), metadata={"format": "pt"})
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["r"] = config["r"] * (blocks + 1)
    config["lora_alpha"] = config["lora_alpha"] * (blocks + 1)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
