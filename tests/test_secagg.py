"""Secure aggregation (SecAgg+) over Flower, in one process: Flower's real `secaggplus_mod` and
`SecAggPlusWorkflow` (real keys, shares and masks) over an in-memory grid.

The reference is the same run without secure aggregation (seeded DP noise): the server's
aggregate must match it within the quantisation bound the round reports, the server-side
aggregation must receive one summed update, and the refusals must name their reason.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Message  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedlora.config import load_config  # noqa: E402
from fedlora.errors import ConfigError, FederationError  # noqa: E402
from fedlora.experiment import build_experiment  # noqa: E402
from fedlora.federation.flower import client_app  # noqa: E402
from fedlora.federation.flower.runconfig import read_run_config  # noqa: E402
from fedlora.federation.flower.secagg import Quantisation, RangeError, SummedUploads  # noqa: E402
from fedlora.federation.flower.server_app import connect, serve  # noqa: E402
from fedlora.methods import available_methods, method_class  # noqa: E402
from fedlora.methods.aggregate import weighted_mean  # noqa: E402
from fedlora.methods.base import Update  # noqa: E402
from fedlora.outputs import RunFolder  # noqa: E402
from fedlora.runner import execute  # noqa: E402
from test_flower import MemoryGrid, _run_config, task_identity  # noqa: E402,F401
from test_method_properties import random_updates  # noqa: E402

SECURE = ["federation.secure_aggregation=true", "federation.max_update_norm=5.0"]


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """Seeded DP noise: the secure and the plain run draw the same noise."""
    return tiny_overrides + ["privacy.noise=seeded"]


class SecureGrid(MemoryGrid):
    """The in-memory grid, delivering through the ClientApp itself so that its mods (Flower's
    `secaggplus_mod`) run; `drop_at` = (round, stage, nodes): those nodes fail from that stage
    of that round on."""

    drop_at: tuple[int, str, set[int]] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answered: list[Message] = []  # every reply a site sent

    def send_and_receive(self, msgs, *, timeout=None):
        replies = []
        for msg in msgs:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            self._maybe_drop(msg)
            node = msg.metadata.dst_node_id
            if node in self.broken:
                from flwr.app import Error

                replies.append(Message(Error(code=5, reason="node unavailable"), reply_to=msg))
                continue
            # a copy, as if it had crossed the wire: the workflow sends one content to all
            # nodes, and the mod edits what it receives
            delivered = copy.deepcopy(msg)
            delivered.metadata.__dict__["_message_id"] = msg.metadata.message_id
            try:
                replies.append(client_app.app(delivered, self.contexts[node]))
                self.answered.append(replies[-1])
            except Exception as err:  # as a ClientApp process answers: an error reply
                from flwr.app import Error

                replies.append(Message(Error(code=0, reason=f"{type(err)}:<'{err}'>"), reply_to=msg))
        return replies

    def _maybe_drop(self, msg):
        configs = msg.content.config_records.get("secaggplus_configs")
        if self.drop_at and configs is not None:
            round, stage, nodes = self.drop_at
            if msg.metadata.group_id == str(round) and configs.get("stage") == stage:
                self.broken |= nodes


def _grid(config, tmp_path, name="sites") -> SecureGrid:
    return SecureGrid({k + 1: {"partition-id": k, "num-partitions": 3} for k in range(3)},
                      _run_config(config, tmp_path), tmp_path / name)


def _run(grid, tmp_path, name: str, spy: list | None = None):
    """A whole run over `grid` in this process; `spy` collects what `method.aggregate` gets,
    and the global adapter after each round."""
    run = read_run_config(grid.contexts[1].run_config)
    run.round_timeout, run.connect_timeout = 5.0, 1.0
    server, transport = connect(grid, run, say=lambda s: None)
    if spy is not None:
        aggregate, end_round = server.method.aggregate, server.method.end_round
        server.method.aggregate = lambda glob, updates, r: (
            spy.append(("aggregate", [(u.client, u.num_examples) for u in updates])),
            aggregate(glob, updates, r))[1]
        server.method.end_round = lambda glob, r: (
            spy.append(("global", {k: v.clone() for k, v in glob.adapter.items()})),
            end_round(glob, r))[1]
    folder = RunFolder(tmp_path / name).open()
    summary = execute(server, transport, folder, lambda s: None, 0.0, transport.client_facts)
    records = [json.loads(x) for x in (folder.tmp / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def _max_abs(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_the_server_sees_one_sum_and_it_matches_the_plain_run(tiny_overrides, tmp_path):
    """Two rounds of FFA-LoRA under DP. Round 1 (same downloads): the secure aggregate equals
    the plain one within the round's quantisation bound (+ float32 rounding); `aggregate` gets
    one update, the sum (client −1, n = Σ n_k). ε, steps and test accuracy are the plain run's."""
    config = load_config(None, tiny_overrides + SECURE)
    plain_config = load_config(None, tiny_overrides + ["federation.max_update_norm=5.0"])
    spy, plain_spy = [], []
    summary, records = _run(_grid(config, tmp_path), tmp_path, "secure", spy)
    plain, _ = _run(_grid(plain_config, tmp_path / "p"), tmp_path, "plain", plain_spy)
    sizes = summary["client_sizes"]
    assert [x for tag, x in spy if tag == "aggregate"] == [[(-1, sum(sizes))]] * 2
    assert [len(x) for tag, x in plain_spy if tag == "aggregate"] == [3, 3]
    ours = [x for tag, x in spy if tag == "global"]
    theirs = [x for tag, x in plain_spy if tag == "global"]
    bound = records[0]["secure_aggregation"]["bound"]
    ulp = max(float(v.abs().max()) for v in theirs[0].values()) * 2.0 ** -23
    assert 0 < _max_abs(ours[0], theirs[0]) <= bound + ulp  # not identical: really quantised
    assert _max_abs(ours[1], theirs[1]) < 1e-6  # round 2 trains from a download ~1e-9 away
    for r, (x, y) in enumerate(zip(ours, theirs)):  # the figures docs/secure-aggregation.md quotes
        print(f"\nround {r + 1}: max|Δ global adapter| {_max_abs(x, y):.3g}, quantisation bound "
              f"{records[r]['secure_aggregation']['bound']:.3g}")
    print(f"test accuracy: secure {summary['test_accuracy']:.4f}, plain {plain['test_accuracy']:.4f}")
    assert records[0]["secure_aggregation"]["sites"] == [0, 1, 2]
    assert records[0]["failed"] == {} and records[0]["bytes_uploaded"] > 0
    for key in ("epsilon_per_client", "steps", "client_sizes", "noise_multiplier"):
        assert summary[key] == plain[key], key
    assert summary["test_accuracy"] == pytest.approx(plain["test_accuracy"], abs=0.02)


