"""What is learnt from what: a text classifier, or a causal LM answering prompts.

A task supplies the pieces of a run that depend on what the model predicts — the data, the
model before LoRA, the tokens and per-example targets, the per-example loss, the evaluators,
the export — and nothing else: the round loop, the methods, DP-SGD and the accountant are the
same for every task. `task.kind` in the config picks one.

    load_data()                      → a data set with `.labels` (for the split) and `.groups`
    load_model(path, num_labels)     → the frozen base model, before LoRA
    encode(tokenizer, dataset)       → (token ids, targets) per example; targets feed `loss`
    loss(model, ids, targets, idx, pad_id) → the per-example losses L_i (1-D) DP-SGD clips
    evaluator(...)                   → `<prefix>_accuracy` (the task's `metric`) and `<prefix>_loss`
    export(model, tokenizer, folder) → extra files beside `adapter/`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlora.config import Config
    from fedlora.tasks.base import Task


def task_kinds() -> dict[str, type["Task"]]:
    """`task.kind` → its Task class; the names are `fedlora.config.TASKS`."""
    from fedlora.tasks.causal import CausalTask
    from fedlora.tasks.classification import ClassificationTask

    return {"classification": ClassificationTask, "causal": CausalTask}


def get_task(config: "Config") -> "Task":
    return task_kinds()[config.task.kind](config)
