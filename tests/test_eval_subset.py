"""`federation.eval_examples`: rounds before the last score a fixed stratified subset of the
held-out set, the last round (and the summary) the whole set.

References: the subset's per-class counts against a largest-remainder apportionment computed
with exact fractions; every round's scores against a direct `Evaluator` (or
`GenerationEvaluator`) built on exactly the expected examples; the summary against a
whole-set evaluation of the exported adapter.
"""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import _client_view, build_experiment
from fedlora.federation.evaluate import (Evaluator, Subsampled, personal_share,
                                         stratified_subset)
from fedlora.federation.server import FederationState, RoundPlan, run_rounds
from fedlora.federation.simulation import InProcessTransport
from fedlora.seeding import derive_seed


# ------------------------------------------------------------------ the subset itself
def _apportion(strata: list, size: int) -> dict:
    """Largest-remainder (Hamilton) apportionment of `size` seats, with exact fractions; ties
    go to the stratum seen first."""
    counts = Counter(strata)
    order = list(dict.fromkeys(strata))
    n = len(strata)
    quota = {s: Fraction(size * counts[s], n) for s in order}
    seats = {s: int(q) for s, q in quota.items()}  # floor: quotas are ≥ 0
    left = size - sum(seats.values())
    for s in sorted(order, key=lambda s: (-(quota[s] - seats[s]), order.index(s)))[:left]:
        seats[s] += 1
    return seats


@pytest.mark.parametrize("counts, size", [((60, 30, 10), 17), ((5, 5), 3), ((1, 1, 1, 97), 10),
                                         ((40, 41), 80), ((7,), 3), ((3, 9, 1), 13)])
def test_subset_has_the_size_and_the_class_shares(counts, size):
    strata = [c for c, k in enumerate(counts) for _ in range(k)]
    rng = torch.Generator().manual_seed(sum(counts))
    strata = [strata[i] for i in torch.randperm(len(strata), generator=rng).tolist()]  # interleaved
    chosen = stratified_subset(strata, size, seed=5)
    assert len(chosen) == min(size, len(strata)) and len(set(chosen)) == len(chosen)
    assert chosen == sorted(chosen) and all(0 <= i < len(strata) for i in chosen)
    got = Counter(strata[i] for i in chosen)
    want = _apportion(strata, min(size, len(strata)))
    assert {s: got.get(s, 0) for s in want} == want
    for s, k in Counter(strata).items():  # within one example of the proportional share
        assert abs(got.get(s, 0) - Fraction(size * k, len(strata))) < 1


def test_subset_is_fixed_by_the_seed():
    strata = [i % 3 for i in range(300)]
    a, b = stratified_subset(strata, 40, seed=11), stratified_subset(strata, 40, seed=11)
    assert a == b
    assert stratified_subset(strata, 40, seed=12) != a  # another seed, another draw


def test_subset_larger_than_the_set_is_the_whole_set():
    assert stratified_subset([0, 1, 1], 3, seed=0) == [0, 1, 2]
    assert stratified_subset([0, 1, 1], 99, seed=0) == [0, 1, 2]


def test_personal_share_splits_the_budget_equally():
    assert personal_share(512, 3) == 171 and personal_share(12, 3) == 4
    assert personal_share(0, 3) == 0  # the whole set stays the whole set


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("value, fragment", [
    ("-1", "federation.eval_examples must be ≥ 0"),
    ("1.5", "federation.eval_examples must be an integer"),
    ("many", "federation.eval_examples must be an integer"),
])
def test_bad_eval_examples_are_refused(value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [f"federation.eval_examples={value}"])


def test_default_job_scores_a_subset_of_512():
    assert load_config().federation.eval_examples == 512


