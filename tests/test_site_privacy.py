"""The privacy promise against the server itself (docs/privacy.md), played as the server.

The adversary knows the code, the config (seed included), the checkpoint and every message.
Each test acts out one thing such a server could try, through the ClientApp's own message
handling (and, for the noise, through the simulation's trainer too), and checks that it fails
by default — and, where the attack works against the research mode, that it succeeds there, so
the test can fail. The reference for "the noise a site actually drew" is the same computation
re-run by the key's owner without noise: with one SGD step from the download, the upload is
W − lr·(Σ clip(g_i) + noise)/(q·n), so (noise-free − noisy)·q·n/lr is the noise, exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from test_flower import MemoryGrid, _flower_in_memory, _run_config, task_identity  # noqa: E402,F401
from test_flower_resume import SiteProcess, opacus_epsilon  # noqa: E402

from fedlora.config import load_config  # noqa: E402
from fedlora.experiment import build_experiment  # noqa: E402
from fedlora.federation.flower import client_app, messages  # noqa: E402
from fedlora.federation.flower.site import Site  # noqa: E402
from fedlora.federation.flower.terms import SiteTerms  # noqa: E402
from fedlora.federation.wire import encode_state  # noqa: E402
from fedlora.privacy.dpsgd import gaussian_noise  # noqa: E402
from fedlora.privacy.randomness import (SecretKeyError, SeededRandomness,  # noqa: E402
                                        load_or_create_key)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "privacy.md"
ONE_STEP = ["federation.clients=2", "federation.rounds=3", "federation.local_steps=1",
            "train.optimizer=sgd", "train.momentum=0", "train.lr=0.5"]


@pytest.fixture
def one_step(tiny_overrides):
    return lambda *more: load_config(None, tiny_overrides + ONE_STEP + list(more))


# ------------------------------------------------------------------------------ helpers
def drawn_noise(trainer, client, download, upload, round: int) -> dict[str, torch.Tensor]:
    """The noise the client's upload carries, recovered by the key's owner: the same round
    re-run with σ = 0 on the same randomness (same batches, same dropout), no ledger."""
    sigma = client.privacy.noise_multiplier
    client.privacy.noise_multiplier = 0.0
    try:
        local, _ = trainer._local_round(client, download, round)
    finally:
        client.privacy.noise_multiplier = sigma
    clean = trainer.method.upload(local, round)
    scale = client.privacy.sample_rate * client.num_examples / trainer.train_cfg.lr
    return {trainer.names[k]: (clean[k] - upload[k]) * scale for k in upload}


def seed_guess(config, cid: int, shapes: dict, std: float, round: int) -> dict[str, torch.Tensor]:
    """What a server that knows the seed regenerates: the seeded stream of (seed, client, round)."""
    return gaussian_noise(shapes, std, SeededRandomness(config.seed, cid).stream("noise", round))


def sample_guess(config, cid: int, n: int, q: float, round: int) -> list[int]:
    u = SeededRandomness(config.seed, cid).stream("sample", round).uniform(n)
    return (u < q).nonzero().flatten().tolist()


def assert_reconstruction(actual, guess, std, *, succeeds: bool) -> None:
    a = torch.cat([actual[k].flatten() for k in sorted(actual)]).double()
    g = torch.cat([guess[k].flatten() for k in sorted(actual)]).double()
    assert abs(float(a.std()) / std - 1) < 0.15  # the noise reached the update, at σ·C
    assert abs(float(a.mean())) < 5 * std / math.sqrt(len(a))
    if succeeds:
        assert torch.allclose(a, g, rtol=1e-3, atol=1e-3 * std)
    else:
        assert float((a - g).abs().max()) > std  # far off, not a rounding difference
        assert abs(float(torch.corrcoef(torch.stack([a, g]))[0, 1])) < 5 / math.sqrt(len(a))


def _msg(kind: str, record: dict) -> Message:
    msg = Message(RecordDict({messages.RECORD: ConfigRecord(record)}), dst_node_id=1,
                  message_type=kind)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def call(site: SiteProcess, kind: str, record: dict) -> dict:
    context = Context(run_id=1, node_id=1, node_config=site.node_config, state=RecordDict(),
                      run_config=site.run_config)
    handler = {"train": client_app.train, "evaluate": client_app.evaluate,
               "query": client_app.query}[kind]
    reply = handler(_msg(kind, record), context)
    return dict(reply.content.config_records[messages.RECORD])


def train_raw(site: SiteProcess, round: int, download=None, checkpointed: int = 0) -> dict:
    record = messages.train_record(round, site.cid, encode_state(download or site.download),
                                   site.labels, checkpointed)
    return call(site, MessageType.TRAIN, record)


def run_folder(state: Path) -> Path:
    (folder,) = state.glob("run-*")
    return folder


# ------------------------------------------------------------------------------ the noise
@pytest.mark.parametrize("noise", ["secret", "seeded"])
def test_a_curious_server_cannot_regenerate_a_sites_noise_or_batches(one_step, tmp_path, noise):
    """Flower: the server holds the run config (seed included) and every message of the site,
    regenerates the noise and the Poisson batch from the seed and compares them with what the
    site actually drew. Secret (the default): nothing matches. Seeded: everything does."""
    config = one_step(f"privacy.noise={noise}")
    site = SiteProcess(config, tmp_path, tmp_path / "site")
    site.node_config["allow-seeded-noise"] = True
    reply, upload = site.train(0)
    assert reply["refused"] is None
    # the key's owner (the test, reading the site's state folder) recovers the drawn noise
    own = Site.build(config, site.node_config, site.labels)
    if noise == "secret":
        own.client.randomness = load_or_create_key(run_folder(tmp_path / "site") / "secret.key",
                                                   released=True)
    actual = drawn_noise(own.trainer, own.client, site.download, upload, 0)
    std = reply["sigma"] * config.privacy.clip
    shapes = {k: tuple(v.shape) for k, v in actual.items()}
    assert_reconstruction(actual, seed_guess(config, 0, shapes, std, 0), std,
                          succeeds=noise == "seeded")
    n = own.client.num_examples
    batch = own.trainer.poisson_batches(own.client, 0)[0]
    assert (batch == sample_guess(config, 0, n, reply["q"], 0)) == (noise == "seeded")


@pytest.mark.parametrize("noise", ["secret", "seeded"])
def test_the_simulations_noise_is_secret_too(one_step, noise):
    config = one_step(f"privacy.noise={noise}")
    exp = build_experiment(config)
    client = exp.clients[0]
    download = exp.method.download(exp.method.init_global(exp.initial), 0)
    upload = exp.trainer.train(client, download, 0).upload
    actual = drawn_noise(exp.trainer, client, download, upload, 0)
    std = client.privacy.noise_multiplier * config.privacy.clip
    shapes = {k: tuple(v.shape) for k, v in actual.items()}
    assert_reconstruction(actual, seed_guess(config, 0, shapes, std, 0), std,
                          succeeds=noise == "seeded")


def test_sites_with_the_same_data_but_other_keys_send_other_updates(one_step, tmp_path):
    config = one_step()
    a = SiteProcess(config, tmp_path, tmp_path / "a")
    b = SiteProcess(config, tmp_path, tmp_path / "b")
    (ra, ua), (rb, ub) = a.train(0), b.train(0)
    assert ra["epsilon"] == rb["epsilon"] and ua.keys() == ub.keys()
    assert all(not torch.equal(ua[k], ub[k]) for k in ua)


def test_a_replay_resends_the_stored_release_without_training(one_step, tmp_path, monkeypatch):
    """The same round from the same model is the stored bytes again — computed by nobody, so
    identical whatever device or thread count the site now has."""
    site = SiteProcess(one_step(), tmp_path, tmp_path / "site")
    first = train_raw(site, 0)
    from fedlora.federation.client import LocalTrainer

    def no_training(*args, **kwargs):
        raise AssertionError("a replay must not train")

    monkeypatch.setattr(LocalTrainer, "_local_round", no_training)
    torch.set_num_threads(1)
    again = train_raw(site, 0)
    assert bytes(again["upload"]) == bytes(first["upload"]) and again == first


def test_a_missing_key_beside_a_ledger_is_refused(one_step, tmp_path):
    site = SiteProcess(one_step(), tmp_path, tmp_path / "site")
    site.train(0)
    (run_folder(tmp_path / "site") / "secret.key").unlink()
    with pytest.raises(SecretKeyError, match="missing but the ledger"):
        site.train(1)
    assert not (run_folder(tmp_path / "site") / "secret.key").exists()


# ------------------------------------------------------------------------------ replays
@pytest.mark.parametrize("checkpointed", [0, 1, 2, 3])
def test_forget_then_retrain_is_refused(one_step, tmp_path, checkpointed):
    """The server trains round 1, claims a checkpoint (so the site may forget), then asks for
    round 1 again on another model — and on the same one. Two updates on one noise stream would
    give away their noise-free difference: the site must refuse both, charging nothing."""
    site = SiteProcess(one_step(), tmp_path, tmp_path / "site")
    first = train_raw(site, 0)
    spent = train_raw(site, 1)["epsilon"]
    other = {k: v + 1e-2 for k, v in site.download.items()}
    for download in (other, site.download):
        again = train_raw(site, 0, download=download, checkpointed=checkpointed)
        if download is site.download and checkpointed <= 0:
            assert again == first  # a true replay: the very bytes released before
            continue
        assert again["refused"] and bytes(again["upload"]) == b""
        assert again["epsilon"] == spent  # nothing trained, nothing charged
    ledger = json.loads((run_folder(tmp_path / "site") / "ledger.json").read_text())
    assert max(e["steps"] for e in ledger["rounds"].values()) == 2
    assert set(ledger["rounds"]) == {"0", "1"}  # the digests outlive the server's word


# ------------------------------------------------------------------------------ the site's terms
def test_a_site_refuses_seeded_noise_unless_its_node_config_allows_it(one_step, tmp_path):
    site = SiteProcess(one_step("privacy.noise=seeded"), tmp_path, tmp_path / "site")
    site.node_config.pop("allow-seeded-noise")  # a site that has not consented
    reply, upload = site.train(0)
    assert "allow-seeded-noise=true" in reply["refused"] and upload == {}
    site.node_config["allow-seeded-noise"] = True
    assert site.train(0)[0]["refused"] is None


@pytest.mark.parametrize("asked, term, word", [
    ("privacy.epsilon=3", {"epsilon": 1.0}, "privacy.epsilon ≤ 1"),
    ("privacy.epsilon=inf", {"epsilon": 1.0}, "privacy.epsilon ≤ 1"),
    ("privacy.delta=1e-4", {"delta": 1e-5}, "privacy.delta ≤ 1e-05"),
    ("privacy.clip=2", {"clip": 1.0}, "privacy.clip=1"),
])
def test_a_site_refuses_a_run_asking_more_than_its_terms(one_step, tmp_path, asked, term, word):
    site = SiteProcess(one_step(asked), tmp_path, tmp_path / "site")
    site.node_config.update(term)
    reply, upload = site.train(0)
    assert word in reply["refused"] and upload == {} and reply["steps"] == 0
    assert not list((tmp_path / "site").glob("run-*/ledger.json"))  # nothing charged


def test_bad_site_terms_name_the_key():
    from fedlora.errors import ConfigError

    for bad, key in (({"epsilon": -1.0}, "epsilon"), ({"delta": 2.0}, "delta"),
                     ({"allow-seeded-noise": "yes"}, "allow-seeded-noise")):
        with pytest.raises(ConfigError, match=key):
            SiteTerms.read(bad)


def test_a_new_run_on_the_same_data_continues_the_sites_ledger(one_step, tmp_path):
    """Run A spends the site's whole budget. Run B (another run folder and another config) on
    the same data starts where A stopped: refused at the run's own ε; with a larger ε in the
    node config it trains, and reports ε of every step the site took on that data."""
    config = one_step()
    a = SiteProcess(config, tmp_path, tmp_path / "site")
    replies = [a.train(r)[0] for r in range(3)]
    assert replies[-1]["refused"] is None and replies[-1]["epsilon"] <= config.privacy.epsilon
    b = SiteProcess(one_step("train.lr=0.25"), tmp_path, tmp_path / "site")
    b.run_config = {**b.run_config, "out": str(tmp_path / "another-run")}
    refused, _ = b.train(0)
    assert "spent its privacy budget" in refused["refused"]
    assert refused["epsilon"] == replies[-1]["epsilon"]  # what the site has spent, not 0
    b.node_config["epsilon"] = 6.0
    reply, _ = b.train(0)
    sigma, q = reply["sigma"], reply["q"]
    assert reply["refused"] is None
    assert reply["epsilon"] == pytest.approx(opacus_epsilon(sigma, q, 4, config.privacy.delta),
                                             rel=1e-9)
    assert len(list((tmp_path / "site").glob("run-*"))) == 2  # two runs, one ledger of spending


# ------------------------------------------------------------------------------ what leaves a site
def crafted_head(site: SiteProcess) -> dict:
    """A head with weights 0 and bias (0, 2): its loss on the held-out set reveals the labels'
    exact counts (loss = mean over examples of log(1 + e^±2))."""
    out = {k: v.clone() for k, v in site.download.items()}
    for k, v in out.items():
        if "classifier" in k and k.endswith("weight"):
            out[k] = torch.zeros_like(v)
        elif "classifier" in k and k.endswith("bias"):
            out[k] = torch.tensor([0.0, 2.0])
    return out


def test_personalised_scores_stay_on_the_site_by_default(one_step, tmp_path):
    config = one_step("method.name=fedsa")
    site = SiteProcess(config, tmp_path, tmp_path / "site")
    site.train(0)
    record = messages.train_record(0, 0, encode_state(crafted_head(site)), site.labels, 0)
    reply = call(site, MessageType.EVALUATE, record)
    assert set(reply) == {"client", "withheld"} and "share-evaluation=true" in reply["withheld"]
    site.node_config["share-evaluation"] = True  # the site's own, documented choice
    shared = call(site, MessageType.EVALUATE, record)
    assert {"accuracy", "loss"} <= set(shared)


def test_every_field_a_site_sends_is_documented(one_step, tmp_path):
    """Each message type a site answers, in every variant (trained, refused, centring answer,
    scores withheld or shared): no field outside `SITE_FIELDS`, and docs/privacy.md names them
    all — a new field (a training loss, say) fails here until it is justified there."""
    config = one_step("method.name=fedsa")
    site = SiteProcess(config, tmp_path, tmp_path / "site")
    seen = {"query": set(call(site, MessageType.QUERY, {}))}
    trained = train_raw(site, 0)
    refused = train_raw(site, 0, download={k: v + 1 for k, v in site.download.items()})
    assert refused["refused"]
    center = call(site, MessageType.QUERY, messages.center_record(0, site.labels))
    assert center["refused"]  # the tiny model reads CLS features: no centring planned
    seen["train"] = set(trained) | set(refused) | set(center)  # a centring answer: train fields
    evaluation = messages.train_record(0, 0, encode_state(site.download), site.labels, 0)
    seen["evaluate"] = set(call(site, MessageType.EVALUATE, evaluation))
    site.node_config["share-evaluation"] = True
    seen["evaluate"] |= set(call(site, MessageType.EVALUATE, evaluation))
    for kind, fields in seen.items():
        assert fields <= set(messages.SITE_FIELDS[kind]), (kind, fields - set(messages.SITE_FIELDS[kind]))
    assert seen["train"] == set(messages.SITE_FIELDS["train"])
    assert "train-loss" not in seen["train"]
    text = DOCS.read_text(encoding="utf-8")
    for kind, fields in messages.SITE_FIELDS.items():
        for field in fields:
            assert f"`{field}`" in text, f"docs/privacy.md does not document {kind} field {field!r}"


def test_a_sites_error_does_not_name_its_labels(one_step, tmp_path):
    from fedlora.errors import DataError

    site = SiteProcess(one_step(), tmp_path, tmp_path / "site")
    site.labels = []  # a server probing for the site's label set
    with pytest.raises(DataError) as err:
        site.train(0)
    assert "pos" not in str(err.value) and "neg" not in str(err.value)


def test_a_secret_run_resumes_with_its_own_keys(one_step, tmp_path, monkeypatch):
    """Interrupted in round 2, resumed: the clients' keys in the run folder are the ones they
    started with (no fresh randomness for a continuing ledger), and the spending is that of an
    uninterrupted run (which does not depend on the noise)."""
    import fedlora
    from fedlora.federation.client import LocalTrainer

    config, out, train = one_step(), tmp_path / "run", LocalTrainer.train

    def crashing(self, client, download, round):
        if round == 1:
            raise KeyboardInterrupt
        return train(self, client, download, round)

    monkeypatch.setattr(LocalTrainer, "train", crashing)
    with pytest.raises(KeyboardInterrupt):
        fedlora.run(config, out, progress=None)
    monkeypatch.setattr(LocalTrainer, "train", train)
    keys = {p.name: p.read_bytes() for p in (tmp_path / "run.partial" / "ledger").glob("*.key")}
    assert len(keys) == 2
    summary = fedlora.run(resume=out, progress=None)
    assert {p.name: p.read_bytes() for p in (out / "ledger").glob("*.key")} == keys
    plain = fedlora.run(config, tmp_path / "plain", progress=None)
    assert summary["epsilon_per_client"] == plain["epsilon_per_client"]
    assert summary["steps"] == plain["steps"] and summary["noise"] == "secret"


def test_the_supernode_command_carries_the_sites_terms(tmp_path):
    """`fedlora flower supernode --epsilon 2 --allow-seeded-noise ...` → node config keys that
    Flower parses back to the same values (booleans as TOML's true)."""
    import argparse
    import tomllib

    from fedlora.federation.flower import cli as flower_cli
    from fedlora.federation.flower.deploy import node_config_text

    args = argparse.Namespace(partition="0/2", data_path=None, client_id=None, text_column=None,
                              label_column=None, state_dir=str(tmp_path / "s"), epsilon=2.0,
                              delta=1e-6, clip=None, allow_seeded_noise=True, share_evaluation=False)
    values = flower_cli._node_config(args)
    assert (values["epsilon"], values["delta"], values["allow-seeded-noise"]) == (2.0, 1e-6, True)
    assert "clip" not in values and "share-evaluation" not in values
    parsed = tomllib.loads("\n".join(node_config_text({k: v}) for k, v in values.items()))
    assert parsed == values and SiteTerms.read(parsed).allow_seeded_noise is True


def test_a_run_without_dp_marks_the_sites_data_as_exposed(one_step, tmp_path):
    """A non-private run takes no accounted step, yet releases the data unprotected: a later DP
    run on the same data must not start from ε = 0 — the site's book says ε = ∞ and it refuses."""
    plain = SiteProcess(one_step("privacy.epsilon=inf"), tmp_path, tmp_path / "site")
    assert plain.train(0)[0]["refused"] is None
    private = SiteProcess(one_step(), tmp_path, tmp_path / "site")
    private.run_config = {**private.run_config, "out": str(tmp_path / "private-run")}
    reply, upload = private.train(0)
    assert "spent its privacy budget" in reply["refused"] and upload == {}
    assert reply["epsilon"] == math.inf


def test_an_unreadable_site_book_is_refused(one_step, tmp_path):
    from fedlora.privacy.ledger import LedgerError

    site = SiteProcess(one_step(), tmp_path, tmp_path / "site")
    site.train(0)
    (book,) = (tmp_path / "site").glob("spent-*.json")
    book.write_text('{"runs": {"x": [[1.0, "q"]]}}')
    with pytest.raises(LedgerError, match="unreadable.*restore the file"):
        site.train(1)
    assert book.read_text() == '{"runs": {"x": [[1.0, "q"]]}}'  # nothing rewritten
