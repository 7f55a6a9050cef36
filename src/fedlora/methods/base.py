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
from fedlora.methods import chain, keys, lowrank
from fedlora.methods.aggregate import weighted_mean

State = dict[str, Tensor]


@dataclass(frozen=True)
class Update:
    """What one client sent back after a round of local training."""

    client: int
    state: State
    num_examples: int
    #: the server's aggregation weight (`federation.weighting`); None: num_examples
    weight: float | None = None


@dataclass(frozen=True)
class GlobalState:
    """The server's model: adapter tensors, changes to the frozen base weights (if any), and
    statistics of the clients' data the model reads.

    `base_delta` is keyed by base-weight name and added to the pre-trained weights: methods such
    as FedEx-LoRA and FLoRA fold parts of the aggregate into the base model. `links` are the
    merged links of a chain (`method.chain_every`, `fedlora.methods.chain`), as factors whose
    products are added to the pre-trained weights too. `statistics`
    (`keys.is_statistic`) are computed under DP before round 1 — the feature centre μ of
    `fedlora.federation.centering` — and installed with the model; no method trains or
    aggregates them, and every method's new state keeps them (`dataclasses.replace`).
    """

    adapter: State
    base_delta: State = field(default_factory=dict)
    statistics: State = field(default_factory=dict)
    links: State = field(default_factory=dict)

    def with_adapter(self, adapter: State) -> "GlobalState":
        return replace(self, adapter=adapter)

    def updated(self, state: State) -> "GlobalState":
        """A copy with `state`'s tensors replacing ours: base-weight keys (`keys.is_base`) go
        to `base_delta`, the rest to `adapter`."""
        base = {k: v for k, v in state.items() if keys.is_base(k)}
        rest = {k: v for k, v in state.items() if not keys.is_base(k)}
        return replace(self, adapter={**self.adapter, **rest},
                       base_delta={**self.base_delta, **base})

    def tensors(self) -> State:
        """Adapter, merged links, base changes and statistics in one state: what installs the
        global model."""
        return {**self.adapter, **self.links, **self.base_delta, **self.statistics}


