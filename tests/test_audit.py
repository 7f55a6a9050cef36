"""`fedlora audit`: the one-run lower bound against hand-computed values, the canaries' effect
on the DP sum, and audits of a correct and of deliberately broken mechanisms (tiny model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from fedlora.audit.bound import ceiling, epsilon_lower_bound, p_value
from fedlora.audit.canaries import RAW_NORM, GradientCanaries
from fedlora.audit.run import AuditPlan, audit
from fedlora.cli import main
from fedlora.privacy.randomness import TorchStream


# ------------------------------------------------------------------------------ the bound


def test_all_right_without_delta_is_randomised_responses_accuracy():
    """δ = 0, r = v: P[all r right] = p^r < β ⟺ p > β^(1/r); ε = ln(p / (1 − p))."""
    p = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(1000, 100, 100, 0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    assert epsilon_lower_bound(1000, 100, 100, 0.0) == pytest.approx(3.49297, abs=1e-4)


def test_one_guess_with_delta_by_hand():
    """m = r = v = 1: p-value = p + 2δ(1 − p). At β = 0.9, δ = 0.01: p = 0.88/0.98, so
    ε = ln(0.88/0.10) = ln 8.8."""
    assert p_value(1, 1, 1, math.log(8.8), 0.01) == pytest.approx(0.9, abs=1e-12)
    assert epsilon_lower_bound(1, 1, 1, 0.01, beta=0.9) == pytest.approx(math.log(8.8), abs=1e-5)


def test_the_p_value_without_delta_is_the_binomial_tail():
    for r, v, eps in [(200, 130, 0.5), (50, 50, 2.0), (100, 40, 0.0)]:
        p = math.exp(eps) / (1 + math.exp(eps))
        tail = sum(math.comb(r, k) * p ** k * (1 - p) ** (r - k) for k in range(v, r + 1))
        assert p_value(1000, r, v, eps, 0.0) == pytest.approx(tail, rel=1e-9)
        assert p_value(1000, r, v, eps, 1e-5) > tail  # δ only makes it harder to reject


def test_bound_behaviour():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0  # chance level proves nothing
    assert ceiling(1000, 200, 1e-5) > ceiling(1000, 100, 1e-5) > ceiling(1000, 50, 1e-5)
    assert ceiling(1000, 100, 1e-5) < ceiling(1000, 100, 0.0)
    assert epsilon_lower_bound(1000, 200, 180, 1e-5) < ceiling(1000, 200, 1e-5)
    with pytest.raises(ValueError):
        p_value(10, 20, 5, 1.0, 0.0)  # more guesses than canaries


# ------------------------------------------------------------------------------ canaries


def _canaries(included, broken=None):
    coords = [("w", 0), ("w", 5), ("v", 2)]
    return GradientCanaries(0, coords, np.array(included), broken)


@pytest.mark.parametrize("broken", [None, "clip"])
def test_a_sampled_canary_changes_the_clipped_sum_by_exactly_its_vector(broken):
    clip = 0.5
    summed = {"pw": torch.randn(2, 3), "pv": torch.randn(4)}
    before = {k: v.clone() for k, v in summed.items()}
    c = _canaries([True, False, True], broken)
    added = c.add(summed, {"w": "pw", "v": "pv"}, rate=1.0, clip=clip, stream=TorchStream(0))
    assert added == 2
    norm = RAW_NORM * clip
    value = clip if broken is None else norm  # clipped to C like an example, unless broken
    want_w, want_v = before["pw"].clone(), before["pv"].clone()
    want_w.view(-1)[0] += value
    want_v[2] += value
    assert torch.allclose(summed["pw"], want_w, atol=1e-6) and torch.allclose(summed["pv"], want_v, atol=1e-6)
    # rate 0: never sampled; an untrained tensor this round: skipped
    assert c.add(summed, {"w": "pw", "v": "pv"}, rate=0.0, clip=clip, stream=TorchStream(0)) == 0
    assert c.add({"pw": torch.zeros(2, 3)}, {"w": "pw"}, rate=1.0, clip=clip, stream=TorchStream(0)) == 1


def test_each_canary_is_sampled_at_the_clients_rate():
    c = GradientCanaries(0, [("w", i) for i in range(2000)], np.ones(2000, bool))
    summed = {"pw": torch.zeros(2000)}
    c.add(summed, {"w": "pw"}, rate=0.3, clip=1.0, stream=TorchStream(3))
    assert abs(float((summed["pw"] > 0).float().mean()) - 0.3) < 0.04


def test_scores_are_the_summed_descent_and_guesses_count_right():
    c = _canaries([True, False, True])
    before = {"w": torch.zeros(6), "v": torch.zeros(3)}
    c.observe(before, {"w": torch.tensor([-2.0, 0, 0, 0, 0, 1.0]), "v": torch.tensor([0, 0, -0.5])})
    c.observe(before, {"w": torch.tensor([-1.0, 0, 0, 0, 0, 0.0]), "v": torch.tensor([0, 0, 0.0])})
    assert c.scores.tolist() == [3.0, -1.0, 0.5]
    guess = c.guesses(1, 1)
    assert guess.tolist() == [1, -1, 0] and c.correct(guess) == 2
    assert c.correct(c.guesses(2, 1)) == 3


# ------------------------------------------------------------------------------ whole audits


@pytest.fixture(scope="module")
def audit_overrides(tiny_overrides):
    return tiny_overrides + ["privacy.epsilon=1", "privacy.noise=seeded", "train.lr=0.5"]


PLAN = dict(canaries=400, guesses_in=60, guesses_out=0)


@pytest.mark.parametrize("broken", [None, "noise", "sigma/10", "clip"])
def test_the_audit_passes_a_correct_mechanism_and_catches_broken_ones(audit_overrides, tmp_path, broken):
    result = audit(None, tmp_path / "run", audit_overrides, AuditPlan(broken=broken, **PLAN),
                   progress=None, rng=np.random.default_rng(7))
    assert result["epsilon"] <= 1.0 + 1e-6 and result["ceiling"] > 2.5
    saved = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert saved["epsilon_lower_bound"] == result["epsilon_lower_bound"]
    assert (tmp_path / "run" / "audit.md").read_text().startswith("# Privacy audit of client 0")
    if broken is None:
        assert result["epsilon_lower_bound"] <= result["epsilon"]
    else:
        assert result["epsilon_lower_bound"] > result["epsilon"], result


def test_audit_cli_and_its_bad_input(audit_overrides, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["audit", "--out", str(out), "--canaries", "50", "--guesses", "10,10",
                 *audit_overrides]) == 0
    text = capsys.readouterr().out
    assert "plain SGD" in text and "ε_lb =" in text
    a = json.loads((out / "audit.json").read_text())
    for key in ("epsilon", "epsilon_lower_bound", "ceiling", "canaries", "guesses", "correct",
                "beta", "delta", "kind", "broken"):
        assert key in a
    assert a["canaries"] == 50 and a["guesses"] == 20 and a["kind"] == "gradient" and a["broken"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert a["epsilon"] == summary["epsilon_per_client"][0]
    for argv, needle in [(["--guesses", "40,40", "--canaries", "50"], "more guesses"),
                         (["--guesses", "x"], "--guesses"),
                         (["--canaries", "100000"], "lower --canaries"),
                         (["--client", "7"], "--client 7"),
                         (["privacy.epsilon=inf"], "no DP guarantee"),
                         (["method.name=galore"], "brings its own optimizer")]:
        bad = tmp_path / "bad"
        options = [a for a in argv if "=" not in a]
        assert main(["audit", "--out", str(bad), *options, *audit_overrides,
                     *[a for a in argv if "=" in a]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not bad.exists() and not (tmp_path / "bad.partial").exists()
