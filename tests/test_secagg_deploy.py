"""Secure aggregation on a real deployment: a SuperLink and 3 SuperNodes on 127.0.0.1.

The reference is the in-process simulation of the same run without secure aggregation (seeded
DP noise; a plain deployment equals it bit for bit, test_flower_deploy.py). Run with `-s` to
print the figures docs/secure-aggregation.md quotes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flower_harness import wait_for  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_flower_deploy import RUN_TIMEOUT, _flwr_run, _records, deployment  # noqa: E402,F401

import fedlora  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.federation.flower import deploy  # noqa: E402

pytestmark = pytest.mark.flower

SECURE = ["federation.secure_aggregation=true", "federation.max_update_norm=5.0"]


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    return tiny_overrides + ["privacy.noise=seeded"]


def _adapter_gap(a: Path, b: Path) -> float:
    ours = load_file(a / "adapter" / "adapter_model.safetensors")
    theirs = load_file(b / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    return max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours)


def _three_sites(d) -> None:
    d.superlink()
    for k in range(3):
        d.supernode(f"node{k}", {"partition-id": k, "num-partitions": 3})
    deploy.write_connection(d.home, "local", d.address)


def test_two_secure_rounds_match_the_plain_simulation(deployment, tiny_overrides, tmp_path):
    """FFA-LoRA with DP, 2 rounds, SecAgg+ on 3 SuperNodes: each round's sum holds all three
    sites, the final adapter is within 1e-6 of the plain run's (round 1's quantisation bound is
    ~3e-9; round 2 trains from a download that far away), ε and steps per site are the same."""
    plain = load_config(None, tiny_overrides + ["federation.max_update_norm=5.0"])
    sim = fedlora.run(plain, tmp_path / "sim", progress=None)
    _three_sites(deployment)
    summary = _flwr_run(deployment, load_config(None, tiny_overrides + SECURE), tmp_path / "flower")
    records = _records(tmp_path / "flower")
    gap = _adapter_gap(tmp_path / "flower", tmp_path / "sim")
    assert [r["secure_aggregation"]["sites"] for r in records] == [[0, 1, 2]] * 2
    assert all(r["failed"] == {} for r in records)
    assert gap < 1e-6
    assert summary["epsilon_per_client"] == pytest.approx(sim["epsilon_per_client"])
    assert summary["steps"] == sim["steps"] == [4, 4, 4]
    assert summary["test_accuracy"] == pytest.approx(sim["test_accuracy"], abs=0.02)
    sim_records = _records(tmp_path / "sim")
    print(f"\nsecure vs plain: max|Δ adapter| after 2 rounds {gap:.3g}; round bounds "
          f"{[r['secure_aggregation']['bound'] for r in records]}; test accuracy "
          f"{summary['test_accuracy']:.4f} vs {sim['test_accuracy']:.4f}")
    for r, s in zip(records, sim_records):
        print(f"round {r['round']}: secure {r['seconds']:.2f} s, {r['bytes_uploaded']} B up, "
              f"{r['bytes_downloaded']} B down; plain payload {s['bytes_uploaded']} B up, "
              f"{s['bytes_downloaded']} B down")


def test_a_site_killed_after_key_sharing_leaves_the_round_to_the_others(deployment, tiny_overrides,
                                                                        tmp_path):
    """SIGKILL SuperNode 2 as soon as round 2's keys are shared: the two others (≥ the
    threshold 2) complete the round; the dropout is logged and client 2 is not in the sum."""
    config = load_config(None, tiny_overrides + SECURE + ["federation.min_clients=2"])
    d = deployment
    _three_sites(d)
    out = tmp_path / "flower"
    app = deploy.write_app(d.root / "app", config, out, round_timeout=300, connect_timeout=120)
    run = d.start("flwr-run", [deploy.executable("flwr"), "run", str(app), "local", "--stream"])
    wait_for(lambda: "round 2: secure aggregation, key sharing done" in d.log("flwr-run"),
             RUN_TIMEOUT, "round 2's key sharing", [run])
    d.kill(d.procs["node2"])
    wait_for(lambda: (out / "summary.json").exists(), RUN_TIMEOUT, "the run's end", [run])
    records = _records(out)
    assert [r["secure_aggregation"]["sites"] for r in records] == [[0, 1, 2], [0, 1]]
    assert records[0]["failed"] == {} and set(records[1]["failed"]) == {"2"}
    # `flwr run --stream` relays the ServerApp's log with a lag: the summary can be on disk first
    wait_for(lambda: "client 2 dropped out" in d.log("flwr-run"), 60, "the dropout in the log", [])
    print(f"\nround 2 without site 2: {records[1]['seconds']:.1f} s")
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
