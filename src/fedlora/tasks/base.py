"""The task interface (see `fedlora.tasks`); subclasses fill it in."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
from torch import Tensor, nn

from fedlora.config import Config
from fedlora.seeding import derive_seed


class Task:
    kind: ClassVar[str]
    #: what `<prefix>_accuracy` measures, for people
    metric: ClassVar[str]
    #: PEFT's task type: whether LoRA comes with a trained head
    peft_task_type: ClassVar[str]

    def __init__(self, config: Config):
        self.config = config

    def load_data(self) -> Any:
        raise NotImplementedError

    def load_model(self, path: str, num_labels: int) -> nn.Module:
        raise NotImplementedError

    def encode(self, tokenizer: Any, dataset: Any) -> tuple[list[list[int]], list[int]]:
        raise NotImplementedError

    def loss(self, model: nn.Module, token_ids: list[list[int]], targets: list[int],
             idx: list[int], pad_id: int) -> Tensor:
        raise NotImplementedError

    def evaluator(self, base: Any, dataset: Any, positions: list[int], token_ids: dict,
                  targets: dict, prefix: str, view: Callable | None = None) -> Callable:
        raise NotImplementedError

    def strata(self, dataset: Any, positions: list[int]) -> list:
        """What a subset of held-out examples is stratified by (`federation.eval_examples`):
        their labels."""
        return [dataset.labels[i] for i in positions]

    def baseline(self, dataset: Any, train: list[int], test: list[int]) -> float | None:
        """A trivial predictor's score to beat (None where there is none)."""
        return None

    def export(self, model: nn.Module, tokenizer: Any, folder: Path) -> None:
        """Files beside `adapter/` in the run folder (none by default)."""

    def describe_client(self, client: Any, dataset: Any) -> str:
        return f"{client.num_examples:5d} examples"

    # ------------------------------------------------------------------ shared helpers
    def subsample(self, dataset: Any) -> Any:
        """`data.max_examples` examples drawn at random (seeded), or all of them."""
        n = self.config.data.max_examples
        if not n or n >= len(dataset):
            return dataset
        rng = np.random.default_rng(derive_seed(self.config.seed, "subsample"))
        return dataset.subset(sorted(rng.choice(len(dataset), size=n, replace=False).tolist()))