class Method:
    """Base class; subclasses set `name` and override the predicates or `aggregate`.

    Defaults give FedAvg over whatever a client trains: every trained tensor is uploaded and
    averaged weighted by the clients' example counts.
    """

    name: ClassVar[str]
    #: can clients hold different LoRA ranks (`method.client_ranks`)? Only where aggregation
    #: stays meaningful across ranks.
    supports_client_ranks: ClassVar[bool] = False
    #: is the model personalised whatever the head policy (some tensors never leave a client)?
    always_personalised: ClassVar[bool] = False
    #: can it be chained (`method.chain_every`)? Where the global state is one LoRA (A, B)
    #: per layer and a head, with no base changes or personal factors of its own.
    supports_chains: ClassVar[bool] = False
    #: is it a chain whatever `method.chain_every` says (XGBLoRA: boosting is a chain)?
    always_chained: ClassVar[bool] = False
    #: the one LoRA rank it is defined at (XGBLoRA's boosters: 1), or None for any
    fixed_rank: ClassVar[int | None] = None
    #: is its aggregate a (weighted) mean of the uploads, i.e. a step from the previous state
    #: that a server optimizer (`federation.server_optimizer`) can take instead?
    averages: ClassVar[bool] = False
    #: why its server step needs each site's upload rather than only their weighted mean
    #: Σ_k p_k·u_k ("" = it does not: `aggregate` is a function of that mean, which is all
    #: secure aggregation, `federation.secure_aggregation`, lets the server see). Every method
    #: that `averages` qualifies, and so can one that post-processes the mean (FedSVD).
    needs_each_upload: ClassVar[str] = ""
    #: does it train an adapter? False for `head` (only the task head): it needs a task with
    #: a trained head (not a causal LM) shared by the sites (not `method.head = "local"`)
    trains_adapter: ClassVar[bool] = True
    #: does a client train one LoRA (A, B) pair per layer, all at one rank (either factor may
    #: be frozen)? What `train.optimizer = "lora_pro" | "lora_rite"` need (`fedlora.optim`)
    lora_pairs: ClassVar[bool] = True
    #: is its model a PEFT LoRA adapter (exported to `adapter/` for `PeftModel.from_pretrained`)?
    #: False for a mixture of experts: its gate has no PEFT form (`fedlora.mixture`)
    peft_export: ClassVar[bool] = True
    #: the paper, for the README's table and `fedlora methods`
    paper: ClassVar[str] = ""

    def __init__(self, config: MethodConfig):
        self.config = config

    # -- what exists where -------------------------------------------------------------
    def local_optimizer(self, params: dict, lr: float, head_lr: float = 0.0):
        """The method's own local optimizer for these trainable parameters (key → tensor), the
        head at `head_lr` (0: `lr`), or None for `train.optimizer`'s (GaLore brings its
        projected Adam)."""
        return None

    def trainable(self, key: str, round: int) -> bool:
        """Does a client train tensor `key` in round `round` (0-based)? (For methods whose
        clients train different tensors: does some client train it.)"""
        raise NotImplementedError

    def client_trains(self, key: str, round: int, client: int) -> bool:
        """Does client `client` train `key` in round `round`? The same for every client unless
        a method gives each its own tensors (mole: each client its own expert)."""
        return self.trainable(key, round)

    # -- the model and the loss ----------------------------------------------------------
    def extend_model(self, model, config) -> None:
        """Give the PEFT model the method's own training-time structure, once per process, right
        after LoRA is attached and before its tensors are read: mole adds its experts and gates,
        reslora its residual paths. `config` is the run's `Config`. Nothing by default."""

    def example_loss(self, loss):
        """The per-example training loss from the task's (mole adds its gate-balancing term)."""
        return loss

    def communicated(self, key: str) -> bool:
        """Does tensor `key` ever cross the wire? Others are derived locally (e.g. A from a seed)."""
        return True

    def personal(self, key: str) -> bool:
        """Does tensor `key` stay with its client (personalisation) rather than being shared?
        With `method.head = "local"` the head does."""
        return self.config.head == "local" and keys.is_head(key)

    @property
    def personalised(self) -> bool:
        """Is each client's model its own (evaluated per client on its own held-out data)?"""
        return self.always_personalised or self.config.head == "local"

    # -- the model's structure and its export ------------------------------------------
    def finish_export(self, folder) -> None:
        """Turn the PEFT adapter just saved to `folder` into the one a user loads, computing the
        same outputs as the training-time model (default: as saved; ResLoRA merges its residual
        paths into plain LoRA factors)."""

    # -- ranks -------------------------------------------------------------------------
    @property
    def max_rank(self) -> int:
        return self.config.max_rank

    def client_rank(self, client: int) -> int:
        """The LoRA rank r_k of `client`. Every client's product is scaled by α/r_max (the
        shared model's), i.e. a rank-r_k client is a rank-r_k LoRA with α_k = α·r_k/r_max, so
        all clients' B_k·A_k are in the same units and can be averaged or stacked as they are."""
        ranks = self.config.client_ranks
        return ranks[client] if ranks else self.max_rank

    @property
    def scaling(self) -> float:
        """s in ΔW = s·B·A (PEFT's α/r of the shared model)."""
        return self.config.alpha / self.max_rank

    @property
    def chained(self) -> bool:
        return self.config.chain_every > 0 or self.always_chained

    @property
    def chain_period(self) -> int:
        """Rounds per link: `method.chain_every`, or 1 for a method that is always a chain and
        was given 0."""
        return self.config.chain_every or 1

    def client_state(self, initial: State, personal: State, download: State, client: int) -> State:
        """Everything a client installs: its download over its personal tensors over the
        initial adapter (and, in a chain, the A's it draws itself), padded to the model's rank
        and zero beyond the client's rank."""
        state = chain.complete(initial, {**initial, **personal, **download}, self.communicated)
        state = lowrank.pad_to_rank(state, self.max_rank)
        rank = self.client_rank(client)
        return state if rank == self.max_rank else lowrank.zero_beyond_rank(state, rank)

    # -- the four operations -----------------------------------------------------------
    def init_global(self, initial: State) -> GlobalState:
        """The server's starting state, from the adapter every client starts from."""
        # a chain's server holds every LoRA factor (it merges them), even those never sent
        kept = lambda k: self._shared(k) or (self.chained and (keys.is_lora_a(k) or keys.is_lora_b(k)))  # noqa: E731
        return GlobalState(adapter={k: v.clone() for k, v in initial.items() if kept(k)})

    def download(self, glob: GlobalState, client: int) -> State:
        """What the server sends `client` at the start of a round: the global adapter (cut to
        the client's rank), any merged links and base-weight changes — never a tensor that is
        not communicated (the client computes those)."""
        state = lowrank.slice_to_rank(glob.tensors(), self.client_rank(client))
        return {k: v for k, v in state.items() if self.communicated(k)}

    def end_round(self, glob: GlobalState, round: int) -> GlobalState:
        """After round `round`'s aggregation: in a chain, every `chain_every` rounds, merge the
        link into `glob.links` and start the next (`fedlora.methods.chain.close_link`)."""
        if not self.chained or (round + 1) % self.chain_period:
            return glob
        adapter, links = chain.close_link(glob.adapter, glob.links, self.scaling)
        return replace(glob, adapter=adapter, links=links)

    def upload(self, local: State, round: int, client: int | None = None) -> State:
        """What client `client` sends after local training: the shared tensors it trained."""
        trained = (lambda k: self.trainable(k, round)) if client is None \
            else (lambda k: self.client_trains(k, round, client))  # noqa: E731
        return {k: v for k, v in local.items()
                if trained(k) and self._shared(k) and not chain.is_link(k)}

    def aggregate(self, glob: GlobalState, updates: list[Update], round: int) -> GlobalState:
        """FedAvg: each uploaded tensor becomes the example-weighted mean over clients.

        Factors of rank-r_k clients are zero-padded to the model's rank first (unequal ranks).
        """
        if not updates:
            return glob
        weights = self.data_weights(updates)
        states = lowrank.pad_like([u.state for u in updates], glob.adapter)
        averaged = weighted_mean(states, weights)
        return glob.updated(averaged)

    def _shared(self, key: str) -> bool:
        return self.communicated(key) and not self.personal(key)

    def describe(self) -> str:
        return (self.__doc__ or self.name).strip().splitlines()[0]

    # -- helpers for aggregation rules ----------------------------------------------------
    @staticmethod
    def data_weights(updates: list[Update]) -> list[float]:
        """p_k ∝ each update's weight: n_k, the clients' example counts, unless the server set
        another (`federation.weighting`, `fedlora.federation.weighting`)."""
        return [float(u.num_examples if u.weight is None else u.weight) for u in updates]

    def average_rest(self, glob: GlobalState, updates: list[Update], handled: set[str]) -> GlobalState:
        """FedAvg of every uploaded tensor not in `handled` (the head, typically)."""
        rest = [{k: v for k, v in u.state.items() if k not in handled} for u in updates]
        if not rest or not rest[0]:
            return glob
        return glob.updated(weighted_mean(rest, self.data_weights(updates)))


__all__ = ["GlobalState", "Method", "State", "Update", "keys"]
