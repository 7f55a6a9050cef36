"""A client's local round: install the server's state, take DP-SGD steps, return an upload.

One `LocalTrainer` per process holds the frozen base model; clients swap only adapter tensors
into it, so memory grows with the number of clients by adapter size, never by model size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora.config import TrainConfig
from fedlora.data.batching import collate
from fedlora.methods.base import Method, State
from fedlora.model import AdapterHandle
from fedlora.privacy.dpsgd import clip_and_noise, per_sample_gradients
from fedlora.privacy.plan import ClientPrivacy
from fedlora.seeding import derive_seed


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


@dataclass
class Client:
    """One data owner: its tokenised examples, its privacy ledger, its personal tensors."""

    cid: int
    token_ids: list[list[int]]
    labels: list[int]
    privacy: ClientPrivacy
    seed: int
    personal: State = field(default_factory=dict)
    steps: int = 0  # DP-SGD steps taken over all rounds

    @property
    def num_examples(self) -> int:
        return len(self.labels)


class LocalTrainer:
    """Trains any client on one shared model; the adapter is the only per-client state."""

    def __init__(self, model: nn.Module, method: Method, train: TrainConfig, local_steps: int,
                 pad_id: int, initial: State):
        self.model = model
        self.method = method
        self.train_cfg = train
        self.local_steps = local_steps
        self.pad_id = pad_id
        self.handle = AdapterHandle.of(model)
        self.names = self.handle.param_names()
        self.initial = {k: v.clone() for k, v in initial.items()}

    # ------------------------------------------------------------------ one client round
    def train(self, client: Client, download: State, round: int) -> ClientReply:
        privacy = client.privacy
        if not privacy.can_take(self.local_steps):
            return self._refuse(client, f"client {client.cid} has spent its privacy budget "
                                        f"(ε={privacy.spent():.3f} of {privacy.epsilon}); it stops")
        self.handle.install({**self.initial, **client.personal, **download})
        keys = self.handle.set_trainable(lambda k: self.method.trainable(k, round))
        params = [self.handle.params[k] for k in keys]
        optimizer = self._optimizer(params)
        sampler = torch.Generator().manual_seed(derive_seed(client.seed, "sample", client.cid, round))
        noise = torch.Generator().manual_seed(derive_seed(client.seed, "noise", client.cid, round))
        torch.manual_seed(derive_seed(client.seed, "dropout", client.cid, round))
        self.model.train()
        losses = []
        for _ in range(self.local_steps):
            batch = self._poisson_batch(client, privacy.sample_rate, sampler)
            loss = self._step(client, batch, keys, noise)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            privacy.record_step()  # recorded before anything leaves the client
            client.steps += 1
            if loss is not None:
                losses.append(loss)
        self.model.eval()
        self.handle.set_trainable(lambda k: False)
        local = self.handle.state()
        client.personal = {k: v for k, v in local.items() if self.method.personal(k)}
        return ClientReply(
            client=client.cid,
            upload=self.method.upload(local, round),
            num_examples=client.num_examples,
            epsilon=privacy.spent() if privacy.enabled else math.inf,
            steps=client.steps,
            train_loss=float(sum(losses) / len(losses)) if losses else math.nan,
        )

    def _refuse(self, client: Client, reason: str) -> ClientReply:
        return ClientReply(client.cid, {}, client.num_examples, client.privacy.spent(),
                           client.steps, math.nan, refused=reason)

    def _optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        cfg = self.train_cfg
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)

    def _poisson_batch(self, client: Client, q: float, gen: torch.Generator) -> list[int]:
        """Each example joins independently with probability q (the sampling DP accounts for)."""
        chosen = torch.rand(client.num_examples, generator=gen) < q
        return chosen.nonzero().flatten().tolist()

    def _step(self, client: Client, batch_idx: list[int], keys: list[str], noise: torch.Generator):
        """Set `.grad` on the trainable parameters; return the batch's mean loss (or None).

        With DP: g = (Σ_i clip(g_i) + N(0, σ²C²)) / (q·n), per-sample clipping to C = `clip`.
        """
        privacy = client.privacy
        if not privacy.enabled:
            if not batch_idx:
                return None
            losses = self.per_example_loss(client, batch_idx)
            losses.mean().backward()
            return float(losses.mean())
        names = [self.names[k] for k in keys]
        params = [self.handle.params[k] for k in keys]
        if batch_idx:
            value = {}

            def loss_fn():
                value["losses"] = self.per_example_loss(client, batch_idx)
                return value["losses"]

            samples = per_sample_gradients(self.model, loss_fn)
            loss = float(value["losses"].mean())
        else:  # an empty Poisson batch: the update is pure noise, as DP-SGD requires
            samples = {n: p.new_zeros((0, *p.shape)) for n, p in zip(names, params)}
            loss = None
        expected = privacy.sample_rate * client.num_examples
        grads, _ = clip_and_noise(samples, clip=privacy.clip, noise_multiplier=privacy.noise_multiplier,
                                  expected_batch_size=expected, generator=noise)
        for name, p in zip(names, params):
            p.grad = grads[name]
        return loss

    def per_example_loss(self, client: Client, idx: list[int]) -> Tensor:
        batch = collate(client.token_ids, idx, self.pad_id)
        labels = torch.tensor([client.labels[i] for i in idx], dtype=torch.long)
        logits = self.model(**batch).logits
        return F.cross_entropy(logits, labels, reduction="none")
