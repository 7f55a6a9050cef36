"""Resume: a run killed at any point and resumed ends exactly like an uninterrupted run.

The killed runs are real processes ended with SIGKILL (no cleanup, no `finally`); a small
driver installs the kill at a chosen point: after a client trained (its ledger written, the
round not checkpointed), half-way through writing a checkpoint, just after a checkpoint,
and while exporting the results. The reference is the same config run without interruption.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fedlora
from fedlora.cli import main


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return tiny_overrides + ["privacy.noise=seeded"]


SRC = Path(__file__).resolve().parents[1] / "src"

DRIVER = textwrap.dedent('''
    import os, signal, sys
    from fedlora.cli import main

    point, argv = sys.argv[1], sys.argv[2:]
    kind, _, arg = point.partition(":")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "trained":  # after client c trained round r (-1: answered the centring query):
        r, c = map(int, arg.split(","))  # ledger written, round not finished
        from fedlora.federation.client import LocalTrainer
        train, answer = LocalTrainer.train, LocalTrainer.answer_center_query
        def killing_train(self, client, download, round):
            reply = train(self, client, download, round)
            if (round, client.cid) == (r, c):
                die()
            return reply
        def killing_answer(self, client):
            reply = answer(self, client)
            if (-1, client.cid) == (r, c):
                die()
            return reply
        LocalTrainer.train = killing_train
        LocalTrainer.answer_center_query = killing_answer
    elif kind in ("torn", "checkpointed"):  # during / right after the n-th checkpoint write
        n, calls = int(arg), []
        from fedlora.federation import checkpoint
        write = checkpoint.atomic_write_bytes
        def killing_write(path, data):
            calls.append(path)
            if len(calls) == n and kind == "torn":
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                tmp.write_bytes(data[: len(data) // 2])
                die()
            write(path, data)
            if len(calls) == n:
                die()
        checkpoint.atomic_write_bytes = killing_write
    elif kind == "export":  # every round done, results not yet written
        import fedlora.runner
        def killing_export(*args, **kwargs):
            die()
        fedlora.runner.export_adapter = killing_export
    sys.exit(main(argv))
''')


@pytest.fixture(scope="module")
def overrides(tiny_st_model_dir, toy_csv):
    """Mean-pooled, unit-norm features as in the default job: the run starts with the DP
    feature-centring query, so kills before, during and after it are covered too."""
    return [f"model.path={tiny_st_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "data.group_column=film",
            "federation.rounds=3", "federation.local_steps=2", "train.batch_size=16",
            "train.eval_batch_size=64", "threads=1",
            "privacy.noise=seeded"]  # compared bit for bit with an uninterrupted run


@pytest.fixture(scope="module")
def reference(tmp_path_factory, overrides):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", "--out", str(out), *overrides]) == 0
    return out


def _killed(tmp_path: Path, point: str, argv: list[str]) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(driver), point, *argv], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def outcome(folder: Path) -> dict:
    """Everything a run leaves, wall-clock fields aside."""
    summary = json.loads((folder / "summary.json").read_text())
    for k in ("wall_seconds", "out"):
        summary.pop(k, None)
    if summary.get("feature_center"):
        summary["feature_center"].pop("seconds")
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("seconds")
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and p.suffix in (".safetensors", ".json") and p.name != "summary.json"
             and p.parent.name != "ledger"}
    # a ledger's older entries are pruned at checkpoints; what it has spent is the latest entry
    spent = {p.name: _latest(p) for p in sorted((folder / "ledger").glob("*.json"))}
    return {"summary": summary, "metrics": metrics, "files": files, "ledgers": spent}


def _latest(ledger: Path) -> dict:
    rounds = json.loads(ledger.read_text())["rounds"]
    last = max(int(r) for r in rounds if r != "center")  # "center": the centring query's entry
    return {"round": last, **rounds[str(last)], "entries": sorted(rounds)}


def _spent(partial: Path) -> dict[str, int]:
    """Steps each client's ledger says it has been charged for."""
    out = {}
    for f in (partial / "ledger").glob("client-*.json"):
        rounds = json.loads(f.read_text())["rounds"]
        out[f.stem] = max(sum(n for _, _, n in e["accountant"]["history"])
                          for e in rounds.values() if "accountant" in e)
    return out


