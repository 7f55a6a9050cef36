"""DP feature centring: the query's answer, its noise, its accounting, μ, and the exported head."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.data.batching import collate
from fedlora.experiment import build_experiment
from fedlora.federation import centering
from fedlora.federation.client import ClientReply
from fedlora.federation.server import Exchange, FederationState, RoundPlan, gather_center
from fedlora.federation.simulation import InProcessTransport
from fedlora.methods import keys
from fedlora.model import AdapterHandle, attach_lora, load_classifier
from fedlora.privacy.randomness import TorchStream
from fedlora.config import MethodConfig


@pytest.fixture(scope="module")
def st_overrides(tiny_st_model_dir, toy_csv):
    return [f"model.path={tiny_st_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "federation.rounds=2",
            "federation.local_steps=2", "train.batch_size=16", "train.eval_batch_size=64",
            "threads=1", "device=cpu"]  # the references below run the model on CPU batches


@pytest.fixture(scope="module")
def model(tiny_st_model_dir):
    return attach_lora(load_classifier(str(tiny_st_model_dir), 2, seed=0), MethodConfig(), seed=0)


def _direct_feature(model, ids: list[int]) -> torch.Tensor:
    """e of one example, computed alone: the mean of its token states, L2-normalised."""
    clf = centering.pooled_classifier(model)
    model.eval()  # no dropout
    with torch.no_grad():
        states = clf.encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
    mean = states.mean(0)
    return mean / mean.norm()


TOKENS = [[101, 7, 8, 102], [101, 9, 102], [101, 2204, 2143, 2001, 102], [101, 6659, 102],
          [101, 3185, 2001, 2307, 1998, 102], [101, 5436, 102]]


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_feature_sum_is_the_sum_over_the_poisson_sample(model, rate):
    model.eval()
    got = centering.noisy_feature_sum(model, TOKENS, rate, 0.0, pad_id=0, micro_batch=4,
                                      stream=TorchStream(3))
    chosen = (torch.rand(len(TOKENS), generator=torch.Generator().manual_seed(3)) < rate)
    want = sum((_direct_feature(model, t) for t, c in zip(TOKENS, chosen) if c),
               torch.zeros(32))
    assert torch.allclose(got[centering.SUM], want, atol=1e-5)
    assert float(got[centering.COUNT]) == pytest.approx(rate * len(TOKENS))


def test_feature_sum_noise_has_the_calibrated_std(model):
    """Same seed with and without noise: the difference is N(0, σ_m²) per coordinate."""
    sigma, diffs = 2.0, []
    for seed in range(60):
        noisy = centering.noisy_feature_sum(model, TOKENS[:2], 1.0, sigma, 0, 4,
                                            TorchStream(seed))
        clean = centering.noisy_feature_sum(model, TOKENS[:2], 1.0, 0.0, 0, 4,
                                            TorchStream(seed))
        diffs.append(noisy[centering.SUM] - clean[centering.SUM])
    d = torch.cat(diffs)  # 60 × 32 = 1,920 draws: the std is within ±5% with ~97% probability
    assert d.std().item() == pytest.approx(sigma, rel=0.06)
    assert abs(d.mean().item()) < 4 * sigma / math.sqrt(d.numel())


def test_center_is_the_pooled_mean_of_the_answers():
    answers = [{centering.SUM: torch.tensor([3.0, 0.0]), centering.COUNT: torch.tensor(3.0)},
               {centering.SUM: torch.tensor([1.0, 4.0]), centering.COUNT: torch.tensor(1.0)}]
    assert torch.allclose(centering.center_from(answers), torch.tensor([1.0, 1.0]))


def test_folding_the_center_into_the_head_keeps_the_logits(model):
    handle = AdapterHandle.of(model)
    state = handle.state()
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=gen) if keys.is_head(k) else v
             for k, v in state.items()}
    center = 0.2 * torch.randn(32, generator=gen)
    batch = collate(TOKENS, list(range(len(TOKENS))), 0)
    model.eval()
    with torch.no_grad():
        handle.install({**state, keys.CENTER: center})
        centred = model(**batch).logits
        handle.install(centering.fold_center({**state, keys.CENTER: center}))
        folded = model(**batch).logits
        assert float(centering.pooled_classifier(model).feature_center.abs().max()) == 0.0
        handle.install(state)
        plain = model(**batch).logits
    assert torch.allclose(centred, folded, atol=1e-5)
    assert not torch.allclose(centred, plain, atol=1e-3)  # μ does change the logits


def test_center_without_noise_is_the_mean_feature_of_all_training_examples(st_overrides):
    config = load_config(overrides=[*st_overrides, "privacy.epsilon=inf",
                                    "model.center_examples=100000"])
    exp = build_experiment(config)
    state = FederationState(glob=exp.method.init_global(exp.initial))
    plan = RoundPlan(2, 3, 0, 1, 0, center_dim=32)
    gather_center(exp.method, state, InProcessTransport(exp.trainer, exp.clients), plan)
    exp.trainer.handle.install(exp.initial)
    feats = [_direct_feature(exp.model, ids) for c in exp.clients for ids in c.token_ids]
    want = torch.stack(feats).mean(0)
    assert torch.allclose(state.glob.statistics[keys.CENTER], want, atol=1e-5)
    assert state.center["clients"] == 3 and state.center["norm"] == pytest.approx(float(want.norm()), rel=1e-4)
    assert state.bytes_uploaded > 0 and state.bytes_downloaded == 0  # nothing is sent down


class _Scripted:
    """A transport whose clients answer with what the test wrote."""

    def __init__(self, uploads):
        self.uploads = uploads

    def ask_center(self, clients):
        assert clients == sorted(self.uploads)
        return Exchange([ClientReply(c, up, 10, 0.1, 0, math.nan) for c, up in self.uploads.items()],
                        0, 0)


def test_bad_answers_are_left_out_and_named(model):
    from fedlora.methods import get_method

    method = get_method(MethodConfig())
    good = {centering.SUM: torch.ones(32) * 2, centering.COUNT: torch.tensor(4.0)}
    uploads = {0: good,
               1: {centering.SUM: torch.ones(31), centering.COUNT: torch.tensor(4.0)},
               2: {centering.SUM: torch.full((32,), float("nan")), centering.COUNT: torch.tensor(4.0)},
               3: {"something": torch.ones(32)}}
    state = FederationState(glob=method.init_global(AdapterHandle.of(model).state()))
    gather_center(method, state, _Scripted(uploads), RoundPlan(1, 4, 0, 1, 0, center_dim=32))
    assert torch.allclose(state.glob.statistics[keys.CENTER], torch.full((32,), 0.5))
    assert sorted(state.center["rejected"]) == ["1", "2", "3"]


def test_run_accounts_for_the_query_and_exports_a_head_that_reproduces_predictions(
        st_overrides, tmp_path, tiny_st_model_dir):
    """ε composes the query with every DP-SGD step (checked against dp-accounting), and the
    adapter — μ folded into the head — reproduces fedlora's accuracy through PEFT alone."""
    import dp_accounting
    from peft import PeftModel

    summary = fedlora.run(None, tmp_path / "run", overrides=st_overrides, progress=None)
    assert summary["feature_center"]["clients"] == 3
    config = load_config(tmp_path / "run" / "config.toml")
    exp = build_experiment(config)
    for k, client in enumerate(exp.clients):
        p = client.privacy
        assert p.center_rate == pytest.approx(min(1.0, 1024 / client.num_examples))
        event = dp_accounting.ComposedDpEvent([
            dp_accounting.PoissonSampledDpEvent(p.center_rate,
                                                dp_accounting.GaussianDpEvent(p.center_noise)),
            dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
                p.sample_rate, dp_accounting.GaussianDpEvent(p.noise_multiplier)),
                summary["steps"][k])])
        accountant = dp_accounting.rdp.RdpAccountant(
            [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024])
        accountant.compose(event)
        reference = accountant.get_epsilon(config.privacy.delta)
        assert summary["epsilon_per_client"][k] == pytest.approx(reference, rel=0.02)
        assert summary["epsilon_per_client"][k] <= config.privacy.epsilon
    ledger = json.loads((tmp_path / "run" / "ledger" / "client-0.json").read_text())
    assert "center" in ledger["rounds"]  # the query's own ledger entry, not a round number
    history = ledger["rounds"][max(ledger["rounds"], key=lambda r: -1 if r == "center" else int(r))
                               ]["accountant"]["history"]
    assert history[0][0] == pytest.approx(config.privacy.center_noise)  # the query comes first
    evaluator = exp.evaluators[0]
    base = load_classifier(str(tiny_st_model_dir), 2, seed=123)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        preds = peft_model(**collate(evaluator.token_ids, list(range(len(evaluator.token_ids))),
                                     0)).logits.argmax(-1)
    assert (preds == evaluator.labels).float().mean().item() == pytest.approx(summary["test_accuracy"])


def test_center_can_be_turned_off(st_overrides, tmp_path):
    summary = fedlora.run(None, tmp_path / "run", overrides=[*st_overrides, "model.center=off"],
                          progress=None)
    assert summary["feature_center"] is None


@pytest.mark.parametrize("override, fragment", [
    ("model.center=always", "model.center must be one of auto, off"),
    ("privacy.center_noise=0", "privacy.center_noise must be a positive number"),
    ("model.center_examples=0", "model.center_examples must be ≥ 1"),
])
def test_bad_centering_settings_are_refused(override, fragment):
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides=[override])
