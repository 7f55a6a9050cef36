"""mole: MoLE's gated mixture of LoRA experts, one expert per client, a personal gate each.

The mixture's forward against the gate's formula written out per token; per-example gradients of
the gate and the client's expert (balancing loss included) against one backward per example; the
wire (a client uploads only its own expert's B, never a gate); a 2-round DP run evaluated per
client and loaded back from its export; the refused combinations.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import build_experiment
from fedlora.methods import keys
from fedlora.methods.base import Update
from fedlora.mixture import MIXTURE_FILE, gate_log
from fedlora.privacy.dpsgd import per_sample_gradients

TAU, BALANCE = 0.5, 0.3


@pytest.fixture(scope="module")
def mole_overrides(tiny_overrides):
    return tiny_overrides + ["method.name=mole", f"method.mole_temperature={TAU}",
                             f"method.mole_balance={BALANCE}"]


@pytest.fixture(scope="module")
def exp(mole_overrides):
    return build_experiment(load_config(None, mole_overrides))


def _randomise(exp, seed=0):
    """Every expert B and gate at random values (B = 0 and G = 0 would hide the gate's math)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in exp.initial.items()
             if keys.is_expert_b(k) or keys.is_gate(k)}
    exp.trainer.handle.install({**exp.initial, **state})
    return state


def _layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_the_mixture_is_the_gated_sum_of_the_experts_by_hand(exp):
    _randomise(exp)
    layer = _layers(exp.model)[0]
    n_exp = exp.config.federation.clients
    s = exp.method.scaling
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x).double()
    w0, b0 = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    a = [layer.lora_expert_A[j].weight.double() for j in range(n_exp)]
    b = [layer.lora_expert_B[j].weight.double() for j in range(n_exp)]
    g = layer.lora_gate.weight.double()
    for i in range(2):
        for t in range(5):
            v = x[i, t].double()
            outs = [s * (b[j] @ (a[j] @ v)) for j in range(n_exp)]  # E_j(x) = s·B_j·A_j·x
            z = torch.cat(outs)
            z = z / z.norm()  # Norm: unit L2 norm of the concatenation
            logits = (g @ z) / TAU
            eps = [math.exp(float(logits[j])) for j in range(n_exp)]
            eps = [e / sum(eps) for e in eps]  # softmax over the experts
            want = w0 @ v + b0 + sum(eps[j] * outs[j] for j in range(n_exp))
            assert torch.allclose(got[i, t], want, atol=1e-5), (i, t)


def test_a_zero_gate_is_the_uniform_mixture(exp):
    state = _randomise(exp, seed=3)
    gates = {k: torch.zeros_like(v) for k, v in state.items() if keys.is_gate(k)}
    exp.trainer.handle.install({**exp.initial, **state, **gates})
    layer = _layers(exp.model)[1]
    x = torch.randn(1, 3, layer.in_features)
    with torch.no_grad():
        got = layer(x)
        s = exp.method.scaling
        mean = sum(s * layer.lora_expert_B[j](layer.lora_expert_A[j](x))
                   for j in range(3)) / 3
    assert torch.allclose(got, layer.base_layer(x) + mean, atol=1e-6)


def test_per_example_gradients_of_gate_and_expert_equal_one_backward_each(exp):
    """dpsgd's per-example gradients (one pass, hooks on the nn.Linear owners) equal autograd's
    gradient of each example's loss alone — cross-entropy plus α·L_balance of its own tokens —
    with the batch padded to its longest text."""
    _randomise(exp, seed=5)
    trainer, client = exp.trainer, exp.clients[1]
    handle = trainer.handle
    trained = handle.set_trainable(lambda k: exp.method.client_trains(k, 0, client.cid))
    try:
        assert any(keys.is_gate(k) for k in trained)
        assert {keys.expert_of(k) for k in trained if keys.is_expert(k)} == {client.cid}
        lengths = [len(t) for t in client.token_ids]
        by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
        idx = by_length[:2] + by_length[-1:]  # the two shortest texts padded to the longest
        assert len({lengths[i] for i in idx}) > 1  # padding is really there
        names = handle.param_names()
        fast = per_sample_gradients(exp.model, lambda: trainer.per_example_loss(client, idx))
        for row, i in enumerate(idx):
            loss = trainer.per_example_loss(client, [i])
            params = [handle.param(k) for k in trained]
            slow = torch.autograd.grad(loss.sum(), params)
            for k, g in zip(trained, slow):
                assert torch.allclose(fast[names[k]][row], g, atol=1e-6, rtol=1e-4), (k, i)
            assert any(g.abs().sum() > 0 for k, g in zip(trained, slow) if keys.is_gate(k))
    finally:
        handle.set_trainable(lambda k: False)


