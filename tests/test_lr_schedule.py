"""`train.lr_schedule`: each round's local rates are train.lr and train.head_lr times a factor
of the round, for every optimizer; the factor is checked against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

import fedlora
from fedlora.config import ConfigError, load_config
from fedlora.federation.client import LocalTrainer
from fedlora.optim.schedule import lr_factor


def test_cosine_factors_by_hand():
    # R = 4: ½(1 + cos(π r/4)) for r = 0..3 = 1, (1 + √2/2)/2, ½, (1 − √2/2)/2
    expected = [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2]
    assert [lr_factor("cosine", r, 4) for r in range(4)] == pytest.approx(expected, abs=1e-12)
    assert [lr_factor("constant", r, 4) for r in range(4)] == [1.0] * 4
    assert lr_factor("cosine", 0, 1) == 1.0  # a one-round run trains at train.lr
    with pytest.raises(ValueError, match="cosine"):
        lr_factor("linear", 0, 4)


def _rates(optimizer) -> list[float]:
    """The rates an optimizer will step at: torch's groups, or a LoRA optimizer's factor rate
    and its head Adam's rate."""
    if hasattr(optimizer, "rest"):
        head = [g["lr"] for g in optimizer.rest.param_groups] if optimizer.rest else []
        return [optimizer.lr, *head]
    return sorted(g["lr"] for g in optimizer.param_groups)


@pytest.mark.parametrize("extra", [
    ["method.name=ffa", "train.optimizer=adam"],
    ["method.name=lora", "train.optimizer=lora_rite"],
    ["method.name=galore"],
])
def test_each_round_builds_its_optimizer_at_the_scheduled_rates(tiny_overrides, tmp_path,
                                                               monkeypatch, extra):
    seen: dict[int, list[float]] = {}
    build = LocalTrainer._optimizer

    def recording(self, keys, round):
        optimizer = build(self, keys, round)
        seen.setdefault(round, _rates(optimizer))
        return optimizer

    monkeypatch.setattr(LocalTrainer, "_optimizer", recording)
    overrides = [*tiny_overrides, *extra, "federation.rounds=3", "train.lr=0.02",
                 "train.head_lr=0.05", "train.lr_schedule=cosine", "privacy.noise=seeded"]
    fedlora.run(None, tmp_path / "run", overrides=overrides, progress=None)
    assert sorted(seen) == [0, 1, 2]
    for r, rates in seen.items():
        f = 0.5 * (1 + math.cos(math.pi * r / 3))
        assert sorted(rates) == pytest.approx(sorted([0.02 * f, 0.05 * f]), rel=1e-12)


def _test_losses(folder) -> list[float]:
    return [json.loads(line)["test_loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_cosine_changes_training_from_the_second_round_only(tiny_overrides, tmp_path):
    base = [*tiny_overrides, "privacy.noise=seeded", "federation.rounds=2"]
    fedlora.run(None, tmp_path / "constant", overrides=base, progress=None)
    fedlora.run(None, tmp_path / "cosine", overrides=[*base, "train.lr_schedule=cosine"], progress=None)
    (c1, c2), (s1, s2) = _test_losses(tmp_path / "constant"), _test_losses(tmp_path / "cosine")
    assert c1 == s1  # round 1 runs at factor 1: bit for bit the constant run
    assert c2 != s2  # round 2 at half the rate


def test_an_unknown_schedule_is_refused(tiny_overrides):
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of constant, cosine"):
        load_config(None, [*tiny_overrides, "train.lr_schedule=linear"])
