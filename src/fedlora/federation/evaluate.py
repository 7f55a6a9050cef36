"""Server-side evaluation of the global adapter on a held-out set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlora.data.batching import collate, eval_batches
from fedlora.methods.base import GlobalState, State
from fedlora.model import AdapterHandle


class Evaluator:
    """Accuracy and mean cross-entropy of the global model on fixed examples.

    Batches are bucketed by length so padding is minimal; the model is the shared one, with the
    global adapter installed over the initial one (A from the seed for FFA-LoRA).
    """

    def __init__(self, handle: AdapterHandle, initial: State, token_ids: list[list[int]],
                 labels: list[int], pad_id: int, batch_size: int, prefix: str = "test"):
        self.handle = handle
        self.initial = initial
        self.token_ids = token_ids
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.pad_id = pad_id
        self.prefix = prefix
        self.batches = eval_batches([len(t) for t in token_ids], batch_size)

    def __call__(self, glob: GlobalState) -> dict[str, float]:
        self.handle.install({**self.initial, **glob.adapter})
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
            logits = model(**collate(self.token_ids, idx, self.pad_id)).logits
            target = self.labels[idx]
            total += F.cross_entropy(logits, target, reduction="sum").item()
            preds[idx] = logits.argmax(-1)
        return preds, total / max(1, len(self.token_ids))