@pytest.mark.parametrize("points", [
    ["trained:-1,1"],                     # clients 0, 1 answered the centring query, 2 not yet
    ["trained:0,1"],                      # before any checkpoint; ledgers of clients 0, 1 ahead
    ["torn:2"],                           # the second checkpoint half-written: the first is used
    ["checkpointed:1", "trained:2,0"],    # killed, resumed, killed again, resumed
    ["export"],                           # all rounds checkpointed, no results yet
])
def test_sigkill_then_resume_equals_uninterrupted_run(points, tmp_path, overrides, reference):
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    _killed(tmp_path, points[0], ["run", "--out", str(out), *overrides])
    for point in points[1:]:
        _killed(tmp_path, point, ["run", "--resume", str(out)])
    assert not out.exists() and partial.is_dir()
    spent_at_kill = _spent(partial)
    assert spent_at_kill, "clients had trained: their ledgers must be on disk"
    assert main(["run", "--resume", str(out)]) == 0
    assert not partial.exists() and not (out / "checkpoint.safetensors").exists()
    got, want = outcome(out), outcome(reference)
    assert got["metrics"] == want["metrics"]
    assert got["summary"] == want["summary"]
    assert got["files"].keys() == want["files"].keys()
    for name in want["files"]:
        assert got["files"][name] == want["files"][name], name
    assert got["ledgers"] == want["ledgers"] and len(want["ledgers"]) == 3
    # ε never went down: what the ledgers had charged at the kill is still charged
    assert all(_spent(out)[c] >= n for c, n in spent_at_kill.items())


@pytest.mark.parametrize("method", ["fedsa", "fedex", "ffa+adam"])
def test_resume_restores_personal_tensors_and_base_changes(method, tmp_path, overrides,
                                                          monkeypatch):
    """A crash in round 2 (personal B of FedSA-LoRA / FedEx-LoRA's base residual / the server
    optimizer's moment buffers in play)."""
    from fedlora.federation.client import LocalTrainer

    method, _, server = method.partition("+")
    args = [*overrides, f"method.name={method}"] + (
        [f"federation.server_optimizer={server}", "federation.server_lr=0.05"] if server else [])
    fedlora.run(None, tmp_path / "ref", overrides=args, progress=None)
    train = LocalTrainer.train

    def crashing(self, client, download, round):
        reply = train(self, client, download, round)
        if (round, client.cid) == (1, 1):
            raise KeyboardInterrupt
        return reply

    monkeypatch.setattr(LocalTrainer, "train", crashing)
    with pytest.raises(KeyboardInterrupt):
        fedlora.run(None, tmp_path / "run", overrides=args, progress=None)
    monkeypatch.setattr(LocalTrainer, "train", train)
    fedlora.run(resume=tmp_path / "run", progress=None)
    got, want = outcome(tmp_path / "run"), outcome(tmp_path / "ref")
    assert got == want
    expect = {"fedsa": "clients/0/adapter/adapter_model.safetensors",
              "fedex": "base_delta.safetensors"}.get(method, "adapter/adapter_model.safetensors")
    assert expect in got["files"]


def test_replayed_round_with_another_download_is_refused(tiny_overrides, tmp_path):
    """Retraining a recorded round on a different model would reuse its noise: refused."""
    from fedlora.config import load_config
    from fedlora.experiment import build_experiment
    from fedlora.privacy.ledger import PrivacyLedger

    exp = build_experiment(load_config(None, tiny_overrides))
    client = exp.clients[0]
    client.ledger = PrivacyLedger(tmp_path / "ledger.json")
    glob = exp.method.init_global(exp.initial)
    down = exp.method.download(glob, 0)
    first = exp.trainer.train(client, down, 0)
    spent = client.privacy.spent()
    assert first.refused is None and client.ledger.entry(0) is not None
    replay = exp.trainer.train(client, down, 0)  # the same download: same upload, no new charge
    assert replay.refused is None and client.privacy.spent() == spent
    assert all((replay.upload[k] == first.upload[k]).all() for k in first.upload)
    other = {k: v + 1e-3 for k, v in down.items()}
    refused = exp.trainer.train(client, other, 0)
    assert refused.refused and "different model" in refused.refused
    assert client.privacy.spent() == spent
    # the ledger on disk agrees with the client: a restarted client reads the same ε
    assert PrivacyLedger(tmp_path / "ledger.json").latest == client.privacy.accountant.state_dict()


