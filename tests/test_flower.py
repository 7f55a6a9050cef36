"""fedlora over Flower: records, node configs, the transport over an in-memory grid, and real
deployments (a SuperLink and SuperNodes as separate processes on 127.0.0.1; marked `flower`).

The reference for every run is the in-process simulation with the same seed and data: a
Flower run must end with the same adapter, the same ε per site and the same byte counts.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import fedlora  # noqa: E402
from fedlora.mixture import MIXTURE_FILE  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.errors import ConfigError, FederationError  # noqa: E402
from fedlora.federation.client import ClientReply  # noqa: E402
from fedlora.federation.flower import client_app, deploy, messages, site  # noqa: E402
from fedlora.federation.flower.runconfig import read_run_config  # noqa: E402
from fedlora.federation.flower.server_app import build_server, connect  # noqa: E402
from fedlora.federation.flower.transport import FlowerTransport  # noqa: E402
from fedlora.federation.wire import payload_bytes  # noqa: E402
from fedlora.outputs import RunFolder  # noqa: E402
from fedlora.runner import execute  # noqa: E402


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return tiny_overrides + ["privacy.noise=seeded"]


SRC = Path(__file__).resolve().parents[1] / "src"


# ------------------------------------------------------------------------------ records
def test_reply_record_round_trips_and_counts_payload_bytes():
    upload = {"a.lora_B.weight": torch.randn(4, 2), "head.weight": torch.randn(2, 4)}
    reply = ClientReply(client=2, upload=upload, num_examples=17, epsilon=1.25, steps=6,
                        train_loss=0.5)
    facts = messages.SiteFacts(2, 17, 1.1, 0.25, ["neg", "pos"])
    values, size = messages.reply_record(reply, facts)
    back, back_facts, back_size = messages.read_reply(ConfigRecord(values))
    assert size == back_size == payload_bytes(upload)
    assert back_facts == facts and back.refused is None
    assert (back.client, back.num_examples, back.epsilon, back.steps) == (2, 17, 1.25, 6)
    assert all(torch.equal(back.upload[k], upload[k]) for k in upload)


def test_refusal_carries_no_payload():
    reply = ClientReply(1, {}, 5, 2.9, 8, math.nan, refused="budget spent")
    values, size = messages.reply_record(reply, messages.SiteFacts(1, 5, 1.0, 1.0, ["a", "b"]))
    back, _, back_size = messages.read_reply(ConfigRecord(values))
    assert size == back_size == 0 and back.refused == "budget spent" and back.upload == {}


# ------------------------------------------------------------------------------ node configs
@pytest.fixture
def three(tiny_overrides):
    return load_config(None, tiny_overrides)


@pytest.mark.parametrize("node_config, fix", [
    ({}, "partition-id"),
    ({"partition-id": 3, "num-partitions": 3}, "[0, 2]"),
    ({"partition-id": "0", "num-partitions": 3}, "integer"),
    ({"data-path": "x.csv"}, "client-id"),
    ({"partition_id": 0}, "unknown keys"),
])
def test_bad_node_config_names_the_key(three, node_config, fix):
    with pytest.raises(ConfigError, match="node config") as err:
        site.client_id(node_config, three)
    assert fix in str(err.value)


def test_num_partitions_must_match_the_run(three):
    with pytest.raises(ConfigError, match="num-partitions=4"):
        site.site_examples(three, {"partition-id": 0, "num-partitions": 4})


def test_a_site_with_its_own_file(three, tmp_path, toy_csv):
    own = tmp_path / "site.csv"
    own.write_text("words,label\ngood fun,pos\ndull bad,neg\n", encoding="utf-8")
    data = site.site_examples(
        three, {"data-path": str(own), "client-id": 1, "text-column": "words", "label-column": "label"})
    ds = data.dataset
    assert (data.client, data.train) == (1, [0, 1])
    assert ([ds.texts[i] for i in data.train], [ds.label_names[ds.labels[i]] for i in data.train]) \
        == (["good fun", "dull bad"], ["pos", "neg"])
    with pytest.raises(fedlora.errors.DataError, match="not among the run's labels"):
        site.Site.build(three, {"data-path": str(own), "client-id": 1, "text-column": "words",
                                "label-column": "label"}, ["bad", "good"])


# ------------------------------------------------------------------------------ app folder
def test_app_folder_carries_the_config_unchanged(three, tmp_path):
    folder = deploy.write_app(tmp_path / "app", three, tmp_path / "out", round_timeout=30)
    raw = tomllib.loads((folder / "pyproject.toml").read_text())
    assert raw["tool"]["flwr"]["app"]["components"] == {"serverapp": deploy.SERVER_APP,
                                                        "clientapp": deploy.CLIENT_APP}
    run = read_run_config(raw["tool"]["flwr"]["app"]["config"])
    assert run.config == three and run.out == str(tmp_path / "out") and run.round_timeout == 30


def test_min_clients_is_validated(tiny_overrides):
    with pytest.raises(ConfigError, match="federation.min_clients"):
        load_config(None, tiny_overrides + ["federation.min_clients=4"])


# ------------------------------------------------------------------------------ in-memory grid
@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps messages with the identity of the process's task; the SuperLink's
    ServerApp process sets it — here, in one process, the test does."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class MemoryGrid:
    """Flower's Grid contract, delivering messages to the real ClientApp functions in this
    process; a node in `broken` answers with an error, a node in `silent` never answers."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict, state_root: Path):
        """Each node keeps its state in `state_root/node-<id>` unless its config says where."""
        node_configs = {n: {"state-dir": str(state_root / f"node-{n}"),
                            # the sites consent to seeded noise and share their personalised
                            # scores, so runs compare bit for bit with the simulation
                            "allow-seeded-noise": True, "share-evaluation": True, **c}
                        for n, c in node_configs.items()}
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(),
                                    run_config=run_config) for n, c in node_configs.items()}
        self.broken: set[int] = set()
        self.silent: set[int] = set()
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, msgs, *, timeout=None):
        replies = []
        for msg in msgs:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.broken:
                replies.append(Message(Error(code=5, reason="node unavailable"), reply_to=msg))
                continue
            handler = {"train": client_app.train, "query": client_app.query,
                       "evaluate": client_app.evaluate}[msg.metadata.message_type]
            replies.append(handler(msg, self.contexts[node]))
        return replies


