"""Everything a run needs, built and checked before a single file is written.

data → held-out test (and validation) → client partition → tokens → base model + LoRA →
method → each client's DP plan. Any bad input fails here, with one clear message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.config import Config
from fedlora.data.batching import encode
from fedlora.device import resolve_device
from fedlora.data.pairs import PairDataset
from fedlora.data.partition import label_counts, partition
from fedlora.data.sources import TextDataset, split_holdout
from fedlora.errors import ConfigError, DataError
from fedlora.federation.centering import centering_enabled
from fedlora.federation.client import Client, LocalTrainer
from fedlora.federation.evaluate import (Evaluator, PersonalisedEvaluation, Subsampled,
                                        personal_share, stratified_subset)
from fedlora.methods import get_method
from fedlora.methods.base import Method, State
from fedlora.model import (AdapterHandle, attach_lora, enable_gradient_checkpointing, load_tokenizer,
                           resolve_model_path)
from fedlora.privacy.plan import plan_client_privacy
from fedlora.privacy.randomness import randomness_for
from fedlora.seeding import derive_seed
from fedlora.tasks import get_task
from fedlora.tasks.base import Task


@dataclass
class Split:
    """Positions into the data set: the held-out test set, validation set, and each client's part."""

    test: list[int]
    validation: list[int]
    clients: list[list[int]]
    client_test: list[list[int]] | None = None  # personalised: each client's own held-out part


@dataclass
class Experiment:
    config: Config
    dataset: TextDataset
    split: Split
    method: Method
    model: torch.nn.Module
    initial: State
    trainer: LocalTrainer
    clients: list[Client]
    evaluators: list[Evaluator]
    model_path: str
    task: Task
    tokenizer: object

    def evaluate(self, glob, full: bool = True) -> dict[str, float]:
        return evaluate_all(self.evaluators, glob, full)


def evaluate_all(evaluators: list, glob, full: bool = True) -> dict[str, float]:
    """Every evaluator's scores in one dict; `full=False` lets each score its fixed subset."""
    scores: dict[str, float] = {}
    for evaluator in evaluators:
        scores.update(evaluator(glob, full=full))
    return scores


def split_data(dataset: TextDataset, config: Config, personalised: bool = False) -> Split:
    """Stratified test (and validation) hold-out, then the client partition of the rest.

    Personalised models are tested on their own clients' data instead: the whole set is
    partitioned, then each client holds out `data.test_fraction` of its own examples (stratified).
    """
    d, seed = config.data, config.seed
    labels = dataset.labels
    if personalised:
        parts = partition(labels, clients=config.federation.clients, scheme=d.partition,
                          seed=derive_seed(seed, "partition"), alpha=d.dirichlet_alpha,
                          groups=dataset.groups if d.partition == "group" else None)
        train, test = [], []
        for k, part in enumerate(parts):
            kept, held = split_holdout([labels[i] for i in part], d.test_fraction,
                                       derive_seed(seed, "test", k))
            train.append([part[i] for i in kept])
            test.append([part[i] for i in held])
        return Split(test=[], validation=[], clients=train, client_test=test)
    pool, test = split_holdout(labels, d.test_fraction, derive_seed(seed, "test"))
    validation: list[int] = []
    if d.validation_fraction > 0:
        share = d.validation_fraction / (1 - d.test_fraction)
        kept, held = split_holdout([labels[i] for i in pool], share, derive_seed(seed, "validation"))
        validation = [pool[i] for i in held]
        pool = [pool[i] for i in kept]
    groups = [dataset.groups[i] for i in pool] if d.partition == "group" else None
    parts = partition([labels[i] for i in pool], clients=config.federation.clients,
                      scheme=d.partition, seed=derive_seed(seed, "partition"),
                      alpha=d.dirichlet_alpha, groups=groups)
    return Split(test=test, validation=validation, clients=[[pool[i] for i in p] for p in parts])


