"""Evaluation of a causal LM on held-out prompt/answer pairs.

`<prefix>_accuracy` is the **exact match** of greedy generations (at most `task.max_new_tokens`
tokens) under the task's scorer; `<prefix>_loss` the mean over pairs of the answer-token loss
(`fedlora.causal.loss`), i.e. the training objective on held-out pairs.
"""

from __future__ import annotations

from typing import Callable

import torch

from fedlora.causal.generate import greedy_generate
from fedlora.causal.loss import causal_lm_loss
from fedlora.causal.prompts import PromptFormat
from fedlora.data.batching import eval_batches
from fedlora.federation.evaluate import global_view
from fedlora.methods.base import GlobalState, State
from fedlora.model import AdapterHandle


class GenerationEvaluator:
    def __init__(self, handle: AdapterHandle, initial: State, token_ids: list[list[int]],
                 starts: list[int], answers: list[str], fmt: PromptFormat, pad_id: int,
                 batch_size: int, max_new_tokens: int, scorer: Callable[[str, str], bool],
                 prefix: str = "test", view: Callable[[GlobalState], State] | None = None):
        self.handle = handle
        self.view = view or global_view(initial)
        self.token_ids, self.starts, self.answers = token_ids, starts, answers
        self.prompts = [ids[:s] for ids, s in zip(token_ids, starts)]
        self.fmt, self.pad_id = fmt, pad_id
        self.max_new_tokens, self.scorer, self.prefix = max_new_tokens, scorer, prefix
        self.batches = eval_batches([len(t) for t in token_ids], batch_size)
        self.generated_ids: list[list[int]] = []  # the last evaluation's answers (before eos)
        self.generations: list[str] = []  # ... decoded

    def __len__(self) -> int:
        return len(self.token_ids)

    def __call__(self, glob: GlobalState, full: bool = True) -> dict[str, float]:
        """Scores on all its pairs (`full` is the protocol's: see `federation.evaluate.Subsampled`)."""
        self.handle.install(self.view(glob))
        return {f"{self.prefix}_accuracy": self.exact_match(), f"{self.prefix}_loss": self.loss()}

    @torch.no_grad()
    def loss(self) -> float:
        model = self.handle.model
        model.eval()
        total = sum(float(causal_lm_loss(model, self.token_ids, self.starts, idx, self.pad_id).sum())
                    for idx in self.batches)
        return total / max(1, len(self.token_ids))

    def exact_match(self) -> float:
        self.generated_ids = greedy_generate(self.handle.model, self.prompts, self.pad_id,
                                             self.fmt.eos_id, self.max_new_tokens, self.batches)
        self.generations = [self.fmt.decode(g) for g in self.generated_ids]
        hits = sum(self.scorer(g, a) for g, a in zip(self.generations, self.answers))
        return hits / max(1, len(self.answers))
