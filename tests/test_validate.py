"""Server-side validation: a bad update from one client never touches the global model.

The reference is `method.aggregate` called directly on the honest clients' replies of the
same round: with one client sending garbage, the global state must equal it exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.federation.server import FederationState, RoundPlan, UpdateRejected, run_rounds
from fedlora.federation.simulation import InProcessTransport
from fedlora.federation.validate import UpdateValidator, template_state
from fedlora.federation.wire import states_equal
from fedlora.methods.base import Update


def _nan(up):
    k = sorted(up)[0]
    v = up[k].clone()
    v.view(-1)[0] = math.nan
    return {**up, k: v}


def _shape(up):
    k = sorted(up)[0]
    return {**up, k: torch.zeros(up[k].shape[0] + 1, *up[k].shape[1:])}


def _key(up):
    k = sorted(up)[0]
    rest = {x: v for x, v in up.items() if x != k}
    return {**rest, k.replace("lora_B", "lora_Z").replace("weight", "wieght"): up[k]}


def _missing(up):
    return dict(sorted(up.items())[1:])


def _dtype(up):
    k = sorted(up)[0]
    return {**up, k: up[k].double()}


def _inf(up):
    k = sorted(up)[-1]
    return {**up, k: torch.full_like(up[k], math.inf)}


TAMPER = [  # (name, change to the upload, change to the reply, words in the reason)
    ("nan", _nan, None, ["non-finite"]),
    ("inf", _inf, None, ["non-finite"]),
    ("wrong shape", _shape, None, ["shape"]),
    ("wrong key", _key, None, ["wrong keys", "missing", "unexpected"]),
    ("missing key", _missing, None, ["wrong keys", "missing"]),
    ("wrong dtype", _dtype, None, ["dtype", "float64"]),
    ("zero examples", None, ("num_examples", 0), ["example count"]),
    ("fractional examples", None, ("num_examples", 2.5), ["example count"]),
    ("NaN epsilon", None, ("epsilon", math.nan), ["ε"]),
    ("not tensors", lambda up: {k: v.tolist() for k, v in up.items()}, None, ["not a mapping"]),
]


class Tampering:
    """Real local training, then client `bad`'s reply is altered on its way to the server."""

    def __init__(self, inner, bad, upload_change, reply_change):
        self.inner, self.bad = inner, bad
        self.upload_change, self.reply_change = upload_change, reply_change
        self.honest = []

    def exchange(self, round, downloads):
        ex = self.inner.exchange(round, downloads)
        self.honest = [r for r in ex.replies if r.client != self.bad]
        for r in ex.replies:
            if r.client == self.bad:
                if self.upload_change:
                    r.upload = self.upload_change(r.upload)
                if self.reply_change:
                    setattr(r, *self.reply_change)
        return ex


@pytest.fixture(scope="module")
def overrides(tiny_model_dir, toy_csv):
    return [f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "federation.rounds=1",
            "federation.local_steps=2", "train.batch_size=16", "train.eval_batch_size=64",
            "threads=1"]


def _round(exp, transport, on_bad="skip", max_norm=0.0):
    f = exp.config.federation
    plan = RoundPlan(f.rounds, f.clients, 0, 1, exp.config.seed, on_bad_update=on_bad)
    state = FederationState(glob=exp.method.init_global(exp.initial))
    start = state.glob
    validator = UpdateValidator(exp.method, template_state(exp.trainer.handle, exp.initial), max_norm)
    return start, state, validator, plan


@pytest.mark.parametrize("name,upload_change,reply_change,words", TAMPER, ids=[t[0] for t in TAMPER])
def test_bad_update_is_rejected_and_the_rest_aggregate(name, upload_change, reply_change, words,
                                                       overrides):
    exp = build_experiment(load_config(None, [*overrides, "method.name=lora"]))
    transport = Tampering(InProcessTransport(exp.trainer, exp.clients), 1, upload_change, reply_change)
    start, state, validator, plan = _round(exp, transport)
    run_rounds(exp.method, state, transport, plan, exp.evaluate, validator=validator)
    record = state.history[0]
    assert list(record["rejected"]) == ["1"]
    for w in words:
        assert w in record["rejected"]["1"], (w, record["rejected"])
    honest = [Update(r.client, r.upload, r.num_examples) for r in transport.honest]
    assert [u.client for u in honest] == [0, 2]
    want = exp.method.aggregate(start, honest, 0)
    assert states_equal(state.glob.tensors(), want.tensors())
    assert record["test_accuracy"] is not None and math.isfinite(record["local_train_loss"])


def test_stop_on_bad_update_leaves_the_global_model_untouched(overrides):
    exp = build_experiment(load_config(None, overrides))
    transport = Tampering(InProcessTransport(exp.trainer, exp.clients), 2, _nan, None)
    start, state, validator, plan = _round(exp, transport, on_bad="stop")
    with pytest.raises(UpdateRejected, match="client 2.*non-finite.*on_bad_update"):
        run_rounds(exp.method, state, transport, plan, exp.evaluate, validator=validator)
    assert state.glob is start and state.history == []


def test_norm_bound_rejects_a_scaled_update(overrides):
    exp = build_experiment(load_config(None, overrides))

    def scaled(up):
        return {k: v * 1e4 for k, v in up.items()}

    transport = Tampering(InProcessTransport(exp.trainer, exp.clients), 0, scaled, None)
    start, state, validator, plan = _round(exp, transport, max_norm=50.0)
    run_rounds(exp.method, state, transport, plan, exp.evaluate, validator=validator)
    assert list(state.history[0]["rejected"]) == ["0"]
    assert "exceeds federation.max_update_norm=50" in state.history[0]["rejected"]["0"]
    downloads = {c: exp.method.download(start, c) for c in (1, 2)}
    for r in transport.honest:  # the bound is not trivially tight: honest updates are well inside
        assert validator.update_norm(r.client, r.upload, downloads[r.client]) < 50.0
    want = exp.method.aggregate(start, [Update(r.client, r.upload, r.num_examples)
                                        for r in transport.honest], 0)
    assert states_equal(state.glob.tensors(), want.tensors())


def test_update_norm_by_hand(overrides):
    """‖u − s‖ over keys, with the download as s (hand-computed on a two-key update)."""
    exp = build_experiment(load_config(None, overrides))
    validator = UpdateValidator(exp.method, template_state(exp.trainer.handle, exp.initial))
    a, b = sorted(exp.method.upload(exp.initial, 0))[:2]
    sent = {a: torch.zeros_like(exp.initial[a]), b: torch.zeros_like(exp.initial[b])}
    up = {a: sent[a].clone(), b: sent[b].clone()}
    up[a].view(-1)[0] = 3.0
    up[b].view(-1)[-1] = 4.0
    assert validator.update_norm(0, up, sent) == pytest.approx(5.0)
