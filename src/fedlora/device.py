"""Where the model computes: the `device` option, and moving batches to the model.

`device` is "auto" (CUDA when `torch.cuda.is_available()`, else the CPU), "cpu", "cuda" or
"cuda:N". The model is moved there once (`experiment.build_base`); every function that runs it
reads the device from the model itself (`device_of`) and moves its batch there (`to_device`), so
the CPU and the CUDA path are the same code.

What is *not* on the device, and why:

- randomness that DP and reproducibility rest on — Poisson sampling, DP-SGD noise, the centring
  query's noise — is drawn from seeded CPU `torch.Generator`s and then moved: the same seed gives
  the same batches and the same noise on a CPU and on a GPU, whatever CUDA's generator does;
- whatever leaves a client or is written (uploads, the centring answer, checkpoints, exports,
  the privacy ledger's digest) is a CPU tensor: `AdapterHandle.state()` returns CPU copies.

Dropout masks (train mode) come from the device's own generator, seeded alike: with dropout
in the model, a CPU and a GPU run train on different masks.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from fedlora.config import DEVICE_NAMES, valid_device_name
from fedlora.errors import ConfigError



def resolve_device(name: str) -> torch.device:
    """The device `name` means on this machine; a `ConfigError` if it asks for a missing GPU."""
    if not valid_device_name(name):
        raise ConfigError(f"device must be one of {', '.join(DEVICE_NAMES)} (N = GPU index), "
                          f"got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: no CUDA device on this machine (torch "
                          f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}) — "
                          "set device=cpu (or device=auto)")
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device={name!r}: this machine has {count} CUDA device(s), numbered "
                          f"0..{count - 1} — set device=cuda:0 (or device=cpu)")
    return device


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every tensor of a collated batch on `device` (the same dict, unchanged, on the CPU)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device) for k, v in batch.items()}


def describe_device(name: str) -> str:
    """For the run's header line: the device `name` resolves to here (with the GPU's model),
    or `name` itself where it does not resolve (the build then stops with the reason)."""
    try:
        device = resolve_device(name)
    except ConfigError:
        return name
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