# ------------------------------------------------------------------ the round loop
def _run_loop(exp, on_round):
    f = exp.config.federation
    plan = RoundPlan(f.rounds, f.clients, f.clients_per_round, f.eval_every, exp.config.seed)
    state = FederationState(glob=exp.method.init_global(exp.initial))
    run_rounds(exp.method, state, InProcessTransport(exp.trainer, exp.clients), plan,
               exp.evaluate, lambda record: on_round(record, state))
    return state


def _direct(exp, positions, glob, prefix="test", view=None):
    """A plain evaluator on exactly `positions`, built here, not by the code under test."""
    tokens, targets = exp.task.encode(exp.tokenizer, exp.dataset)
    e = Evaluator(exp.trainer.handle, exp.initial, [tokens[i] for i in positions],
                  [targets[i] for i in positions], exp.trainer.pad_id,
                  exp.config.train.eval_batch_size, prefix, view=view)
    return e(glob)


def test_rounds_before_the_last_score_the_subset_and_the_last_the_whole_set(tiny_overrides):
    config = load_config(None, tiny_overrides + ["federation.rounds=3", "federation.eval_examples=16",
                                                 "data.validation_fraction=0.25"])
    exp = build_experiment(config)
    test, val = exp.split.test, exp.split.validation
    assert len(test) > 16 and len(val) > 16
    labels = exp.dataset.labels
    want = {p: [idx[i] for i in stratified_subset([labels[j] for j in idx], 16,
                                                  derive_seed(config.seed, "eval", p))]
            for p, idx in (("test", test), ("validation", val))}
    # stratified: each label's share of the subset is its share of the test set, within one
    for label, k in Counter(labels[i] for i in test).items():
        got = sum(labels[i] == label for i in want["test"])
        assert abs(got - Fraction(16 * k, len(test))) < 1
    seen = []

    def check(record, state):
        last = record["round"] == config.federation.rounds
        for p, whole in (("test", test), ("validation", val)):
            direct = _direct(exp, whole if last else want[p], state.glob, p)
            assert record[f"{p}_accuracy"] == pytest.approx(direct[f"{p}_accuracy"], abs=1e-7)
            assert record[f"{p}_loss"] == pytest.approx(direct[f"{p}_loss"], rel=1e-6)
            assert record.get(f"{p}_examples") == (None if last else 16)
        seen.append(record["round"])

    _run_loop(exp, check)
    assert seen == [1, 2, 3]


def test_same_seed_same_subset_another_seed_another(tiny_overrides):
    def subset_tokens(seed):
        exp = build_experiment(load_config(None, tiny_overrides + [
            "federation.eval_examples=16", f"seed={seed}"]))
        assert isinstance(exp.evaluators[0], Subsampled)
        return exp.evaluators[0].part.token_ids, exp.split.test

    (a, test_a), (b, test_b) = subset_tokens(0), subset_tokens(0)
    assert a == b and len(a) == 16
    c, _ = subset_tokens(1)
    assert c != a


def test_a_subset_larger_than_the_set_is_the_whole_set(tiny_overrides):
    config = load_config(None, tiny_overrides + ["federation.eval_examples=10000"])
    exp = build_experiment(config)
    assert not isinstance(exp.evaluators[0], Subsampled)

    def check(record, state):
        direct = _direct(exp, exp.split.test, state.glob)
        assert record["test_accuracy"] == pytest.approx(direct["test_accuracy"], abs=1e-7)
        assert record["test_loss"] == pytest.approx(direct["test_loss"], rel=1e-6)
        assert "test_examples" not in record

    _run_loop(exp, check)


