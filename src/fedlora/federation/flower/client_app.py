"""The ClientApp a SuperNode runs: answer who it is, train its own client on its own data,
and (personalised methods) score its own model on its own held-out examples.

A site keeps its privacy on its own terms, whatever the server asks: DP noise and Poisson
batches from a secret key in its state folder, its own ε/δ/clip caps (terms.py), a ledger per
data set, and nothing un-noised in any reply (`messages.SITE_FIELDS`).

Every message starts from the site's state on its own disk (sitestate.py: privacy ledger,
personal tensors, steps) and a training reply leaves only once that state is written, so a
restarted SuperNode — or a resumed server — never finds a site with a fresh ε.

Every fedlora method and the DP-SGD step run unchanged: the site builds the same
`LocalTrainer` and `Client` the simulation builds, only from its own data.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedlora.errors import ConfigError  # noqa: E402
from fedlora.federation.client import refusal  # noqa: E402
from fedlora.federation.flower.messages import (RECORD, read_train, reply_record,  # noqa: E402
                                                score_record, withheld_record)
from fedlora.federation.flower.secure_site import (SECURE, read_secure_train,  # noqa: E402
                                                   secure_content, size_record)
from fedlora.federation.flower.runconfig import FlowerRun, read_run_config  # noqa: E402
from fedlora.federation.flower.site import Site, client_id  # noqa: E402
from fedlora.federation.flower.sitestate import SiteState, state_dir  # noqa: E402
from fedlora.federation.flower.terms import SiteTerms  # noqa: E402

log = logging.getLogger("fedlora.site")

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which fedlora client this node serves (read from its node config; no data is loaded),
    or — asked "center" — the site's answer to the DP feature-centring query."""
    record = msg.content.config_records[RECORD]
    if "ask" in record:
        if str(record["ask"]) == "size":  # n_k (public), before a secure round fixes its weights
            return _reply(msg, size_record(context.node_config, read_run_config(context.run_config)))
        if str(record["ask"]) != "center":
            raise ConfigError(f"the server asked {record['ask']!r}; a site answers only 'center' "
                              "or 'size'")
        reply, site = _answer(context, int(record["client"]), list(record["label-names"]),
                              int(record["checkpointed"]), None)
        return _reply(msg, reply_record(reply, site.facts)[0])
    run = read_run_config(context.run_config)
    cid = client_id(context.node_config, run.config)
    return Message(RecordDict({RECORD: ConfigRecord({"client": cid})}), reply_to=msg)


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for the messages of a secure round (they carry its configs);
    any other message goes straight to the handler."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secure_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the round the server asks for, continuing from this site's state on disk, on the
    site's own terms (its node config): a run asking for more privacy spending is refused.
    In a secure round (the instruction comes as a legacy `fitins.config`) the reply is the
    site's update for `secure_mod` to mask, with the site's public facts."""
    if SECURE in msg.content.config_records:
        instruction, q = read_secure_train(msg.content.config_records[SECURE])
    else:
        instruction, q = read_train(msg.content.config_records[RECORD]), None
    reply, site = _answer(context, instruction.client, instruction.label_names,
                          instruction.checkpointed, instruction)
    if q is None:
        return _reply(msg, reply_record(reply, site.facts)[0])
    return Message(secure_content(site, reply, instruction, q), reply_to=msg)


def _reply(msg: Message, record: dict) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(record)}), reply_to=msg)


def _answer(context: Context, cid: int, label_names: list[str], checkpointed: int,
            instruction) -> tuple:
    """A training round (`instruction`) or, with none, the centring query: on the site's terms,
    from its state on disk, its ledger written before the reply leaves."""
    run = read_run_config(context.run_config)
    terms = SiteTerms.read(context.node_config)
    store = open_state(context.node_config, run)  # unreadable ledger: refused before any work
    if store.cid != cid:
        raise ConfigError(f"sent to client {cid}, but this site is client {store.cid}")
    what = "the centring query" if instruction is None else f"round {instruction.round + 1}"
    with store.locked():
        site = Site.build(run.config, context.node_config, label_names)
        why = terms.refusal(run.config)
        if why is not None:
            log.warning("site %d refuses %s: %s", site.client.cid, what, why)
            reply = refusal(site.client, f"client {site.client.cid}: {why}")
        else:
            # the server's word prunes only what replays need; digests of released rounds stay
            store.forget_before(checkpointed)
            store.restore(site.client, 0 if instruction is None else instruction.round,
                          run.config, site.data_digest, terms.budget(run.config))
            if instruction is None:
                reply = site.trainer.answer_center_query(site.client)
            else:
                reply = site.trainer.train(site.client, instruction.download(), instruction.round)
                if reply.refused is None:  # its ledger entry is on disk already
                    store.save(instruction.round, site.client)
                    log.info("site %d, %s: local training loss %.4f (kept on the site)",
                             site.client.cid, what, reply.train_loss)
    return reply, site


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised methods: this client's own model, scored on its own held-out examples.

    The scores are computed on private data without noise: they go to the site's own log, and
    to the server only when the node config says share-evaluation=true (outside ε)."""
    run = read_run_config(context.run_config)
    instruction = read_train(msg.content.config_records[RECORD])
    terms = SiteTerms.read(context.node_config)
    store = open_state(context.node_config, run)
    with store.locked():
        site = Site.build(run.config, context.node_config, instruction.label_names)
        # its personal tensors as round `instruction.round` left them
        site.client.personal, _ = store.before(instruction.round + 1)
    scores = site.evaluate(instruction.download(), full=instruction.full)
    log.info("site %d, round %d: own model's test %s %.4f", site.client.cid,
             instruction.round + 1, site.base.task.metric, scores["test_accuracy"])
    if not terms.share_evaluation:
        record = withheld_record(site.client.cid, "its scores are computed on its private held-out "
                                 "examples without DP noise, so they stay in its own log (node "
                                 "config share-evaluation=true sends them, outside ε)")
    else:
        record = score_record(site.client.cid, scores, site.test_size)
    return Message(RecordDict({RECORD: ConfigRecord(record)}), reply_to=msg)


def open_state(node_config, run: FlowerRun) -> SiteState:
    """This site's state for this run, from its node config's `state-dir`."""
    cid = client_id(node_config, run.config)
    return SiteState.open(state_dir(node_config, cid), run.config, run.out, cid)
