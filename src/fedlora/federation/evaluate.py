"""Evaluation: the global model on a held-out set, or each client's personalised model on its own.

An `Evaluator` scores whatever state `view(glob)` returns (installed over the shared model with
`AdapterHandle.install`, base-weight changes included): the global model for shared methods,
one client's own model for personalised ones. `PersonalisedEvaluation` averages the clients.

Every evaluator is called as `evaluate(glob, full=True)`. With `federation.eval_examples = k > 0`
a held-out set larger than k is wrapped in `Subsampled`: `full=False` (rounds before the last)
scores a fixed stratified subset of k of its examples (`stratified_subset`) and says so with
`<prefix>_examples = k`; `full=True` (the last round, the summary's scores) scores all of them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.data.batching import collate, eval_batches
from fedlora.device import device_of, to_device
from fedlora.methods.base import GlobalState, State
from fedlora.model import AdapterHandle


def global_view(initial: State) -> Callable[[GlobalState], State]:
    """The global model: its adapter and base changes over the initial adapter."""
    return lambda glob: {**initial, **glob.tensors()}


def stratified_subset(strata: Sequence[Hashable], size: int, seed: int) -> list[int]:
    """`size` of the positions 0..n−1 (sorted), drawn without replacement, stratified; all when
    `size` ≥ n.

    A stratum s with n_s examples gets ⌊size·n_s/n⌋ of them, and the size − Σ⌊·⌋ examples left
    go one each to the strata with the largest remainders size·n_s mod n (ties: the stratum seen
    first) — so the subset has exactly `size` examples and each stratum's count is within one of
    its proportional share. Within a stratum the examples are a uniform draw from
    `numpy.random.default_rng(seed)`: the same seed gives the same subset.
    """
    n = len(strata)
    if size >= n:
        return list(range(n))
    groups: dict[Hashable, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    members = list(groups.values())  # in order of first appearance: deterministic
    take = [size * len(m) // n for m in members]
    by_remainder = sorted(range(len(members)), key=lambda j: (-(size * len(members[j]) % n), j))
    for j in by_remainder[:size - sum(take)]:
        take[j] += 1
    rng = np.random.default_rng(seed)
    chosen = [i for m, t in zip(members, take) for i in rng.permutation(m)[:t].tolist()]
    return sorted(chosen)


def personal_share(eval_examples: int, clients: int) -> int:
    """Each client's part of `federation.eval_examples` when every client scores its own model:
    an equal share, ⌈k / clients⌉, because the reported score is the unweighted mean over
    clients (each term then has the same precision). 0 (the whole set) stays 0."""
    return math.ceil(eval_examples / clients) if eval_examples else 0


class Subsampled:
    """One held-out set, scored on a fixed subset of its examples unless `full`.

    `whole` and `part` are evaluators of the same kind, on all the examples and on the
    `len(part)` chosen ones; a subset's scores carry `<prefix>_examples` so that nobody takes
    them for the whole set's.
    """

    def __init__(self, whole, part, prefix: str = "test"):
        self.whole, self.part, self.prefix = whole, part, prefix

    def __len__(self) -> int:
        return len(self.whole)

    def __call__(self, glob: GlobalState, full: bool = True) -> dict[str, float]:
        if full:
            return self.whole(glob)
        return {**self.part(glob), f"{self.prefix}_examples": len(self.part)}


class Evaluator:
    """Accuracy and mean cross-entropy of one model on fixed examples.

    Batches are bucketed by length so padding is minimal; the model is the shared one, with
    `view(glob)` installed on it (or, given `initial`, the global adapter over the initial one).
    """

    def __init__(self, handle: AdapterHandle, initial: State, token_ids: list[list[int]],
                 labels: list[int], pad_id: int, batch_size: int, prefix: str = "test",
                 view: Callable[[GlobalState], State] | None = None):
        self.handle = handle
        self.view = view or global_view(initial)
        self.token_ids = token_ids
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.pad_id = pad_id
        self.prefix = prefix
        self.batches = eval_batches([len(t) for t in token_ids], batch_size)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __call__(self, glob: GlobalState, full: bool = True) -> dict[str, float]:
        """Scores on all its examples (`full` is the protocol's: see `Subsampled`)."""
        self.handle.install(self.view(glob))
        predictions, loss = self.predict()
        accuracy = (predictions == self.labels).float().mean().item()
        return {f"{self.prefix}_accuracy": accuracy, f"{self.prefix}_loss": loss}

    @torch.no_grad()
    def predict(self) -> tuple[torch.Tensor, float]:
        model = self.handle.model
        model.eval()
        preds = torch.empty(len(self.token_ids), dtype=torch.long)
        total = 0.0
        for idx in self.batches:
            batch = to_device(collate(self.token_ids, idx, self.pad_id), device_of(model))
            logits = model(**batch).logits.cpu()  # (n, labels): scored on the CPU
            target = self.labels[idx]
            total += F.cross_entropy(logits, target, reduction="sum").item()
            preds[idx] = logits.argmax(-1)
        return preds, total / max(1, len(self.token_ids))


class PersonalisedEvaluation:
    """Each client's own model on its own held-out examples.

    Reports `<prefix>_accuracy` / `<prefix>_loss` as the unweighted mean over clients (each
    client counts once, whatever its size) and `<prefix>_accuracy_per_client` /
    `<prefix>_loss_per_client` in client order. When some client scored a subset (`full=False`),
    `<prefix>_examples` is the number of examples scored over all clients.
    """

    def __init__(self, evaluators: list, prefix: str = "test"):
        self.evaluators = evaluators
        self.prefix = prefix

    def __len__(self) -> int:
        return sum(len(e) for e in self.evaluators)

    def __call__(self, glob: GlobalState, full: bool = True) -> dict[str, float | list[float]]:
        scores = [e(glob, full=full) for e in self.evaluators]
        acc = [s[f"{e.prefix}_accuracy"] for s, e in zip(scores, self.evaluators)]
        loss = [s[f"{e.prefix}_loss"] for s, e in zip(scores, self.evaluators)]
        p = self.prefix
        out = {f"{p}_accuracy": sum(acc) / len(acc), f"{p}_loss": sum(loss) / len(loss),
               f"{p}_accuracy_per_client": acc, f"{p}_loss_per_client": loss}
        counted = [s.get(f"{e.prefix}_examples") for s, e in zip(scores, self.evaluators)]
        if any(c is not None for c in counted):
            out[f"{p}_examples"] = sum(len(e) if c is None else c
                                       for c, e in zip(counted, self.evaluators))
        return out
