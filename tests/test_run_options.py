"""Run options that whole runs must honour, each against a reference computed another way:
client sampling (numpy's generator, by hand), the PRV accountant (Google's dp-accounting PLD),
plain SGD (one step of autograd on the client's whole data), evaluation every k rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedlora
from fedlora.config import load_config
from fedlora.data.batching import collate
from fedlora.experiment import build_experiment
from fedlora.seeding import derive_seed


def _metrics(folder) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_clients_per_round_samples_without_replacement_from_the_seed(tiny_overrides, tmp_path):
    over = tiny_overrides + ["federation.rounds=4", "federation.clients_per_round=2",
                             "privacy.epsilon=inf"]
    summary = fedlora.run(None, tmp_path / "run", overrides=over, progress=None)
    picked = [r["clients"] for r in _metrics(tmp_path / "run")]
    want = [sorted(int(c) for c in np.random.default_rng(derive_seed(0, "select", r))
                   .choice(3, size=2, replace=False)) for r in range(4)]
    assert picked == want
    taken = [sum(cid in p for p in picked) * 2 for cid in range(3)]  # 2 local steps a round
    assert summary["steps"] == taken and len(set(map(tuple, picked))) > 1


def test_a_prv_run_reports_the_pld_epsilon(tiny_overrides, tmp_path):
    """The whole run with the PRV accountant: each client's ε within 1 % of Google's PLD
    accountant over the same steps, within the target, and tighter than RDP's for that σ."""
    from dp_accounting import dp_event, pld

    from fedlora.privacy.accountant import PrivacyAccountant

    over = tiny_overrides + ["privacy.accountant=prv", "privacy.epsilon=2"]
    s = fedlora.run(None, tmp_path / "run", overrides=over, progress=None)
    for eps, sigma, q, steps in zip(s["epsilon_per_client"], s["noise_multiplier"],
                                    s["sample_rates"], s["steps"]):
        acc = pld.PLDAccountant()
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        assert eps == pytest.approx(acc.get_epsilon(s["delta"]), rel=0.01)
        assert eps <= 2.0
        rdp = PrivacyAccountant("rdp")
        rdp.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
        assert eps < rdp.epsilon(s["delta"])


def test_sgd_takes_the_plain_gradient_step(tiny_overrides):
    """No DP, every example in the batch (q = 1), one local step of SGD without momentum: the
    upload is download − lr · ∇(mean loss over the client's data), the gradient taken by plain
    autograd on the whole client set at once (no micro-batches, no per-example gradients)."""
    config = load_config(None, tiny_overrides + [
        "privacy.epsilon=inf", "train.optimizer=sgd", "train.momentum=0", "train.lr=0.3",
        "federation.local_steps=1", "train.batch_size=100000", "train.micro_batch_size=7"])
    exp = build_experiment(config)
    for module in exp.model.modules():  # dropout masks depend on how a batch is cut: none here
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    client, trainer = exp.clients[1], exp.trainer
    download = exp.method.download(exp.method.init_global(exp.initial), client.cid)
    upload = trainer.train(client, download, 0).upload
    # the reference: install the download, one autograd pass over all the client's examples
    handle = trainer.handle
    handle.install(exp.method.client_state(exp.initial, {}, download, client.cid))
    keys = handle.set_trainable(lambda k: exp.method.trainable(k, 0))
    exp.model.train()
    idx = list(range(client.num_examples))
    batch = collate(client.token_ids, idx, trainer.pad_id)
    loss = F.cross_entropy(exp.model(**batch).logits, torch.tensor(client.labels))
    grads = torch.autograd.grad(loss, [handle.param(k) for k in keys])
    exp.model.eval()
    handle.set_trainable(lambda k: False)
    for k, g in zip(keys, grads):
        if k in upload:
            assert torch.allclose(upload[k], download[k] - 0.3 * g, atol=1e-5), k
    assert any(not torch.equal(upload[k], download[k]) for k in upload)


def test_eval_every_scores_every_kth_round_and_always_the_last(tiny_overrides, tmp_path):
    over = tiny_overrides + ["federation.rounds=5", "federation.eval_every=2",
                             "federation.local_steps=1"]
    fedlora.run(None, tmp_path / "run", overrides=over, progress=None)
    scored = [r["round"] for r in _metrics(tmp_path / "run") if r["test_accuracy"] is not None]
    assert scored == [2, 4, 5]