def test_a_site_lost_after_key_sharing_is_removed_from_the_sum(tiny_overrides, tmp_path):
    """Node 3 fails once the keys are shared (round 2): the other two (≥ threshold 2) make the
    round, the failure is logged, and client 2 is in round 1's sum only."""
    config = load_config(None, tiny_overrides + SECURE + ["federation.min_clients=2"])
    grid = _grid(config, tmp_path)
    grid.drop_at = (2, "collect_masked_vectors", {3})
    summary, records = _run(grid, tmp_path, "secure")
    assert records[0]["secure_aggregation"]["sites"] == [0, 1, 2]
    assert records[1]["secure_aggregation"]["sites"] == [0, 1]
    assert set(records[1]["failed"]) == {"2"} and "node unavailable" in records[1]["failed"]["2"]
    assert summary["rounds"] == 2 and summary["steps"] == [4, 4, 2]
    _assert_fields_documented(grid)


def _assert_fields_documented(grid: SecureGrid) -> None:
    """Every field of every reply a site sent in secure rounds is in SITE_FIELDS (and so in
    docs/privacy.md, test_site_privacy.py): the masked vector, keys and shares, public facts."""
    from fedlora.federation.flower import messages

    allowed = set(messages.SITE_FIELDS["secure-train"]) | set(messages.SITE_FIELDS["query"])
    fields = set()
    for reply in grid.answered:
        for record in [*reply.content.config_records.values(), *reply.content.metric_records.values()]:
            fields |= set(record)
        assert all(len(r) == 0 for r in reply.content.array_records.values())  # no plain upload
    assert "masked_params" in fields and fields <= allowed, fields - allowed


def test_too_few_sites_after_key_sharing_stop_the_run_resumably(tiny_overrides, tmp_path):
    """Two of three nodes fail once the keys are shared (round 2): fewer than the threshold, so
    the run stops with the reason and keeps round 1's checkpoint; resuming finishes it."""
    config = load_config(None, tiny_overrides + SECURE)
    grid = _grid(config, tmp_path)
    grid.drop_at = (2, "collect_masked_vectors", {2, 3})
    run = read_run_config(grid.contexts[1].run_config)
    run.round_timeout, run.connect_timeout, run.out = 5.0, 1.0, str(tmp_path / "run")
    with pytest.raises(FederationError, match="reconstruction threshold") as err:
        serve(grid, run, say=lambda s: None)
    assert "resume=true" in "".join(getattr(err.value, "__notes__", []))
    partial = tmp_path / "run.partial"
    assert (partial / "checkpoint.safetensors").is_file() and not (tmp_path / "run").exists()
    grid.broken.clear()
    grid.drop_at = None
    run.resume = True
    summary = serve(grid, run, say=lambda s: None)
    assert summary["rounds"] == 2 and (tmp_path / "run" / "adapter").is_dir()


