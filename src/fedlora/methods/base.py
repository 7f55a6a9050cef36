"""The federated-method interface: what a client trains, sends and installs; how the server aggregates.

States are `dict[str, Tensor]` keyed by PEFT state-dict names (as `get_peft_model_state_dict`
returns them), e.g. `base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight`.
A method is a small object; aggregation is a pure function of the global state and the updates.
The runners never look at a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from torch import Tensor

from fedlora.config import MethodConfig
from fedlora.methods import keys
from fedlora.methods.aggregate import weighted_mean

State = dict[str, Tensor]


@dataclass(frozen=True)
class Update:
    """What one client sent back after a round of local training."""

    client: int
    state: State
    num_examples: int


@dataclass(frozen=True)
class GlobalState:
    """The server's model: adapter tensors, and changes to the frozen base weights (if any).

    `base_delta` is keyed by base-weight name and added to the pre-trained weights: methods such
    as FedEx-LoRA and FLoRA fold parts of the aggregate into the base model.
    """

    adapter: State
    base_delta: State = field(default_factory=dict)

    def with_adapter(self, adapter: State) -> "GlobalState":
        return replace(self, adapter=adapter)


class Method:
    """Base class; subclasses set `name` and override the predicates or `aggregate`.

    Defaults give FedAvg over whatever a client trains: every trained tensor is uploaded and
    averaged weighted by the clients' example counts.
    """

    name: ClassVar[str]

    def __init__(self, config: MethodConfig):
        self.config = config

    # -- what exists where -------------------------------------------------------------
    def trainable(self, key: str, round: int) -> bool:
        """Does a client train tensor `key` in round `round` (0-based)?"""
        raise NotImplementedError

    def communicated(self, key: str) -> bool:
        """Does tensor `key` ever cross the wire? Others are derived locally (e.g. A from a seed)."""
        return True

    def personal(self, key: str) -> bool:
        """Does tensor `key` stay with its client (personalisation) rather than being shared?"""
        return False

    # -- the four operations -----------------------------------------------------------
    def init_global(self, initial: State) -> GlobalState:
        """The server's starting state, from the adapter every client starts from."""
        shared = {k: v.clone() for k, v in initial.items() if self._shared(k)}
        return GlobalState(adapter=shared)

    def download(self, glob: GlobalState, client: int) -> State:
        """What the server sends `client` at the start of a round."""
        return dict(glob.adapter)

    def upload(self, local: State, round: int) -> State:
        """What a client sends after local training: the shared tensors it trained."""
        return {k: v for k, v in local.items() if self.trainable(k, round) and self._shared(k)}

    def aggregate(self, glob: GlobalState, updates: list[Update], round: int) -> GlobalState:
        """FedAvg: each uploaded tensor becomes the example-weighted mean over clients."""
        if not updates:
            return glob
        weights = [float(u.num_examples) for u in updates]
        averaged = weighted_mean([u.state for u in updates], weights)
        return glob.with_adapter({**glob.adapter, **averaged})

    def _shared(self, key: str) -> bool:
        return self.communicated(key) and not self.personal(key)

    def describe(self) -> str:
        return (self.__doc__ or self.name).strip().splitlines()[0]


__all__ = ["GlobalState", "Method", "State", "Update", "keys"]