def _record(ledger, r: int, steps: int) -> None:
    upload = {"b": torch.full((2,), float(r))}
    ledger.record(r, f"d{r}", {"kind": "rdp", "history": [[1.0, 0.1, steps]]}, upload, {}, steps)


def test_ledger_forgets_checkpointed_releases_but_never_what_was_spent(tmp_path):
    """After a checkpoint the released tensors and old accountant states go; the digests of
    released rounds and the latest accountant (the spent ε) never do."""
    from fedlora.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "l.json")
    for r in range(5):
        _record(ledger, r, 2 * (r + 1))
    assert torch.equal(ledger.release(2)[0]["b"], torch.full((2,), 2.0))
    ledger.forget_before(3)
    assert sorted(ledger.rounds) == [0, 1, 2, 3, 4]  # every released round is still recognised
    assert [ledger.release(r) is None for r in range(5)] == [True, True, True, False, False]
    assert {r for r, e in ledger.rounds.items() if "accountant" in e} == {3, 4}
    ledger.forget_before(10)  # past every entry: the latest stays, it is the spent ε
    assert ledger.latest["history"] == [[1.0, 0.1, 10]]
    assert not list(tmp_path.glob("l-release-*"))
    _record(ledger, 5, 12)
    again = PrivacyLedger(tmp_path / "l.json")
    assert sorted(again.rounds) == list(range(6)) and again.entry(0)["digest"] == "d0"
    assert again.release(5) is not None


def test_a_damaged_release_is_refused(tmp_path):
    from fedlora.privacy.ledger import LedgerError, PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "l.json")
    _record(ledger, 0, 2)
    path = ledger.release_path(0)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # one flipped bit in the tensors
    path.write_bytes(bytes(raw))
    with pytest.raises(LedgerError, match="checksum|unreadable"):
        PrivacyLedger(tmp_path / "l.json").release(0)


def test_resume_may_change_threads_only(tmp_path, overrides, interrupt_in_round):
    """`--resume DIR threads=2` applies on top of the saved config; anything else is refused.
    The summary's wall time counts the interrupted attempt's seconds up to its checkpoint."""
    interrupt_in_round(tmp_path / "run", overrides)
    from fedlora.federation.checkpoint import FILENAME, load_checkpoint
    before = load_checkpoint(tmp_path / "run.partial" / FILENAME).meta["seconds"]
    lines = []
    summary = fedlora.run(resume=tmp_path / "run", overrides=["threads=2"], progress=lines.append)
    assert summary["rounds"] == 3 and any("resuming after round 1 of 3" in x for x in lines)
    assert summary["wall_seconds"] > before > 0  # the first attempt's time is counted
    import torch
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


def test_ledger_latest_is_what_was_spent_last_not_the_highest_round(tmp_path):
    """A client that missed round 2 before a crash may train it, for the first time, after the
    server resumes from round 1: that entry holds every step charged, round 3's included."""
    from fedlora.privacy.ledger import LedgerError, PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "l.json")
    _record(ledger, 0, 2)
    _record(ledger, 2, 4)
    _record(ledger, 1, 6)  # after the resume
    assert PrivacyLedger(tmp_path / "l.json").latest["history"] == [[1.0, 0.1, 6]]
    ledger.forget_before(5)
    assert {r for r, e in ledger.rounds.items() if "accountant" in e} == {1}
    (tmp_path / "bad.json").write_text('{"rounds": {"0": {"digest": "d", "accountant": '
                                       '{"kind": "rdp", "history": [[1.0, 0.1, "many"]]}}}}')
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger(tmp_path / "bad.json")
