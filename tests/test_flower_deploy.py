"""Real deployments: a SuperLink and SuperNodes as separate processes on 127.0.0.1.

Each test compares against the in-process simulation with the same seed and data. Ports are
picked free at run time, FLWR_HOME is a temporary folder, every wait is bounded, and the
`deployment` fixture stops every process it started (and their children), pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flower_harness import Deployment, wait_for  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import fedlora  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.experiment import build_experiment  # noqa: E402
from fedlora.federation.flower import certs, deploy  # noqa: E402
from fedlora.federation.wire import payload_bytes  # noqa: E402

pytestmark = pytest.mark.flower


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return tiny_overrides + ["privacy.noise=seeded"]


SRC = Path(__file__).resolve().parents[1] / "src"
RUN_TIMEOUT = 540  # seconds for a whole `flwr run` (a few tiny rounds take ~1 min)


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path, SRC)
    try:
        yield d
    finally:
        d.stop()


def _records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _flwr_run(d: Deployment, config, out: Path, connection: str = "local", *extra: str):
    app = deploy.write_app(d.root / "app", config, out, round_timeout=300, connect_timeout=120)
    proc = d.flwr("run", str(app), connection, "--stream", *extra, timeout=RUN_TIMEOUT)
    assert (out / "summary.json").exists(), (
        f"flwr run exited {proc.returncode} without a run folder; logs in {d.root}\n"
        + d.log(list(d.procs)[-1])[-3000:])
    return json.loads((out / "summary.json").read_text())


def _assert_same_as_simulation(flower_out: Path, sim_out: Path, rounds: int) -> None:
    ours = load_file(flower_out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(sim_out / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    flower, sim = _records(flower_out), _records(sim_out)
    assert len(flower) == len(sim) == rounds
    for f, s in zip(flower, sim):
        assert f["epsilon_per_client"] == pytest.approx(s["epsilon_per_client"])  # ε per site
        assert f["test_loss"] == pytest.approx(s["test_loss"], rel=1e-5)
        assert (f["bytes_uploaded"], f["bytes_downloaded"]) == (s["bytes_uploaded"], s["bytes_downloaded"])


def _payload_sizes(config) -> tuple[int, int]:
    exp = build_experiment(config)
    glob = exp.method.init_global(exp.initial)
    return payload_bytes(exp.method.upload(exp.initial, 0)), payload_bytes(exp.method.download(glob, 0))


def _simulation_and_deployment(d: Deployment, config, tmp_path: Path, sites: int):
    """The run in the simulation, then on a SuperLink with `sites` demo SuperNodes: both summaries,
    once the deployment's adapter and metrics are checked against the simulation's."""
    sim = fedlora.run(config, tmp_path / "sim", progress=None)
    d.superlink()
    for k in range(sites):
        d.supernode(f"node{k}", {"partition-id": k, "num-partitions": sites})
    deploy.write_connection(d.home, "local", d.address)
    summary = _flwr_run(d, config, tmp_path / "flower")
    _assert_same_as_simulation(tmp_path / "flower", tmp_path / "sim", rounds=config.federation.rounds)
    return sim, summary


def test_three_sites_match_the_simulation(deployment, tiny_overrides, tmp_path):
    """Two rounds of FFA-LoRA with DP: same adapter, same ε per site, bytes = payload sizes."""
    config = load_config(None, tiny_overrides)
    sim, summary = _simulation_and_deployment(deployment, config, tmp_path, sites=3)
    up, down = _payload_sizes(config)
    for record in _records(tmp_path / "flower"):
        assert record["bytes_uploaded"] == 3 * up and record["bytes_downloaded"] == 3 * down
        assert record["failed"] == {}
    assert summary["epsilon_per_client"] == pytest.approx(sim["epsilon_per_client"])
    assert all(0 < e <= 3.0 for e in summary["epsilon_per_client"])
    assert summary["steps"] == sim["steps"] == [4, 4, 4]
    assert summary["noise_multiplier"] == pytest.approx(sim["noise_multiplier"])


def test_a_causal_lm_on_a_real_deployment_matches_the_simulation(deployment, causal_overrides,
                                                                  tmp_path):
    """The tiny Llama on prompt → answer pairs, two sites in their own SuperNode processes:
    the same adapter and ε per site as the simulation, in seeded mode."""
    config = load_config(None, causal_overrides + ["federation.clients=2", "privacy.noise=seeded"])
    sim, summary = _simulation_and_deployment(deployment, config, tmp_path, sites=2)
    assert summary["task"] == "causal" and summary["steps"] == sim["steps"]


def test_a_killed_site_does_not_stop_the_run(deployment, tiny_overrides, tmp_path):
    """SIGKILL one SuperNode once round 1 is recorded: round 2 goes on with the other two."""
    config = load_config(None, tiny_overrides + ["federation.min_clients=2"])
    d = deployment
    d.superlink()
    for k in range(3):
        d.supernode(f"node{k}", {"partition-id": k, "num-partitions": 3})
    deploy.write_connection(d.home, "local", d.address)
    out = tmp_path / "flower"
    app = deploy.write_app(d.root / "app", config, out, round_timeout=300, connect_timeout=120)
    run = d.start("flwr-run", [str(Path(deploy.executable("flwr"))), "run", str(app), "local", "--stream"])

    def round_one_done() -> bool:
        return any(len(_records(p.parent)) >= 1 for p in tmp_path.glob("flower.partial/metrics.jsonl"))

    wait_for(round_one_done, RUN_TIMEOUT, "round 1", [run])
    d.kill(d.procs["node2"])
    wait_for(lambda: (out / "summary.json").exists(), RUN_TIMEOUT, "the run's end", [])
    summary = json.loads((out / "summary.json").read_text())
    records = _records(out)
    assert [r["round"] for r in records] == [1, 2]
    assert records[0]["failed"] == {} and set(records[1]["failed"]) == {"2"}
    assert summary["rounds"] == 2 and summary["steps"] == [4, 4, 2]
    assert records[1]["epsilon_per_client"][2] == records[0]["epsilon_per_client"][2]
    assert records[1]["epsilon_per_client"][0] > records[0]["epsilon_per_client"][0]


def _tls_handshake(port: int, ca: Path) -> str:
    """The TLS version the SuperLink's port speaks, verified against our CA for 127.0.0.1."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version()


