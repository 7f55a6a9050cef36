"""The local optimizer of `train.optimizer`, built for one client round from the handle's keys."""

from __future__ import annotations

import torch
from torch import nn

from fedlora.config import TrainConfig
from fedlora.methods import keys
from fedlora.optim.lora_pro import LoRAPro
from fedlora.optim.lora_rite import LoRARITE
from fedlora.optim.pairs import lora_layers

LORA_OPTIMIZERS = {"lora_pro": LoRAPro, "lora_rite": LoRARITE}


def build_optimizer(train: TrainConfig, adapter: dict[str, nn.Parameter], trainable: list[str],
                    scaling: float) -> torch.optim.Optimizer:
    """`train.optimizer` over the `trainable` keys of `adapter` (state key → parameter).

    sgd and adam see the tensors in two groups (`param_groups`: the head, the rest). lora_pro
    and lora_rite are told each LoRA layer's (A, B, s) and which factor is trained — A frozen
    included — and give every other trained tensor (the head) plain Adam. The head steps at
    `train.head_lr` (0: `train.lr`), every other tensor at `train.lr`. Config validation has
    refused them where a client does not train one (A, B) pair per layer at a single rank."""
    groups = param_groups({k: adapter[k] for k in trainable}, train.lr, train.head_lr)
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train.lr)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    layers = lora_layers(adapter, set(trainable), scaling)
    paired = {id(p) for layer in layers for p in (layer.A, layer.B)}
    loose = [k for k in trainable if (keys.is_lora_a(k) or keys.is_lora_b(k))
             and id(adapter[k]) not in paired]
    if loose:  # pragma: no cover - validation refuses such methods first
        raise ValueError(f"train.optimizer={train.optimizer}: LoRA factors without a pair: {loose}")
    others = [adapter[k] for k in trainable if not (keys.is_lora_a(k) or keys.is_lora_b(k))]
    return LORA_OPTIMIZERS[train.optimizer](layers, others, lr=train.lr,
                                            others_lr=train.head_lr or train.lr)


def param_groups(params: dict[str, nn.Parameter], lr: float, head_lr: float) -> list[dict]:
    """Two optimizer groups: the task head's tensors at `head_lr` (0: `lr`), everything else
    at `lr`; an empty group is left out."""
    head = [p for k, p in params.items() if keys.is_head(k)]
    rest = [p for k, p in params.items() if not keys.is_head(k)]
    return [g for g in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr or lr}) if g["params"]]