def test_the_balancing_loss_is_minus_the_log_of_the_mean_gate_weights(exp):
    _randomise(exp, seed=7)
    client = exp.clients[0]
    idx = [0, 1]
    log = gate_log(exp.model)
    with torch.no_grad():
        total = exp.trainer.per_example_loss(client, idx)
        with log.recording():
            task = exp.task.loss(exp.model, client.token_ids, client.labels, idx, exp.trainer.pad_id)
        weights = [w.double() for w in log.weights]
    for row, i in enumerate(idx):
        n = len(client.token_ids[i])
        q = sum(w[row, :n].sum(0) for w in weights) / (n * len(weights))  # (experts,)
        want = task[row].double() - BALANCE * q.log().sum()
        assert float(total[row]) == pytest.approx(float(want), rel=1e-5)


def test_each_client_uploads_only_its_own_expert_and_keeps_its_gate(exp):
    m = exp.method
    glob = m.init_global(exp.initial)
    assert not any(keys.is_gate(k) or keys.is_expert_a(k) for k in m.download(glob, 0))
    replies = []
    for c in exp.clients:
        before = {k: v.clone() for k, v in m.client_state(exp.initial, c.personal,
                                                          m.download(glob, c.cid), c.cid).items()}
        replies.append(exp.trainer.train(c, m.download(glob, c.cid), 0))
        up = replies[-1].upload
        assert {keys.expert_of(k) for k in up if keys.is_expert(k)} == {c.cid}
        assert all(keys.is_expert_b(k) or keys.is_head(k) for k in up)  # never a gate, never an A
        assert c.personal and all(keys.is_gate(k) for k in c.personal)
        after = exp.trainer.handle.state()
        for k in after:  # other clients' experts are frozen here
            if keys.is_expert(k) and keys.expert_of(k) != c.cid or keys.is_expert_a(k):
                assert torch.equal(after[k], before[k]), k
        assert any(not torch.equal(c.personal[k], before[k]) for k in c.personal)  # the gate trained
    updates = [Update(r.client, r.upload, r.num_examples) for r in replies]
    new = m.aggregate(glob, updates, 0)
    for r in replies:  # each expert is its owner's upload, as sent
        for k, v in r.upload.items():
            if keys.is_expert_b(k):
                assert torch.equal(new.adapter[k], v)
    w = [u.num_examples / sum(x.num_examples for x in updates) for u in updates]
    head = next(k for k in replies[0].upload if keys.is_head(k))
    want = sum(p * u.state[head].double() for p, u in zip(w, updates))
    assert torch.allclose(new.adapter[head].double(), want, atol=1e-6)


def test_a_two_round_dp_run_is_personalised_and_its_export_loads(mole_overrides, tmp_path):
    from fedlora.merge import merge_run
    from fedlora.predict import load_trained

    out = tmp_path / "run"
    summary = fedlora.run(None, out, overrides=mole_overrides, progress=None)
    assert summary["rounds"] == 2 and summary["rejected"] == {}
    assert 0 < summary["epsilon"] <= 3.0
    per_client = summary["test_accuracy_per_client"]
    assert len(per_client) == 3 and summary["test_accuracy"] == pytest.approx(sum(per_client) / 3)
    for k in range(3):
        assert (out / "clients" / str(k) / "adapter" / MIXTURE_FILE).exists()
    clf = load_trained(out, client=1, device="cpu")
    layer = _layers(clf.model)[0]
    assert float(layer.lora_gate.weight.abs().sum()) > 0  # site 1's own trained gate
    with pytest.raises(ConfigError, match="mixture of LoRA experts"):
        merge_run(out, tmp_path / "merged", client=1)


@pytest.mark.parametrize("extra, message", [
    (["method.chain_every=1"], "cannot be chained"),
    (["method.client_ranks=[4, 8, 8]"], "method.client_ranks"),
    (["federation.server_optimizer=adam"], "does not average"),
    (["train.optimizer=lora_pro"], "one LoRA"),
    (["method.mole_temperature=0"], "mole_temperature"),
    (["method.mole_balance=-1"], "mole_balance"),
])
def test_inapplicable_combinations_are_refused(mole_overrides, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, mole_overrides + extra)


def test_a_causal_task_is_refused():
    with pytest.raises(ConfigError, match="'mole'.*classification"):
        load_config(None, ["method.name=mole", "task.kind=causal"])


def test_an_audit_puts_its_canaries_only_where_the_audited_site_trains(exp):
    from fedlora.audit.canaries import candidate_coordinates

    pool = [k for k, _ in candidate_coordinates(exp.initial, exp.method, 2)]
    assert pool and all(keys.is_head(k) or keys.is_expert_b(k) and keys.expert_of(k) == 2
                        for k in pool)
    assert any(keys.is_expert_b(k) for k in pool)