def load_data(config: Config, task: Task | None = None) -> TextDataset | PairDataset:
    """The task's data set (`data.max_examples` of it, drawn at random, if set)."""
    dataset = (task or get_task(config)).load_data()
    if config.federation.clients > len(dataset):
        raise DataError(f"federation.clients={config.federation.clients} is more than the "
                        f"{len(dataset)} examples in the data — use fewer clients or more data")
    return dataset


@dataclass
class Base:
    """What every process of a run builds for itself: the frozen base model with LoRA attached
    (A and the head drawn from the run's seed, so every process holds the identical initial
    adapter), the tokenizer's padding id, and the method."""

    model: torch.nn.Module
    handle: AdapterHandle
    initial: State
    method: Method
    tokenizer: object
    pad_id: int
    model_path: str
    task: Task

    def encode(self, texts: list[str], config: Config) -> list[list[int]]:
        return encode(self.tokenizer, texts, config.model.max_length)


def build_base(config: Config, num_labels: int = 0, method: Method | None = None,
               task: Task | None = None) -> Base:
    """`num_labels`: the classifier head's size (unused by a causal LM)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)  # a missing GPU stops here, before any loading
    task = task or get_task(config)
    model_path = resolve_model_path(config.model.path)
    tokenizer = load_tokenizer(model_path)
    pad_id = pad_id_of(tokenizer)
    model = task.load_model(model_path, num_labels)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # the head and LoRA's A are drawn on the CPU from the run's seed (identical whatever the
    # device), then the whole model moves once; the handle is taken after the move
    model = attach_lora(model, config.method, config.seed, task.peft_task_type)
    method = method or get_method(config.method)
    method.extend_model(model, config)  # before the handle reads the model's tensors
    model = model.to(device)
    handle = AdapterHandle.of(model)
    return Base(model, handle, handle.state(), method, tokenizer, pad_id, model_path, task)


def pad_id_of(tokenizer) -> int:
    """Padding never reaches a loss or a prediction (masked, or after a causal sequence), so any
    id does; the tokenizer's own, else its end-of-sequence token, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def build_trainer(config: Config, base: Base) -> LocalTrainer:
    return LocalTrainer(base.model, base.method, config.train, config.federation.local_steps,
                        base.pad_id, base.initial, loss=base.method.example_loss(base.task.loss),
                        rounds=config.federation.rounds)


def build_client(config: Config, cid: int, token_ids: list[list[int]], labels: list[int]) -> Client:
    """One data owner with its DP plan: σ calibrated for every round it could take part in."""
    f = config.federation
    center = config.model.center_examples if centering_enabled(config) else 0
    privacy = plan_client_privacy(config.privacy, len(labels), config.train.batch_size,
                                  f.rounds * f.local_steps, center)
    return Client(cid=cid, token_ids=token_ids, labels=labels, privacy=privacy, seed=config.seed,
                  randomness=randomness_for(config.privacy.noise, config.seed, cid))


def build_evaluators(config: Config, base: Base, dataset: TextDataset,
                     held_out: dict[str, list[int]], tokens: dict[int, list[int]],
                     targets: dict[int, int] | None = None) -> list[Evaluator]:
    """The global model on held-out examples: one evaluator per non-empty `{prefix: positions}`.
    `targets` are the task's per-example targets (default: the data set's labels)."""
    targets = targets if targets is not None else dict(enumerate(dataset.labels))
    return [held_out_evaluator(config, base, dataset, idx, tokens, targets, prefix,
                               config.federation.eval_examples, (prefix,))
            for prefix, idx in held_out.items() if idx]


def held_out_evaluator(config: Config, base: Base, dataset, positions: list[int], tokens: dict,
                       targets: dict, prefix: str, size: int, tags: tuple, view=None):
    """The task's evaluator on `positions`; when 0 < `size` < len(positions), wrapped so that
    rounds before the last score a fixed stratified subset of `size` of them (`Subsampled`),
    drawn from the run's seed and `tags` (the same subset in every round and every run)."""
    whole = base.task.evaluator(base, dataset, positions, tokens, targets, prefix, view=view)
    if not 0 < size < len(positions):
        return whole
    chosen = stratified_subset(base.task.strata(dataset, positions), size,
                               derive_seed(config.seed, "eval", *tags))
    part = base.task.evaluator(base, dataset, [positions[i] for i in chosen], tokens, targets,
                               prefix, view=view)
    return Subsampled(whole, part, prefix)


