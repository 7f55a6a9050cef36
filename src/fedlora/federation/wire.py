"""What crosses the wire: states serialised with safetensors; bytes are counted from these."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load, save
from torch import Tensor


def encode_state(state: dict[str, Tensor]) -> bytes:
    """Serialise a state (contiguous CPU tensors) to safetensors bytes."""
    return save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def decode_state(payload: bytes) -> dict[str, Tensor]:
    return dict(load(payload))


def payload_bytes(state: dict[str, Tensor]) -> int:
    return len(encode_state(state))


def clone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state_digest(state: dict[str, Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()
