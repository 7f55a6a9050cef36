"""A client's local round: install the server's state, take DP-SGD steps, return an upload.

One `LocalTrainer` per process holds the frozen base model; clients swap only adapter tensors
into it, so memory grows with the number of clients by adapter size, never by model size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora.config import TrainConfig
from fedlora.data.batching import collate, length_groups, micro_batching
from fedlora.device import device_of, to_device
from fedlora.methods import lowrank
from fedlora.methods.base import Method, State
from fedlora.model import AdapterHandle
from fedlora.optim import build_optimizer
from fedlora.optim.schedule import lr_factor
from fedlora.federation import centering
from fedlora.federation.timing import Timings, phase
from fedlora.federation.weighting import noise_scale
from fedlora.federation.wire import state_digest
from fedlora.privacy.accountant import PrivacyAccountant
from fedlora.privacy.dpsgd import gaussian_noise
from fedlora.privacy.ghost import clipped_sum
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.plan import ClientPrivacy
from fedlora.privacy.randomness import Randomness, Stream, randomness_for


@dataclass
class ClientReply:
    """A client's answer to a round: its upload, its size, and what it has spent so far."""

    client: int
    upload: State
    num_examples: int
    epsilon: float
    steps: int
    train_loss: float
    refused: str | None = None
    #: s_k = σ_k/(q_k·n_k), from the client's public facts (`federation.weighting`); None: no DP
    noise_scale: float | None = None


ExampleLoss = Callable[[nn.Module, list[list[int]], list[int], list[int], int], Tensor]


def classification_loss(model: nn.Module, token_ids: list[list[int]], labels: list[int],
                        idx: list[int], pad_id: int) -> Tensor:
    """Per-example cross-entropy of the classifier on examples `idx` (on the model's device)."""
    device = device_of(model)
    batch = to_device(collate(token_ids, idx, pad_id), device)
    target = torch.tensor([labels[i] for i in idx], dtype=torch.long, device=device)
    return F.cross_entropy(model(**batch).logits, target, reduction="none")


@dataclass
class Client:
    """One data owner: its tokenised examples, its privacy ledger, its personal tensors.

    `labels[i]` is example i's target as the task's loss reads it: its class (classification)
    or where its answer starts in `token_ids[i]` (causal LM).
    """

    cid: int
    token_ids: list[list[int]]
    labels: list[int]
    privacy: ClientPrivacy
    seed: int
    personal: State = field(default_factory=dict)
    steps: int = 0  # DP-SGD steps taken over all rounds
    ledger: PrivacyLedger | None = None  # persisted before each upload leaves (resume-safe ε)
    randomness: Randomness | None = None  # DP noise and sampling; default: by privacy.noise

    def __post_init__(self):
        if self.randomness is None:  # secret unless asked otherwise: a key in memory only
            self.randomness = randomness_for("secret", self.seed, self.cid)

    @property
    def num_examples(self) -> int:
        return len(self.labels)