def build_experiment(config: Config) -> Experiment:
    """The in-process simulation: the server side and every client, in one process."""
    if config.federation.secure_aggregation:
        # refused, not simulated: the in-process server holds every client's data and state,
        # so masking the uploads it sums would protect nothing and measure nothing real
        raise ConfigError("federation.secure_aggregation is a deployment feature (Flower: "
                          "`fedlora flower app ...` then `flwr run`); the in-process simulation's "
                          "server is trusted and holds every client's data — set "
                          "federation.secure_aggregation=false to simulate")
    task = get_task(config)
    dataset = load_data(config, task)
    method = get_method(config.method)
    split = split_data(dataset, config, method.personalised)
    _check_labels_seen(dataset, split)
    base = build_base(config, dataset.num_labels, method, task)
    ids, target_list = task.encode(base.tokenizer, dataset)
    tokens, targets = dict(enumerate(ids)), dict(enumerate(target_list))
    trainer = build_trainer(config, base)
    clients = [build_client(config, cid, [tokens[i] for i in part], [targets[i] for i in part])
               for cid, part in enumerate(split.clients)]
    if split.client_test is not None:
        share = personal_share(config.federation.eval_examples, config.federation.clients)
        evaluators = [PersonalisedEvaluation([
            held_out_evaluator(config, base, dataset, part, tokens, targets, "test", share,
                               ("test", client.cid),
                               view=_client_view(method, base.initial, client))
            for client, part in zip(clients, split.client_test)])]
    else:
        evaluators = build_evaluators(config, base, dataset, {"test": split.test}, tokens, targets)
    evaluators += build_evaluators(config, base, dataset, {"validation": split.validation}, tokens,
                                   targets)
    return Experiment(config, dataset, split, method, base.model, base.initial, trainer,
                      clients, evaluators, base.model_path, task, base.tokenizer)


def _client_view(method: Method, initial: State, client: Client):
    """Client `client`'s own model: what it would install (its personal tensors included)."""
    def view(glob):
        download = method.download(glob, client.cid)
        return method.client_state(initial, client.personal, download, client.cid)
    return view


def _check_labels_seen(dataset: TextDataset, split: Split) -> None:
    trained = {dataset.labels[i] for part in split.clients for i in part}
    missing = sorted({dataset.labels[i] for i in test_positions(split)} - trained)
    if missing:
        names = [dataset.label_names[i] for i in missing]
        raise DataError(f"labels {names} appear only in the test set — every class needs "
                        "training examples; add data or lower data.test_fraction")


def partition_report(exp: Experiment) -> dict:
    ds, split = exp.dataset, exp.split
    counts = label_counts(ds.labels, split.clients, ds.num_labels)
    return {
        "scheme": exp.config.data.partition,
        "dirichlet_alpha": exp.config.data.dirichlet_alpha,
        "seed": exp.config.seed,
        "label_names": ds.label_names,
        "test_size": len(test_positions(split)),
        "validation_size": len(split.validation),
        "test_label_counts": label_counts(ds.labels, [test_positions(split)], ds.num_labels)[0],
        "clients": [
            {"client": k, "size": len(part), "label_counts": counts[k], "indices": part,
             **({"test_indices": split.client_test[k]} if split.client_test is not None else {})}
            for k, part in enumerate(split.clients)
        ],
    }


def test_positions(split: Split) -> list[int]:
    """Every held-out test example: the global test set, or all clients' own held-out parts."""
    if split.client_test is not None:
        return sorted(i for part in split.client_test for i in part)
    return split.test


def majority_accuracy(exp: Experiment) -> float | None:
    """The task's trivial score to beat: for a classifier, the test accuracy of always predicting
    the most common training label; None for a causal LM."""
    train = [i for part in exp.split.clients for i in part]
    return exp.task.baseline(exp.dataset, train, test_positions(exp.split))