def _flower_in_memory(config, tmp_path, grid):
    run = read_run_config(grid.contexts[next(iter(grid.contexts))].run_config)
    run.round_timeout, run.connect_timeout = 5.0, 1.0
    server, transport = connect(grid, run, say=lambda s: None)
    folder = RunFolder(tmp_path / "flower").open()
    summary = execute(server, transport, folder, lambda s: None, 0.0, transport.client_facts)
    return summary, folder.tmp, transport


def _run_config(config, tmp_path) -> dict:
    folder = deploy.write_app(tmp_path / "app", config, tmp_path / "unused")
    return tomllib.loads((folder / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


@pytest.mark.parametrize("extra", [[], ["method.name=fedsvd"], ["method.chain_every=1"],
                                   ["method.name=xgblora", "method.rank=1"], ["method.name=reslora"],
                                   ["federation.server_optimizer=adam", "federation.server_lr=0.05"]],
                         ids=["ffa", "fedsvd", "ffa-chained", "xgblora", "reslora", "fedadam"])
def test_flower_transport_matches_the_simulation(tiny_overrides, tmp_path, extra):
    """Node ids are arbitrary; partition ids decide which client a node is. FedSVD's A, a
    chain's (and XGBLoRA's) links travel in the downloads like any tensor; ResLoRA's paths are
    built on every site; FedAdam's moments stay on the server."""
    config = load_config(None, tiny_overrides + extra)
    grid = MemoryGrid({9001: {"partition-id": 2, "num-partitions": 3},
                       17: {"partition-id": 0, "num-partitions": 3},
                       555: {"partition-id": 1, "num-partitions": 3}}, _run_config(config, tmp_path),
                      tmp_path / "sites")
    summary, out, transport = _flower_in_memory(config, tmp_path, grid)
    sim = fedlora.run(config, tmp_path / "sim", progress=None)
    assert transport.nodes == {0: 17, 1: 555, 2: 9001}
    for key in ("test_accuracy", "test_loss", "epsilon_per_client", "noise_multiplier",
                "sample_rates", "steps", "client_sizes", "bytes_uploaded", "bytes_downloaded"):
        assert summary[key] == sim[key], key
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # each site's ledger is on its own disk: 2 rounds × 2 steps, as one accountant
    for ledger in (tmp_path / "sites").glob("node-*/run-*/ledger.json"):
        rounds = json.loads(ledger.read_text())["rounds"]
        assert sum(n for _, _, n in rounds[max(rounds, key=int)]["accountant"]["history"]) == 4
    assert len(list((tmp_path / "sites").glob("node-*/run-*/ledger.json"))) == 3


@pytest.mark.parametrize("method", ["fedsa", "mole"])
def test_personalised_method_is_scored_by_the_sites(tiny_overrides, tmp_path, method):
    """fedsa keeps B and the head at each site, mole its gates; each site scores its own model
    on its own held-out part — the same numbers as the simulation's per-client evaluation."""
    config = load_config(None, tiny_overrides + [f"method.name={method}"])
    grid = MemoryGrid({k + 10: {"partition-id": k, "num-partitions": 3} for k in range(3)},
                      _run_config(config, tmp_path), tmp_path / "sites")
    summary, out, _ = _flower_in_memory(config, tmp_path, grid)
    sim = fedlora.run(config, tmp_path / "sim", progress=None)
    for key in ("test_accuracy", "test_loss", "test_accuracy_per_client", "epsilon_per_client",
                "bytes_uploaded", "client_sizes"):
        assert summary[key] == sim[key], key
    name = MIXTURE_FILE if method == "mole" else "adapter_model.safetensors"
    ours = load_file(out / "adapter" / name)
    theirs = load_file(tmp_path / "sim" / "adapter" / name)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _three_nodes(config, tmp_path) -> MemoryGrid:
    return MemoryGrid({k + 1: {"partition-id": k, "num-partitions": 3} for k in range(3)},
                      _run_config(config, tmp_path), tmp_path / "sites")


def test_a_failed_site_is_logged_and_the_round_goes_on(tiny_overrides, tmp_path):
    """Round 2: node 2 fails (an error reply), node 3 never answers; client 0 carries on."""
    config = load_config(None, tiny_overrides + ["federation.min_clients=1"])
    grid = _three_nodes(config, tmp_path)
    deliver = grid.send_and_receive

    def failing_in_round_two(msgs, *, timeout=None):
        if any(m.metadata.message_type == "train" and
               m.content.config_records["fedlora"]["round"] == 1 for m in msgs):
            grid.broken.add(2)
            grid.silent.add(3)
        return deliver(msgs, timeout=timeout)

    grid.send_and_receive = failing_in_round_two
    summary, out, _ = _flower_in_memory(config, tmp_path, grid)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["failed"] == {}
    assert set(lines[1]["failed"]) == {"1", "2"} and "node unavailable" in lines[1]["failed"]["1"]
    assert "no answer" in lines[1]["failed"]["2"]
    assert summary["rounds"] == 2 and summary["steps"] == [4, 2, 2]
    assert lines[1]["epsilon_per_client"][1:] == lines[0]["epsilon_per_client"][1:]


def test_too_few_answers_stop_the_run(tiny_overrides, tmp_path):
    config = load_config(None, tiny_overrides + ["federation.min_clients=3"])
    grid = _three_nodes(config, tmp_path)
    server, labels = build_server(config, "")
    transport = FlowerTransport(grid, labels, 3, 5.0, say=lambda s: None)
    transport.connect(1.0, 3)  # all three answer who they are ...
    grid.broken.add(3)  # ... then one fails to train
    with pytest.raises(FederationError, match="federation.min_clients=3"):
        execute(server, transport, RunFolder(tmp_path / "f").open(), lambda s: None, 0.0,
                transport.client_facts)


def test_too_few_sites_connected(tiny_overrides, tmp_path):
    config = load_config(None, tiny_overrides + ["federation.min_clients=3"])
    grid = MemoryGrid({1: {"partition-id": 0, "num-partitions": 3}}, _run_config(config, tmp_path),
                      tmp_path / "sites")
    transport = FlowerTransport(grid, ["neg", "pos"], 3, 5.0, say=lambda s: None)
    with pytest.raises(FederationError, match="only 1 of 3 sites connected"):
        transport.connect(0.1, 3)


def test_connection_is_added_next_to_flowers_defaults(tmp_path):
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML
    from flwr.cli.flower_config import read_superlink_connection

    (tmp_path / "config.toml").write_text(DEFAULT_FLOWER_CONFIG_TOML)  # what flwr writes first
    deploy.write_connection(tmp_path, "localhost", "127.0.0.1:9999", root_certificates="ca.crt")
    raw = tomllib.loads((tmp_path / "config.toml").read_text())
    assert raw["superlink"]["default"] == "local" and "supergrid" in raw["superlink"]
    import os

    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(tmp_path)
    try:
        conn = read_superlink_connection("localhost")  # Flower's own reader accepts it
    finally:
        os.environ.pop("FLWR_HOME") if old is None else os.environ.__setitem__("FLWR_HOME", old)
    assert conn.address == "127.0.0.1:9999" and conn.root_certificates.endswith("ca.crt")


def test_superlink_never_installs_dependencies_and_supernode_is_told_its_site():
    link = deploy.superlink_command(port=9999, tls_dir="/certs", auth=True)
    assert "--disable-runtime-dependency-installation" in link and "--insecure" not in link
    assert link[link.index("--ssl-ca-certfile") + 1] == "/certs/ca.crt" and "--enable-supernode-auth" in link
    node = deploy.supernode_command(superlink="127.0.0.1:9999", port=9101,
                                    node_config={"data-path": "/d/site a.csv", "client-id": 2})
    assert "--allow-runtime-dependency-installation" not in node and "--insecure" in node
    from flwr.common.config import parse_config_args  # how the SuperNode reads --node-config

    text = node[node.index("--node-config") + 1]
    assert parse_config_args([text]) == {"data-path": "/d/site a.csv", "client-id": 2}


def test_cli_app_takes_overrides_after_options(tmp_path, tiny_overrides):
    from fedlora.cli import main

    folder = tmp_path / "app"
    assert main(["flower", "app", str(folder), "--out", str(tmp_path / "run"), *tiny_overrides,
                 "federation.rounds=3"]) == 0
    raw = tomllib.loads((folder / "pyproject.toml").read_text())
    run = read_run_config(raw["tool"]["flwr"]["app"]["config"])
    assert run.config == load_config(None, tiny_overrides + ["federation.rounds=3"])
    with pytest.raises(SystemExit):
        main(["flower", "app", str(folder), "--bogus"])


@pytest.mark.parametrize("method", ["ffa", "fedsa"])
def test_flower_scores_the_simulations_subsets(method, tiny_overrides, tmp_path):
    """federation.eval_examples over Flower: the ServerApp's held-out subset (ffa) and each
    site's share of its own held-out part (fedsa, personalised) are the simulation's, round by
    round; the last round is scored on the whole set by both."""
    config = load_config(None, tiny_overrides + [f"method.name={method}", "federation.rounds=3",
                                                 "federation.eval_examples=6"])
    grid = _three_nodes(config, tmp_path)
    summary, out, _ = _flower_in_memory(config, tmp_path, grid)
    sim = fedlora.run(config, tmp_path / "sim", progress=None)
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    ours, theirs = read(out), read(tmp_path / "sim")
    assert [r.get("test_examples") for r in theirs] == [6, 6, None]
    keys = ("test_accuracy", "test_loss", "test_examples", "test_accuracy_per_client")
    for x, y in zip(ours, theirs, strict=True):
        assert {k: x.get(k) for k in keys} == {k: y.get(k) for k in keys}
    assert summary["test_accuracy"] == sim["test_accuracy"] == theirs[-1]["test_accuracy"]


@pytest.mark.parametrize("method", ["ffa", "fedsa"])
def test_a_causal_lm_runs_on_flower_as_in_the_simulation(method, causal_overrides, tmp_path):
    """The causal task over Flower: the sites build data, tokens and targets, and (fedsa) score
    their own generations, through the same task-driven builders as the simulation — the same
    adapter, scores and ε, bit for bit, in seeded mode."""
    config = load_config(None, causal_overrides + ["privacy.noise=seeded", f"method.name={method}",
                                                   "federation.clients=2"])
    grid = MemoryGrid({k + 20: {"partition-id": k, "num-partitions": 2} for k in range(2)},
                      _run_config(config, tmp_path), tmp_path / "sites")
    summary, out, transport = _flower_in_memory(config, tmp_path, grid)
    sim = fedlora.run(config, tmp_path / "sim", progress=None)
    assert transport.label_names == []  # a causal LM has no labels to number
    for key in ("test_accuracy", "test_loss", "test_accuracy_per_client", "epsilon_per_client",
                "steps", "client_sizes", "bytes_uploaded"):
        assert summary.get(key) == sim.get(key), key
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "merged" / "config.json").is_file() == (tmp_path / "sim" / "merged" / "config.json").is_file()
