"""Evaluation: the global model on a held-out set, or each client's personalised model on its own.

An `Evaluator` scores whatever state `view(glob)` returns (installed over the shared model with
`AdapterHandle.install`, base-weight changes included): the global model for shared methods,
one client's own model for personalised ones. `PersonalisedEvaluation` averages the clients.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fedlora.data.batching import collate, eval_batches
from fedlora.device import device_of, to_device
from fedlora.methods.base import GlobalState, State
from fedlora.model import AdapterHandle


def global_view(initial: State) -> Callable[[GlobalState], State]:
    """The global model: its adapter and base changes over the initial adapter."""
    return lambda glob: {**initial, **glob.tensors()}


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

    def __call__(self, glob: GlobalState) -> dict[str, float]:
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
    `<prefix>_loss_per_client` in client order.
    """

    def __init__(self, evaluators: list[Evaluator], prefix: str = "test"):
        self.evaluators = evaluators
        self.prefix = prefix

    def __call__(self, glob: GlobalState) -> dict[str, float | list[float]]:
        scores = [e(glob) for e in self.evaluators]
        acc = [s[f"{e.prefix}_accuracy"] for s, e in zip(scores, self.evaluators)]
        loss = [s[f"{e.prefix}_loss"] for s, e in zip(scores, self.evaluators)]
        p = self.prefix
        return {f"{p}_accuracy": sum(acc) / len(acc), f"{p}_loss": sum(loss) / len(loss),
                f"{p}_accuracy_per_client": acc, f"{p}_loss_per_client": loss}
