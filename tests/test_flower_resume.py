"""Flower runs survive restarts: a site's privacy ledger outlives its SuperNode, and a ServerApp
that dies is resumed from its checkpoint (in one process, over an in-memory grid; the real
processes, killed with SIGKILL, are in test_flower_deploy.py).

References: one uninterrupted site / run with the same seed, and Opacus's own RDP accountant
fed every step the site took — a restart must neither reset ε nor charge a round twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_flower import MemoryGrid, _run_config, task_identity  # noqa: E402,F401

from fedlora.config import load_config  # noqa: E402
from fedlora.errors import ConfigError, FedloraError  # noqa: E402
from fedlora.federation.flower import cli as flower_cli  # noqa: E402
from fedlora.federation.flower import client_app, messages  # noqa: E402
from fedlora.federation.flower.runconfig import read_run_config  # noqa: E402
from fedlora.federation.flower.server_app import build_server, serve  # noqa: E402
from fedlora.federation.flower.sitestate import state_dir  # noqa: E402
from fedlora.federation.wire import encode_state  # noqa: E402
from fedlora.privacy import accountant as acc_mod  # noqa: E402
from fedlora.privacy.ledger import LedgerError  # noqa: E402

ROUNDS, LOCAL_STEPS = 3, 2


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return tiny_overrides + ["privacy.noise=seeded"]


@pytest.fixture
def two(tiny_overrides):
    """2 sites, 3 rounds of 2 DP-SGD steps (σ is calibrated for all 6)."""
    return load_config(None, tiny_overrides + ["federation.clients=2", f"federation.rounds={ROUNDS}",
                                               f"federation.local_steps={LOCAL_STEPS}"])


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε of `steps` DP-SGD steps at (σ, q), from Opacus's own accountant class."""
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = [(sigma, q, steps)]
    return reference.get_epsilon(delta, alphas=list(acc_mod.RDP_ORDERS))


