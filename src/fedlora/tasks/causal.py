"""Prompt → answer with a causal LM: loss on the answer tokens, exact match of greedy answers.

Pairs come from a JSONL/CSV file (`data.text_column` = prompt, `data.label_column` = answer) or
a generator (`data.path = "gsm"` / `"arithmetic"`, `data.max_examples` pairs from the run's seed).
Each pair is `prompt (in the chat template) + answer + eos`; a client's target for pair i is
where its answer starts. See `fedlora.causal` for the loss, generation and export.
"""

from __future__ import annotations

from pathlib import Path

from fedlora.causal.evaluate import GenerationEvaluator
from fedlora.causal.generate import get_scorer
from fedlora.causal.loss import causal_lm_loss
from fedlora.causal.model import export_merged, load_causal_lm
from fedlora.causal.prompts import PromptFormat, encode_pairs
from fedlora.data.pairs import PairDataset, load_pairs
from fedlora.tasks.base import Task


class CausalTask(Task):
    kind = "causal"
    metric = "exact match"
    peft_task_type = "CAUSAL_LM"

    def __init__(self, config):
        super().__init__(config)
        self.fmt: PromptFormat | None = None
        self.scorer = get_scorer(config.task.scorer)  # a missing scorer fails before anything runs

    def load_data(self) -> PairDataset:
        d = self.config.data
        group = d.group_column if d.partition == "group" else None
        # a generator draws data.max_examples pairs from the run's seed: the same pairs as
        # `fedlora data NAME --size N --seed SEED` writes to a file
        pairs = load_pairs(d.path, d.text_column, d.label_column, group,
                           size=d.max_examples, seed=self.config.seed)
        return self.subsample(pairs)

    def load_model(self, path: str, num_labels: int):
        return load_causal_lm(path)

    def encode(self, tokenizer, dataset: PairDataset):
        self.fmt = PromptFormat.of(tokenizer, self.config.task.chat_template)
        return encode_pairs(self.fmt, dataset.prompts, dataset.answers, self.config.model.max_length)

    def loss(self, model, token_ids, targets, idx, pad_id):
        return causal_lm_loss(model, token_ids, targets, idx, pad_id)

    def evaluator(self, base, dataset, positions, token_ids, targets, prefix, view=None):
        t = self.config.task
        return GenerationEvaluator(
            base.handle, base.initial, [token_ids[i] for i in positions],
            [targets[i] for i in positions], [dataset.answers[i] for i in positions], self.fmt,
            base.pad_id, self.config.train.eval_batch_size, t.max_new_tokens, self.scorer,
            prefix, view=view)

    def strata(self, dataset: PairDataset, positions: list[int]) -> list:
        """Pairs have no label: a subset keeps the groups' (difficulties') shares, if loaded."""
        if dataset.groups is None:
            return super().strata(dataset, positions)
        return [dataset.groups[i] for i in positions]

    def export(self, model, tokenizer, folder: Path) -> None:
        if self.config.task.export_merged:
            export_merged(model, tokenizer, folder / "merged")

    def describe_client(self, client, dataset):
        answer = sum(len(ids) - s for ids, s in zip(client.token_ids, client.labels))
        return (f"{client.num_examples:5d} pairs, {answer / max(1, client.num_examples):.1f} "
                "answer tokens each")
