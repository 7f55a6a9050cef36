"""The hand-written baseline fedlora is measured against: PEFT + Opacus + a FedAvg loop.

What a user writes without fedlora, following Opacus's own text-classification tutorial:
every text tokenised with `padding="max_length"`, a `DataLoader` per client, `PrivacyEngine
().make_private(...)` (Poisson sampling, per-example clipping to C, Gaussian noise σ·C, a
`GradSampleModule` computing per-example gradients with hooks), Opacus's `BatchMemoryManager`
to cut each logical batch into physical batches, and a server that averages the trained
tensors weighted by client size. Each client owns a copy of the PEFT model, wrapped once
(Opacus refuses to wrap a model twice), and its Adam state is reset every round, as in fedlora.

Same model, data, expected batch size, clip and σ as fedlora's clients: only the machinery
differs. On a GPU the model copies and every batch go to `device`, and Opacus draws its noise
there (it needs a generator on the gradients' device). Used by `benchmarks/throughput.py`; not
part of the package.

Two tasks, each with the loss a user writes: classification (cross-entropy of the label), and a
causal LM's prompt → answer pairs (each pair's mean cross-entropy over its answer tokens, the
other positions' labels set to −100, as transformers' own training examples do). Two of Opacus's
modes: `hooks` (its default: per-example gradients materialised by grad samplers) and `ghost`
(`grad_sample_mode="ghost"`: per-example norms from the layers' inputs and output gradients,
then a second backward pass with the clip factors; Opacus's fast mode for large trained
matrices).
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# Expected here, and printed on every step: Opacus's hooks on lora_B of the first layer, whose
# input needs no gradient (A and the embeddings are frozen); and the benchmark's seeded noise.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Secure RNG turned off")


IGNORE = -100  # the label cross-entropy skips: a prompt's or padding's position


def answer_labels(ids: Tensor, mask: Tensor, starts: list[int]) -> Tensor:
    """(n, L − 1) next-token labels of padded pairs: position t predicts token t + 1, which counts
    when it is an answer token (at or after the pair's answer start, before its padding)."""
    labels = ids[:, 1:].clone()
    position = torch.arange(1, ids.shape[1]).unsqueeze(0)
    start = torch.tensor(starts).unsqueeze(1)
    labels[(position < start) | (mask[:, 1:] == 0)] = IGNORE
    return labels


def pad_to_max_length(token_ids: list[list[int]], max_length: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """What `tokenizer(texts, padding="max_length", truncation=True, max_length=L)` returns for
    texts whose (truncated) token ids are `token_ids`: ids and attention mask, shape (n, L)."""
    ids = torch.full((len(token_ids), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), max_length), dtype=torch.long)
    for row, seq in enumerate(token_ids):
        ids[row, :len(seq)] = torch.as_tensor(seq[:max_length], dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


class OpacusClient:
    """One client: its own PEFT model copy, wrapped once by `make_private`."""

    def __init__(self, model: nn.Module, trainable: Callable[[str], bool], token_ids: list[list[int]],
                 labels: list[int], *, max_length: int, pad_id: int, batch_size: int,
                 physical_batch_size: int, noise_multiplier: float, clip: float, lr: float, seed: int,
                 device: torch.device | str = "cpu", task: str = "classification", mode: str = "hooks"):
        if task not in ("classification", "causal") or mode not in ("hooks", "ghost"):
            raise ValueError(f"task {task!r} / mode {mode!r}: expected classification|causal, hooks|ghost")
        self.task, self.mode = task, mode
        self.device = torch.device(device)
        model = copy.deepcopy(model).to(self.device)  # on its device before Opacus wraps it
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        ids, mask = pad_to_max_length(token_ids, max_length, pad_id)
        # a causal pair's `labels` entry is where its answer starts (fedlora's encoding)
        targets = (answer_labels(ids, mask, labels) if task == "causal"
                   else torch.tensor(labels, dtype=torch.long))
        loader = DataLoader(TensorDataset(ids, mask, targets), batch_size=batch_size)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.engine = PrivacyEngine(accountant="rdp")
        criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)
        made = self.engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=clip, poisson_sampling=True, grad_sample_mode=mode, criterion=criterion,
            noise_generator=torch.Generator(device=self.device).manual_seed(seed))
        if mode == "ghost":  # the criterion comes back wrapped: it runs both backward passes
            self.model, self.optimizer, self.criterion, self.loader = made
        else:
            (self.model, self.optimizer, self.loader), self.criterion = made, criterion
        self.physical_batch_size = physical_batch_size
        self.num_examples = len(labels)

    def params(self) -> dict[str, nn.Parameter]:
        named = dict(self.model._module.named_parameters())
        return {n: named[n] for n in self.names}

    def train(self, state: dict[str, Tensor], steps: int) -> tuple[dict[str, Tensor], int]:
        """`steps` DP-SGD steps starting from `state` (the trained tensors, by parameter name);
        returns the trained tensors and the number of examples processed."""
        params = self.params()
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
        self.optimizer.original_optimizer.state.clear()  # Adam restarts every round
        self.model.train()
        seen = done = 0
        with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=self.physical_batch_size,
                                optimizer=self.optimizer) as loader:
            while done < steps:
                for batch in loader:
                    input_ids, attention_mask, labels = (t.to(self.device) for t in batch)
                    self.optimizer.zero_grad()
                    logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                    self.loss(logits, labels).backward()
                    self.optimizer.step()
                    seen += len(labels)
                    if not self.optimizer._is_last_step_skipped:  # a logical batch ended
                        done += 1
                        if done == steps:
                            break
        return {n: p.detach().clone() for n, p in params.items()}, seen

    def loss(self, logits: Tensor, labels: Tensor):
        """The batch's mean over examples of each example's loss (a causal pair's: the mean over
        its answer tokens). Under `ghost` the wrapped criterion returns Opacus's loss object,
        whose backward() runs the norm pass and the clipped pass."""
        if self.task == "classification":
            return self.criterion(logits, labels)
        logits = logits[:, :-1]  # position t predicts token t + 1
        if self.mode == "ghost":  # Opacus averages each sequence's valid tokens, then the batch
            return self.criterion(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                  shape=logits.shape[:2])
        token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        valid = (labels != IGNORE).sum(1).clamp(min=1)
        return (token.sum(1) / valid).mean()


def fedavg(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """The server: Σ_k w_k·state_k / Σ_k w_k for every tensor."""
    total = float(sum(weights))
    return {k: sum(w * s[k] for s, w in zip(states, weights)) / total for k in states[0]}


class OpacusFederation:
    """FedAvg over `OpacusClient`s: each round every client trains from the global state."""

    def __init__(self, clients: list[OpacusClient]):
        self.clients = clients
        self.state = {n: p.detach().clone() for n, p in clients[0].params().items()}

    def round(self, steps: int, on_client: Callable[[float, float, int], None] | None = None,
              only: int | None = None) -> None:
        """One round (of the first `only` clients, if given); `on_client(wall seconds, CPU
        seconds, examples)` reports each client's local training."""
        states, weights = [], []
        for client in self.clients[:only]:
            wall, cpu = time.perf_counter(), time.process_time()
            trained, seen = client.train(self.state, steps)
            if client.device.type == "cuda":
                torch.cuda.synchronize(client.device)  # the GPU's queued work is the client's
            if on_client:
                on_client(time.perf_counter() - wall, time.process_time() - cpu, seen)
            states.append(trained)
            weights.append(client.num_examples)
        self.state = fedavg(states, weights)