# ------------------------------------------------------------------------------ one site
class SiteProcess:
    """Messages to one site's ClientApp; each call has a fresh Context, as a restarted SuperNode
    (and every new ClientApp process) has: whatever the site remembers comes from its disk."""

    def __init__(self, config, tmp_path: Path, state: Path, cid: int = 0):
        self.run_config = _run_config(config, tmp_path)
        self.node_config = {"partition-id": cid, "num-partitions": 2, "state-dir": str(state)}
        if config.privacy.noise == "seeded":  # the site's consent to noise the seed regenerates
            self.node_config["allow-seeded-noise"] = True
        self.cid = cid
        server, self.labels = build_server(config, "")
        self.method = server.method
        self.download = server.method.download(server.method.init_global(server.initial), cid)

    def train(self, round: int, download=None, checkpointed: int = 0) -> tuple[dict, dict]:
        """(reply record, upload) of the site's answer to round `round` (0-based)."""
        record = messages.train_record(round, self.cid, encode_state(download or self.download),
                                       self.labels, checkpointed)
        msg = Message(RecordDict({messages.RECORD: ConfigRecord(record)}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink stamps it
        context = Context(run_id=1, node_id=1, node_config=self.node_config, state=RecordDict(),
                          run_config=self.run_config)
        content = client_app.train(msg, context).content.config_records[messages.RECORD]
        reply, facts, _ = messages.read_reply(content)
        return {"epsilon": reply.epsilon, "steps": reply.steps, "refused": reply.refused,
                "sigma": facts.noise_multiplier, "q": facts.sample_rate}, reply.upload


def _ledger_steps(state: Path) -> int:
    """Steps the site's ledger on disk says it has been charged for."""
    (ledger,) = state.glob("run-*/ledger.json")
    rounds = json.loads(ledger.read_text())["rounds"]
    return max(sum(n for _, _, n in e["accountant"]["history"]) for e in rounds.values()
               if "accountant" in e)


def test_a_restarted_site_does_not_start_a_fresh_ledger(two, tmp_path):
    """Rounds 1–2, then the site restarts (new process, same state-dir), round 3: ε is that of one
    uninterrupted site over all 6 steps; a round asked again is replayed, never charged twice."""
    site = SiteProcess(two, tmp_path, tmp_path / "site")
    first = [site.train(r) for r in range(2)]
    restarted = SiteProcess(two, tmp_path, tmp_path / "site")  # nothing kept in memory
    third, upload3 = restarted.train(2)
    sigma, q, delta = third["sigma"], third["q"], two.privacy.delta
    assert third["refused"] is None and third["steps"] == ROUNDS * LOCAL_STEPS
    assert third["epsilon"] == opacus_epsilon(sigma, q, 6, delta)
    assert third["epsilon"] > first[1][0]["epsilon"] > first[0][0]["epsilon"] > 0
    # the same site never interrupted: the same uploads and the same ε, round by round
    whole = SiteProcess(two, tmp_path, tmp_path / "whole")
    for r, (reply, upload) in enumerate(first + [(third, upload3)]):
        ref_reply, ref_upload = whole.train(r)
        assert reply == ref_reply
        assert all(torch.equal(upload[k], ref_upload[k]) for k in ref_upload)
    # a server resumed from its checkpoint after round 1 asks for rounds 2 and 3 again
    for r in (1, 2):
        again, upload = SiteProcess(two, tmp_path, tmp_path / "site").train(r, checkpointed=1)
        assert again["epsilon"] == opacus_epsilon(sigma, q, 2 * (r + 1), delta)  # as reported then
        assert again["steps"] == 2 * (r + 1)
    assert all(torch.equal(upload[k], upload3[k]) for k in upload3)
    assert _ledger_steps(tmp_path / "site") == 6  # charged once: 3 rounds × 2 steps


def test_a_round_asked_again_from_another_model_is_refused(two, tmp_path):
    site = SiteProcess(two, tmp_path, tmp_path / "site")
    site.train(0)
    other = {k: v + 1e-3 for k, v in site.download.items()}
    reply, upload = SiteProcess(two, tmp_path, tmp_path / "site").train(0, download=other)
    assert "different model" in reply["refused"] and upload == {}
    assert _ledger_steps(tmp_path / "site") == 2


@pytest.mark.parametrize("damage", ["truncated ledger", "garbage ledger", "site.json", "snapshot"])
def test_an_unreadable_site_state_is_refused_not_restarted_at_zero(two, tmp_path, damage):
    site = SiteProcess(two, tmp_path, tmp_path / "site")
    site.train(0)
    (run,) = (tmp_path / "site").glob("run-*")
    target = {"truncated ledger": run / "ledger.json", "garbage ledger": run / "ledger.json",
              "site.json": run / "site.json", "snapshot": run / "round-0.safetensors"}[damage]
    raw = target.read_bytes()
    target.write_bytes(b'{"rounds": {"0": {"digest": 1}}}' if damage == "garbage ledger"
                       else raw[: len(raw) // 2])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(LedgerError, match="unreadable") as err:
        site.train(1)
    assert isinstance(err.value, FedloraError) and str(target) in str(err.value)
    assert "restore the f" in str(err.value)  # the fix: restore the file / folder
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_state_dir_is_absolute_and_the_supernode_command_writes_one(tmp_path, monkeypatch):
    assert state_dir({"state-dir": "/var/lib/site0"}, 0) == Path("/var/lib/site0")
    with pytest.raises(ConfigError, match="state-dir='site0' must be an absolute"):
        state_dir({"state-dir": "site0"}, 0)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert state_dir({}, 2) == tmp_path / "home" / "fedlora-state" / "client-2"
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(partition="1/3", data_path=None, client_id=None, text_column=None,
                              label_column=None, state_dir=None)
    assert flower_cli._node_config(args)["state-dir"] == str(tmp_path / "fedlora-state" / "client-1")
    args.state_dir = "mine"
    assert flower_cli._node_config(args)["state-dir"] == str(tmp_path / "mine")


# ------------------------------------------------------------------------------ the server
class Crash(Exception):
    """The ServerApp process dies (in the deploy tests: SIGKILL)."""


def _grid(config, tmp_path) -> MemoryGrid:
    """Two fresh SuperNodes (empty Context.state) whose sites keep state in tmp_path/sites."""
    return MemoryGrid({7: {"partition-id": 0, "num-partitions": 2},
                       3: {"partition-id": 1, "num-partitions": 2}},
                      _run_config(config, tmp_path), tmp_path / "sites")


def _serve(config, tmp_path, grid, *, resume: bool = False):
    run = read_run_config(grid.contexts[next(iter(grid.contexts))].run_config)
    run = dataclasses.replace(run, out=str(tmp_path / "run"), round_timeout=5.0,
                              connect_timeout=1.0, resume=resume)
    for ctx in grid.contexts.values():  # the sites see the run config the server runs
        ctx.run_config = {**ctx.run_config, "out": run.out}
    return serve(grid, run, say=lambda s: None)


def _crash_when(grid: MemoryGrid, round: int, delivered: int) -> None:
    """Crash once round `round`'s train messages are sent and `delivered` of them trained."""
    deliver = grid.send_and_receive

    def send_and_receive(msgs, *, timeout=None):
        train = [m for m in msgs if m.metadata.message_type == "train"]
        if train and train[0].content.config_records["fedlora"]["round"] == round:
            deliver(train[:delivered], timeout=timeout)
            raise Crash
        return deliver(msgs, timeout=timeout)

    grid.send_and_receive = send_and_receive


def _outcome(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("wall_seconds", "out"):
        summary.pop(key, None)
    metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("seconds")
    return {"summary": summary, "metrics": metrics,
            "adapter": load_file(folder / "adapter" / "adapter_model.safetensors")}


@pytest.mark.parametrize("method, round, delivered", [
    ("ffa", 1, 2),    # both sites trained round 2, the server died before aggregating it
    ("ffa", 2, 1),    # one site trained round 3, the other never heard of it
    ("fedsa", 1, 1),  # personal B and head at the sites: replay starts from the right snapshot
    ("ffa", 0, 2),    # died in round 1, before any checkpoint: resumed from the start
])
def test_a_crashed_server_resumes_to_the_same_adapter(two, tmp_path, method, round, delivered):
    config = dataclasses.replace(two, method=dataclasses.replace(two.method, name=method))
    reference = _outcome_of(config, tmp_path / "reference")
    grid = _grid(config, tmp_path)
    _crash_when(grid, round, delivered)
    with pytest.raises(Crash) as err:
        _serve(config, tmp_path, grid)
    assert "resume=true" in "".join(getattr(err.value, "__notes__", []))
    partial = tmp_path / "run.partial"
    assert partial.is_dir() and not (tmp_path / "run").exists()
    assert (partial / "checkpoint.safetensors").exists() == (round > 0)
    summary = _serve(config, tmp_path, _grid(config, tmp_path), resume=True)  # SuperNodes restarted too
    got = _outcome(tmp_path / "run")
    assert got["metrics"] == reference["metrics"]
    assert got["summary"] == reference["summary"]
    assert got["adapter"].keys() == reference["adapter"].keys()
    assert all(torch.equal(got["adapter"][k], reference["adapter"][k]) for k in got["adapter"])
    # ε never under-reported, never double-charged: each site's 6 steps, as Opacus counts them
    sigmas, qs = summary["noise_multiplier"], summary["sample_rates"]
    for cid in range(2):
        want = opacus_epsilon(sigmas[cid], qs[cid], ROUNDS * LOCAL_STEPS, config.privacy.delta)
        assert summary["epsilon_per_client"][cid] == want
        assert _ledger_steps(next((tmp_path / "sites").glob(f"node-{(7, 3)[cid]}"))) == 6


def test_a_crash_after_the_centring_query_resumes_to_the_simulation(two, tiny_st_model_dir,
                                                                    tmp_path):
    """With DP feature centring the sites answer a query before round 1 (recorded in their
    ledgers as round -1): a server that dies in round 1 asks it again after the restart, and the
    sites replay their answers — the simulation's adapter, each site charged once."""
    import fedlora

    config = dataclasses.replace(two, model=dataclasses.replace(two.model, path=str(tiny_st_model_dir)))
    sim = fedlora.run(config, tmp_path / "sim", progress=None)
    assert sim["feature_center"] and sim["feature_center"]["clients"] == 2
    grid = _grid(config, tmp_path)
    _crash_when(grid, 0, 1)
    with pytest.raises(Crash):
        _serve(config, tmp_path, grid)
    summary = _serve(config, tmp_path, _grid(config, tmp_path), resume=True)
    ours = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert summary["epsilon_per_client"] == sim["epsilon_per_client"]
    assert summary["feature_center"]["norm"] == sim["feature_center"]["norm"]
    # the query (1 step) and 3 rounds × 2 DP-SGD steps, each charged once
    assert [_ledger_steps(tmp_path / "sites" / f"node-{n}") for n in (7, 3)] == [7, 7]


def _outcome_of(config, folder: Path) -> dict:
    """The same run uninterrupted (its sites' state in a folder of its own)."""
    folder.mkdir()
    grid = _grid(config, folder)
    _serve(config, folder, grid)
    return _outcome(folder / "run")


def test_resume_refuses_before_any_site_is_asked(two, tmp_path):
    grid = _grid(two, tmp_path)
    with pytest.raises(ConfigError, match="no interrupted run"):
        _serve(two, tmp_path, grid, resume=True)
    assert grid.sent == []
    # a partial run of another config: refused, the folder untouched
    grid = _grid(two, tmp_path)
    _crash_when(grid, 1, 2)
    with pytest.raises(Crash):
        _serve(two, tmp_path, grid)
    again = _grid(two, tmp_path)
    with pytest.raises(ConfigError, match="resume=true"):  # a new run would overwrite it
        _serve(two, tmp_path, again)
    other = dataclasses.replace(two, seed=two.seed + 1)
    fresh = _grid(other, tmp_path)
    with pytest.raises(ConfigError, match="another config"):
        _serve(other, tmp_path, fresh, resume=True)
    assert again.sent == fresh.sent == [] and (tmp_path / "run.partial" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("values, message", [
    ({"resume": "yes"}, "resume='yes' must be true or false"),
    ({"resume": True, "out": ""}, "resume=true needs `out`"),
])
def test_resume_run_config_is_validated(two, tmp_path, values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_run_config({**_run_config(two, tmp_path), **values})


def test_app_folder_can_be_resumed_by_flwr_run_config(two, tmp_path):
    """`flwr run APP CONN --run-config resume=true` only overrides keys the app declares."""
    from flwr.common.config import fuse_dicts, parse_config_args

    raw = _run_config(two, tmp_path)
    assert raw["resume"] is False
    fused = fuse_dicts(raw, parse_config_args(["resume=true"]))
    assert read_run_config(fused).resume is True