def test_tls_and_supernode_authentication(deployment, tiny_overrides, tmp_path):
    """A throwaway CA; the SuperLink serves TLS and admits only registered SuperNodes."""
    config = load_config(None, tiny_overrides + ["federation.rounds=1"])
    sim = fedlora.run(config, tmp_path / "sim", progress=None)
    d = deployment
    tls = certs.make_tls(tmp_path / "tls")
    ca = tls / "ca.crt"
    d.superlink(tls_dir=str(tls), auth=True)
    assert _tls_handshake(d.port, ca).startswith("TLS")
    deploy.write_connection(d.home, "local", d.address, root_certificates=str(ca))
    for k in range(3):
        key, pub = certs.make_node_key(tmp_path / "keys" / f"site{k}")
        assert d.flwr("supernode", "register", str(pub), "local", timeout=120).returncode == 0
        d.supernode(f"node{k}", {"partition-id": k, "num-partitions": 3},
                    root_certificates=str(ca), auth_key=str(key))
    intruder_key, _ = certs.make_node_key(tmp_path / "keys" / "intruder")  # never registered
    d.supernode("intruder", {"partition-id": 0, "num-partitions": 3},
                root_certificates=str(ca), auth_key=str(intruder_key))
    summary = _flwr_run(d, config, tmp_path / "flower")
    _assert_same_as_simulation(tmp_path / "flower", tmp_path / "sim", rounds=1)
    assert summary["epsilon_per_client"] == pytest.approx(sim["epsilon_per_client"])
    intruder = d.procs["intruder"]
    wait_for(lambda: intruder.poll() is not None, 60, "the unregistered SuperNode to be refused")
    assert intruder.returncode != 0 and "Failed to activate SuperNode" in d.log("intruder")


def _ledger_steps(state: Path) -> int:
    (ledger,) = state.glob("run-*/ledger.json")
    rounds = json.loads(ledger.read_text())["rounds"]
    return max(sum(n for _, _, n in e["accountant"]["history"]) for e in rounds.values()
               if "accountant" in e)


def test_a_killed_server_and_site_resume_to_the_same_adapter(deployment, tiny_overrides, tmp_path):
    """2 sites, 3 rounds. Once round 1 is checkpointed, SIGKILL the ServerApp process and site
    1's SuperNode, start that SuperNode again (same state-dir), and resume with `flwr run ...
    --run-config resume=true`: the simulation's adapter and ε per site — no site's ledger
    restarted at 0, no round charged twice."""
    config = load_config(None, tiny_overrides + ["federation.clients=2", "federation.rounds=3",
                                                 "federation.min_clients=2"])
    sim = fedlora.run(config, tmp_path / "sim", progress=None)
    d = deployment
    d.superlink()
    nodes = {k: {"partition-id": k, "num-partitions": 2, "state-dir": str(tmp_path / f"site{k}")}
             for k in range(2)}
    for k, node_config in nodes.items():
        d.supernode(f"node{k}", node_config)
    deploy.write_connection(d.home, "local", d.address)
    out, partial = tmp_path / "flower", tmp_path / "flower.partial"
    app = deploy.write_app(d.root / "app", config, out, round_timeout=300, connect_timeout=120)
    run = d.start("flwr-run", [deploy.executable("flwr"), "run", str(app), "local", "--stream"])
    wait_for(lambda: (partial / "checkpoint.safetensors").exists(), RUN_TIMEOUT,
             "round 1's checkpoint", [run])
    (server_app,) = d.processes("flwr-serverapp")
    os.kill(server_app, signal.SIGKILL)  # the server dies: no cleanup, DIR.partial stays
    d.kill(run)
    d.kill(d.procs["node1"])
    d.supernode("node1-again", nodes[1])
    assert partial.is_dir() and not out.exists()
    summary = _flwr_run(d, config, out, "local", "--run-config", "resume=true")
    _assert_same_as_simulation(out, tmp_path / "sim", rounds=3)
    assert summary["epsilon_per_client"] == pytest.approx(sim["epsilon_per_client"], rel=1e-12)
    assert summary["steps"] == sim["steps"] == [6, 6]
    assert [_ledger_steps(tmp_path / f"site{k}") for k in range(2)] == [6, 6]