def test_an_update_beyond_the_range_is_an_error_not_a_clipped_value(tiny_overrides, tmp_path):
    """max_update_norm below the updates' norms (~1 here): every site refuses to send
    (RangeError), so the round stops with the sites' reason instead of a clipped aggregate."""
    config = load_config(None, tiny_overrides + ["federation.secure_aggregation=true",
                                                 "federation.max_update_norm=0.5"])
    with pytest.raises(FederationError, match="secure-aggregation range"):
        _run(_grid(config, tmp_path), tmp_path, "secure")


def test_a_site_checks_its_update_norm_before_masking():
    """‖Δ‖₂ ≤ R passes (then no coordinate can be clipped); beyond it, an error, not a value."""
    q = Quantisation.choose(0.5, [10, 20, 30])
    summed = SummedUploads.__new__(SummedUploads)
    summed.keys = lambda r: ["a", "b"]
    summed.reference = lambda k, sent: sent[k]
    sent = {"a": torch.ones(1), "b": torch.zeros(2)}
    ok = summed.masked_input({"a": torch.tensor([1.3]), "b": torch.tensor([0.4, 0.0])}, sent, 0, q)
    assert [a.tolist() for a in ok] == [pytest.approx([0.3]), pytest.approx([0.4, 0.0])]
    with pytest.raises(RangeError, match="update norm 0.5099 exceeds the secure-aggregation range 0.5"):
        summed.masked_input({"a": torch.tensor([1.1]), "b": torch.tensor([0.5, 0.0])}, sent, 0, q)


def test_quantisation_fits_the_modulus_and_its_bound():
    """T·N < M (the unmasked sum never wraps), t = ⌈2N/3⌉, and the bound is 3·N·R/(T·W)."""
    for n in (3, 4, 7, 100):
        q = Quantisation.choose(2.0, [5] * n)
        assert q.levels * n < q.modulus and q.levels <= 2 ** 30
        assert q.threshold == max(2, math.ceil(2 * n / 3)) < n
    q = Quantisation.choose(1.0, [10, 20, 40])
    assert q.max_weight == 40 and q.weight(40) == 1.0 and q.weight(10) == 0.25
    assert q.bound([10, 20, 40]) == pytest.approx(3 * 3 * 1.0 / (q.levels * 1.75))


# ------------------------------------------------------------------ which methods can be summed
@pytest.mark.parametrize("name", sorted(available_methods()))
def test_a_method_runs_under_secure_aggregation_iff_its_aggregate_needs_only_the_mean(
        name, tiny_overrides):
    """The declaration is checked against the method itself: where it says the mean suffices,
    aggregating the one weighted mean equals aggregating the updates; where it gives a reason,
    the two differ, and the config is refused with that reason."""
    rank = method_class(name).fixed_rank  # xgblora is defined at rank 1
    needs = [f"method.rank={rank}"] if rank else []
    config = load_config(None, tiny_overrides + [f"method.name={name}", "federation.rounds=1", *needs,
                                                 *(["train.optimizer=adam"] if name == "galore" else [])])
    exp = build_experiment(config)
    glob = exp.method.init_global(exp.initial)
    glob = exp.method.aggregate(glob, random_updates(exp, glob, seed=1), 0)  # B ≠ 0 everywhere
    updates = random_updates(exp, glob, seed=2)
    mean = weighted_mean([u.state for u in updates], [float(u.num_examples) for u in updates])
    one = exp.method.aggregate(glob, [Update(-1, mean, sum(u.num_examples for u in updates))], 0)
    each = exp.method.aggregate(glob, updates, 0)
    same = all(torch.allclose(one.tensors()[k].double(), each.tensors()[k].double(), atol=1e-6)
               for k in each.tensors())
    why = method_class(name).needs_each_upload
    assert same == (not why), name
    if why:
        with pytest.raises(ConfigError, match="cannot be aggregated from a sum") as err:
            load_config(None, tiny_overrides + SECURE + [f"method.name={name}", *needs])
        assert why in str(err.value)
    else:
        load_config(None, tiny_overrides + SECURE + [f"method.name={name}", *needs])


@pytest.mark.parametrize("extra, fix", [
    (["federation.max_update_norm=0"], "federation.max_update_norm"),
    (["federation.clients=2"], "at least 3 sites per round"),
    (["federation.clients_per_round=2"], "at least 3 sites per round"),
    (["method.client_ranks=[2, 4, 8]"], "remove method.client_ranks"),
])
def test_inapplicable_combinations_are_refused(tiny_overrides, extra, fix):
    overrides = ["federation.secure_aggregation=true", "federation.max_update_norm=1.0", *extra]
    with pytest.raises(ConfigError, match="secure_aggregation") as err:
        load_config(None, tiny_overrides + overrides)
    assert fix in str(err.value)


def test_the_simulation_refuses_it_as_a_deployment_feature(tiny_overrides, tmp_path):
    import fedlora

    with pytest.raises(ConfigError, match="deployment feature"):
        fedlora.run(load_config(None, tiny_overrides + SECURE), tmp_path / "sim", progress=None)
    assert not (tmp_path / "sim").exists() and not (tmp_path / "sim.partial").exists()