def test_summary_is_the_whole_set_score_of_the_final_adapter(tiny_overrides, tmp_path):
    from safetensors.torch import load_file

    overrides = tiny_overrides + ["federation.rounds=3", "federation.eval_examples=12",
                                  "federation.evaluate_initial=true"]
    summary = fedlora.run(None, tmp_path / "run", overrides=overrides, progress=None)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("test_examples") for r in records] == [12, 12, None]
    exp = build_experiment(load_config(tmp_path / "run" / "config.toml"))
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    exp.trainer.handle.install({k: saved[k] for k in exp.initial})
    evaluator = exp.evaluators[0].whole  # the exported adapter on every test example
    preds, loss = evaluator.predict()
    accuracy = (preds == evaluator.labels).float().mean().item()
    assert len(evaluator) == len(exp.split.test) > 12
    assert summary["test_accuracy"] == pytest.approx(accuracy, abs=1e-7)
    assert summary["test_loss"] == pytest.approx(loss, rel=1e-5)
    # the starting model is scored on the whole set too: it sits beside the final score
    initial = summary["initial"]
    assert "test_examples" not in initial
    direct = _direct(exp, exp.split.test, exp.method.init_global(exp.initial))
    assert initial["test_accuracy"] == pytest.approx(direct["test_accuracy"], abs=1e-7)


def test_progress_line_marks_a_subset_score(tiny_overrides, tmp_path):
    lines = []
    fedlora.run(None, tmp_path / "run", progress=lines.append,
                overrides=tiny_overrides + ["federation.eval_examples=12"])
    rounds = [x for x in lines if x.startswith("round ")]
    assert "test acc≈" in rounds[0] and "(12 examples)" in rounds[0]
    assert "test acc " in rounds[1] and "≈" not in rounds[1] and "examples)" not in rounds[1]


def test_personalised_clients_score_equal_shares_of_their_own_sets(tiny_overrides):
    config = load_config(None, tiny_overrides + ["method.head=local", "federation.eval_examples=12"])
    exp = build_experiment(config)
    share = 4  # ⌈12 / 3 clients⌉
    labels = exp.dataset.labels
    parts = exp.split.client_test
    assert all(len(p) > share for p in parts)
    want = [[p[i] for i in stratified_subset([labels[j] for j in p], share,
                                             derive_seed(config.seed, "eval", "test", k))]
            for k, p in enumerate(parts)]

    def check(record, state):
        last = record["round"] == config.federation.rounds
        for k, client in enumerate(exp.clients):
            view = _client_view(exp.method, exp.initial, client)
            direct = _direct(exp, parts[k] if last else want[k], state.glob, view=view)
            assert record["test_accuracy_per_client"][k] == pytest.approx(
                direct["test_accuracy"], abs=1e-7)
            assert record["test_loss_per_client"][k] == pytest.approx(direct["test_loss"], rel=1e-6)
        assert record.get("test_examples") == (None if last else 3 * share)

    _run_loop(exp, check)


def test_causal_generation_scores_a_subset_before_the_last_round(causal_overrides, tmp_path):
    from fedlora.causal.evaluate import GenerationEvaluator

    config = load_config(None, causal_overrides + ["federation.eval_examples=4"])
    exp = build_experiment(config)
    wrapped = exp.evaluators[0]
    assert isinstance(wrapped, Subsampled) and isinstance(wrapped.part, GenerationEvaluator)
    test = exp.split.test
    want = [test[i] for i in stratified_subset([0] * len(test), 4,
                                               derive_seed(config.seed, "eval", "test"))]
    tokens, starts = exp.task.encode(exp.tokenizer, exp.dataset)

    def check(record, state):
        last = record["round"] == config.federation.rounds
        idx = test if last else want
        direct = GenerationEvaluator(
            exp.trainer.handle, exp.initial, [tokens[i] for i in idx], [starts[i] for i in idx],
            [exp.dataset.answers[i] for i in idx], exp.task.fmt, exp.trainer.pad_id, 16,
            config.task.max_new_tokens, exp.task.scorer)(state.glob)
        assert record["test_accuracy"] == pytest.approx(direct["test_accuracy"], abs=1e-9)
        assert record["test_loss"] == pytest.approx(direct["test_loss"], rel=1e-5)
        assert record.get("test_examples") == (None if last else 4)

    _run_loop(exp, check)