class LocalTrainer:
    """Trains any client on one shared model; the adapter is the only per-client state.

    `timings`, if set to a dict, accumulates the seconds of the privacy ledger's bookkeeping
    (the download's digest and the fsync'd write) under `ledger` (see `federation.timing`).
    """

    timings: Timings | None = None
    #: `fedlora audit`'s canaries (`fedlora.audit.canaries.GradientCanaries`): inserted into the
    #: DP sums of the one client they name, and scored from its rounds; None in every other run
    audit = None

    def __init__(self, model: nn.Module, method: Method, train: TrainConfig, local_steps: int,
                 pad_id: int, initial: State, loss: ExampleLoss = classification_loss, *,
                 rounds: int):
        self.model = model
        self.loss = loss  # the task's per-example loss
        self.method = method
        self.train_cfg = train
        self.local_steps = local_steps
        self.rounds = rounds  # the run's planned rounds: train.lr_schedule's horizon
        self.pad_id = pad_id
        self.handle = AdapterHandle.of(model)
        self.names = self.handle.param_names()
        self.initial = {k: v.clone() for k, v in initial.items()}
        # micro-batch size and a pass's fixed cost in tokens, for the device the model is on
        self.micro_batch, self.pass_cost = micro_batching(train.micro_batch_size, device_of(model).type)

    # ------------------------------------------------------------------ one client round
    def train(self, client: Client, download: State, round: int) -> ClientReply:
        """One round of local training.

        With a ledger, a round this client already released is answered from the ledger: the
        stored release, bit for bit, if it was released from this very download; else refused
        (see `fedlora.privacy.ledger`). A new release is on disk before it leaves."""
        digest, seen = self._seen(client, download, round)
        if seen is not None:
            return self._replay(client, round, digest, seen)
        privacy = client.privacy
        if not privacy.can_take(self.local_steps):
            return self._refuse(client, f"client {client.cid} has spent its privacy budget "
                                        f"(ε={privacy.spent():.3f} of {privacy.epsilon}); it stops")
        local, losses = self._local_round(client, download, round)
        client.personal = {k: v for k, v in local.items() if self.method.personal(k)}
        upload = lowrank.slice_to_rank(self.method.upload(local, round, client.cid),
                                       self.method.client_rank(client.cid))
        loss = float(sum(losses) / len(losses)) if losses else math.nan
        self._release(client, round, digest, upload, loss)
        return ClientReply(client=client.cid, upload=upload, num_examples=client.num_examples,
                           epsilon=_spent_after(privacy, None), steps=client.steps,
                           train_loss=loss, noise_scale=_noise_scale(client))

    def _local_round(self, client: Client, download: State, round: int) -> tuple[State, list]:
        """`local_steps` DP-SGD steps from the download: the adapter state after them, and the
        batches' mean losses (a local diagnostic: they never leave the client)."""
        privacy = client.privacy
        rank = self.method.client_rank(client.cid)
        self.handle.install(self.method.client_state(self.initial, client.personal, download,
                                                     client.cid))
        keys = self.handle.set_trainable(lambda k: self.method.client_trains(k, round, client.cid))
        # a rank-r_k client on the rank-r_max model: coordinates beyond r_k stay exactly zero
        masked = {k: self.handle.param(k) for k in keys} if rank < self.method.max_rank else {}
        optimizer = self._optimizer(keys, round)
        noise = client.randomness.stream("noise", round)  # drawn on the CPU on any device
        audit = self._audit(client)
        canary = None if audit is None else client.randomness.stream("canary", round)
        if audit is not None:
            before = {k: v.detach().clone() for k, v in self.handle.state().items()}
        torch.manual_seed(client.randomness.torch_seed("dropout", round))
        self.model.train()
        losses = []
        for batch in self.poisson_batches(client, round):
            loss = self._step(client, batch, keys, noise, canary=canary)
            if masked:  # DP noise on masked coordinates is discarded, never applied
                lowrank.zero_beyond_rank_({k: p.grad for k, p in masked.items()}, rank)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if masked:
                lowrank.zero_beyond_rank_(masked, rank)
            privacy.record_step()  # recorded before anything leaves the client
            client.steps += 1
            if loss is not None:
                losses.append(loss)
        self.model.eval()
        self.handle.set_trainable(lambda k: False)
        if audit is not None:
            audit.observe(before, self.handle.state())
        return self.handle.state(), losses

    def _audit(self, client: Client):
        return self.audit if self.audit is not None and self.audit.client == client.cid else None

    def _release(self, client: Client, round, digest: str | None, upload: State,
                 loss: float | None = None) -> None:
        """Write the ledger entry (and the released tensors) before the upload leaves."""
        if client.ledger is None:
            return
        with phase(self.timings, "ledger"):
            client.ledger.record(round, digest, client.privacy.accountant.state_dict(), upload,
                                 client.personal, client.steps,
                                 loss if loss is not None and math.isfinite(loss) else None)

    def _seen(self, client: Client, download: State, entry) -> tuple[str | None, dict | None]:
        """The digest of what this release starts from, and the ledger's entry if it was
        released before (None, None without a ledger)."""
        if client.ledger is None:
            return None, None
        # everything the result depends on besides the data and the randomness
        with phase(self.timings, "ledger"):
            digest = state_digest({**{f"download/{k}": v for k, v in download.items()},
                                   **{f"personal/{k}": v for k, v in client.personal.items()}})
        return digest, client.ledger.entry(entry)

    def _replay(self, client: Client, round, digest: str, seen: dict) -> ClientReply:
        """A round this client already released: the same release again, or a refusal."""
        what = "the centring query" if round == centering.LEDGER_ENTRY else f"round {round + 1}"
        if seen["digest"] != digest:
            return self._refuse(client, f"client {client.cid} already answered {what} from a "
                                        "different model; answering again would pair two releases "
                                        "on one noise stream — it sits this one out")
        kept = client.ledger.release(round)
        if kept is None:
            return self._refuse(client, f"client {client.cid} released {what} before the "
                                        "server's checkpoint and no longer keeps it (a "
                                        "checkpointed round is never asked for again) — it sits "
                                        "this one out")
        upload, client.personal = kept
        client.steps = seen["steps"]
        return ClientReply(client=client.cid, upload=upload, num_examples=client.num_examples,
                           epsilon=_spent_after(client.privacy, seen), steps=client.steps,
                           train_loss=seen.get("loss", math.nan), noise_scale=_noise_scale(client))

    def answer_center_query(self, client: Client) -> ClientReply:
        """Answer the DP feature-centring query (`fedlora.federation.centering`), once: asked
        again, the client re-sends what it released (or refuses, as for a round)."""
        download: State = {}  # before round 1 every client builds the initial adapter itself
        digest, seen = self._seen(client, download, centering.LEDGER_ENTRY)
        if seen is not None:
            return self._replay(client, centering.LEDGER_ENTRY, digest, seen)
        privacy = client.privacy
        if privacy.center_rate <= 0:
            return self._refuse(client, f"client {client.cid} was not set up for feature centring "
                                        "(model.center differs between server and client)")
        if not privacy.can_answer_center_query():
            return self._refuse(client, f"client {client.cid} has spent its privacy budget "
                                        f"(ε={privacy.spent():.3f} of {privacy.epsilon}); it stops")
        self.handle.install(self.method.client_state(self.initial, client.personal, download,
                                                     client.cid))
        answer = centering.noisy_feature_sum(self.model, client.token_ids, privacy.center_rate,
                                             privacy.center_noise, self.pad_id,
                                             self.micro_batch,
                                             client.randomness.stream("center"))
        privacy.record_center_query()  # recorded before anything leaves the client
        self._release(client, centering.LEDGER_ENTRY, digest, answer)
        return ClientReply(client=client.cid, upload=answer, num_examples=client.num_examples,
                           epsilon=_spent_after(privacy, None), steps=client.steps,
                           train_loss=math.nan)

    def _refuse(self, client: Client, reason: str) -> ClientReply:
        return refusal(client, reason)

    def _optimizer(self, keys: list[str], round: int) -> torch.optim.Optimizer:
        """A new optimizer for this round's trainable `keys` — the method's own (GaLore's), else
        `train.optimizer`: its state (moments, and LoRA-Pro's or LoRA-RITE's per-layer state)
        is this client's and dies with the round. Its rates are `train.lr` and `train.head_lr`
        scaled by `train.lr_schedule`'s factor for this round."""
        factor = lr_factor(self.train_cfg.lr_schedule, round, self.rounds)
        train = dataclasses.replace(self.train_cfg, lr=self.train_cfg.lr * factor,
                                    head_lr=self.train_cfg.head_lr * factor)
        weights = {k: self.handle.param(k) for k in self.handle.shapes()}
        own = self.method.local_optimizer({k: weights[k] for k in keys}, train.lr, train.head_lr)
        if own is not None:
            return own
        return build_optimizer(train, weights, keys, self.method.scaling)

    def poisson_batches(self, client: Client, round: int) -> list[list[int]]:
        """The example indices of each of the round's `local_steps` batches: each example joins
        a batch independently with probability q (the sampling DP accounts for), drawn from a
        the client's "sample" stream of the round (`fedlora.privacy.randomness`): secret by
        default, so the server cannot tell which examples a batch held."""
        stream = client.randomness.stream("sample", round)
        q = client.privacy.sample_rate
        return [(stream.uniform(client.num_examples) < q).nonzero().flatten().tolist()
                for _ in range(self.local_steps)]

    def _step(self, client: Client, batch_idx: list[int], keys: list[str], noise: Stream,
              canary: Stream | None = None):
        """Set `.grad` on the trainable parameters; return the batch's mean loss (or None).

        With DP: g = (Σ_i clip_C(g_i) + N(0, σ²C²)) / (q·n), each example clipped to C = `clip`.
        The batch is cut into length-sorted micro-batches, each padded only to its own longest
        text: per-example gradients do not depend on how examples are grouped, so this is exact.
        """
        privacy = client.privacy
        chunks = self._micro_batches(client, batch_idx)
        if not privacy.enabled:
            return self._plain_step(client, chunks, len(batch_idx))
        names = [self.names[k] for k in keys]
        params = [self.handle.param(k) for k in keys]
        expected = privacy.sample_rate * client.num_examples
        audit = self._audit(client) if canary is not None else None
        clip = privacy.clip if audit is None else audit.clip(privacy.clip)
        # Σ_i clip(g_i) is summed micro-batch by micro-batch (clipping is per example, so this is
        # exact) and the noise is drawn once: at most one micro-batch's per-example gradients are
        # in memory, and none of the layers that train.ghost_clipping sends the Gram route
        # (fedlora.privacy.ghost), which is what makes DP full fine-tuning fit.
        summed = {n: torch.zeros_like(p) for n, p in zip(names, params)}
        # the loss is summed on the device and read once per step: a host synchronisation per
        # micro-batch would stall a GPU (the same float64 sum of the same float32 parts)
        total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
        for idx in chunks:
            value = {}

            def loss_fn(idx=idx):
                value["losses"] = self.per_example_loss(client, idx)
                return value["losses"]

            clipped, _ = clipped_sum(self.model, loss_fn, clip, self.train_cfg.ghost_clipping)
            for name in names:
                summed[name] += clipped[name]
            total += value["losses"].detach().sum().double()
        if audit is not None:  # canaries join the sum as examples do, before the noise
            audit.add(summed, {k: self.names[k] for k in keys}, privacy.sample_rate,
                      privacy.clip, canary)
        # an empty batch is pure noise; the noise is drawn once per step, for every parameter
        std = privacy.noise_multiplier * privacy.clip * (1.0 if audit is None else audit.noise_scale)
        drawn = gaussian_noise({n: tuple(p.shape) for n, p in zip(names, params)}, std, noise) \
            if std > 0 else {}
        for name, p in zip(names, params):
            grad = summed[name]
            if name in drawn:
                grad = grad + drawn[name].to(grad)
            p.grad = grad / expected
        return float(total) / len(batch_idx) if batch_idx else None

    def _plain_step(self, client: Client, chunks: list[list[int]], n: int) -> float | None:
        """Non-private: the mean loss over the batch, accumulated over micro-batches."""
        total = torch.zeros((), dtype=torch.float64)
        for idx in chunks:
            losses = self.per_example_loss(client, idx)
            (losses.sum() / n).float().backward()
            total = total.to(losses.device) + losses.detach().sum().double()  # read once, below
        return float(total) / n if n else None

    def _micro_batches(self, client: Client, batch_idx: list[int]) -> list[list[int]]:
        """At most `self.micro_batch` examples each, grouped by length for little padding (at the
        device's cost of a pass, `data.batching.micro_batching`)."""
        lengths = [len(client.token_ids[i]) for i in batch_idx]
        return [[batch_idx[j] for j in group]
                for group in length_groups(lengths, self.micro_batch, self.pass_cost)]

    def per_example_loss(self, client: Client, idx: list[int]) -> Tensor:
        """The per-example losses of examples `idx`, the forward pass under `train.precision`
        (autocast to bfloat16 for "bf16": matmuls in bf16, losses and softmax in fp32 by
        autocast's own policy; the backward pass follows the forward's dtypes)."""
        with self._autocast():
            return self.loss(self.model, client.token_ids, client.labels, idx, self.pad_id)

    def _autocast(self):
        if self.train_cfg.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_of(self.model).type, dtype=torch.bfloat16)


def refusal(client: Client, reason: str) -> ClientReply:
    """The client's answer when it will not train: no upload, what it has spent, and why."""
    return ClientReply(client.cid, {}, client.num_examples, client.privacy.spent(),
                       client.steps, math.nan, refused=reason)


def _noise_scale(client: Client) -> float | None:
    """s_k = σ_k/(q_k·n_k) of a private client (public facts), None without DP."""
    p = client.privacy
    return noise_scale(p.noise_multiplier, p.sample_rate, client.num_examples) if p.enabled else None


def _spent_after(privacy: ClientPrivacy, replayed: dict | None) -> float:
    """ε reported with an upload: spent so far, or for a replayed round what was spent then."""
    if not privacy.enabled:
        return math.inf
    if replayed is None:
        return privacy.spent()
    then = PrivacyAccountant(privacy.accountant.kind)
    then.load_state_dict(replayed["accountant"])
    return privacy.total(then).epsilon(privacy.delta)
