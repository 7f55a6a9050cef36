"""Text → label with an encoder and a fresh head: the default task."""

from __future__ import annotations

import math

from fedlora.data.batching import encode
from fedlora.data.sources import TextDataset, load_dataset
from fedlora.federation.client import classification_loss
from fedlora.federation.evaluate import Evaluator
from fedlora.model import load_classifier
from fedlora.tasks.base import Task


class ClassificationTask(Task):
    kind = "classification"
    metric = "accuracy"
    peft_task_type = "SEQ_CLS"

    def load_data(self) -> TextDataset:
        d = self.config.data
        group = d.group_column if d.partition == "group" else None
        return self.subsample(load_dataset(d.path, text_column=d.text_column,
                                           label_column=d.label_column, group_column=group))

    def load_model(self, path: str, num_labels: int):
        return load_classifier(path, num_labels, self.config.seed, self.config.model.pooling)

    def encode(self, tokenizer, dataset: TextDataset):
        return encode(tokenizer, dataset.texts, self.config.model.max_length), list(dataset.labels)

    def loss(self, model, token_ids, targets, idx, pad_id):
        return classification_loss(model, token_ids, targets, idx, pad_id)

    def evaluator(self, base, dataset, positions, token_ids, targets, prefix, view=None):
        return Evaluator(base.handle, base.initial, [token_ids[i] for i in positions],
                         [targets[i] for i in positions], base.pad_id,
                         self.config.train.eval_batch_size, prefix, view=view)

    def baseline(self, dataset, train, test):
        """Test accuracy of always predicting the most common training label."""
        labels = [dataset.labels[i] for i in train]
        majority = max(set(labels), key=labels.count)
        return sum(1 for i in test if dataset.labels[i] == majority) / len(test) if test else math.nan

    def describe_client(self, client, dataset):
        names = dataset.label_names
        counts = [0] * len(names)
        for y in client.labels:
            counts[y] += 1
        shown = " ".join(f"{n}={k}" for n, k in zip(names, counts))
        return f"{client.num_examples:5d} examples ({shown})"
