"""The ClientApp a SuperNode runs: answer who it is, train its own client on its own data,
and (personalised methods) score its own model on its own held-out examples.

Every message starts from the site's state on its own disk (sitestate.py: privacy ledger,
personal tensors, steps) and a training reply leaves only once that state is written, so a
restarted SuperNode — or a resumed server — never finds a site with a fresh ε.

Every fedlora method and the DP-SGD step run unchanged: the site builds the same
`LocalTrainer` and `Client` the simulation builds, only from its own data.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedlora.errors import ConfigError  # noqa: E402
from fedlora.federation.flower.messages import (RECORD, read_train, reply_record,  # noqa: E402
                                                score_record)
from fedlora.federation.flower.runconfig import FlowerRun, read_run_config  # noqa: E402
from fedlora.federation.flower.site import Site, client_id  # noqa: E402
from fedlora.federation.flower.sitestate import SiteState, state_dir  # noqa: E402

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which fedlora client this node serves (read from its node config; no data is loaded)."""
    run = read_run_config(context.run_config)
    cid = client_id(context.node_config, run.config)
    return Message(RecordDict({RECORD: ConfigRecord({"client": cid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the round the server asks for, continuing from this site's state on disk."""
    run = read_run_config(context.run_config)
    instruction = read_train(msg.content.config_records[RECORD])
    store = open_state(context.node_config, run)  # unreadable ledger: refused before any work
    if store.cid != instruction.client:
        raise ConfigError(f"sent to client {instruction.client}, but this site is client {store.cid}")
    with store.locked():
        site = Site.build(run.config, context.node_config, instruction.label_names)
        store.forget_before(instruction.checkpointed)
        store.restore(site.client, instruction.round)
        reply = site.trainer.train(site.client, instruction.download(), instruction.round)
        if reply.refused is None:  # the ledger entry is on disk already (written in `train`)
            store.save(instruction.round, site.client)
    content, _ = reply_record(reply, site.facts)
    return Message(RecordDict({RECORD: ConfigRecord(content)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised methods: this client's own model, scored on its own held-out examples."""
    run = read_run_config(context.run_config)
    instruction = read_train(msg.content.config_records[RECORD])
    store = open_state(context.node_config, run)
    with store.locked():
        site = Site.build(run.config, context.node_config, instruction.label_names)
        # its personal tensors as round `instruction.round` left them
        site.client.personal, _ = store.before(instruction.round + 1)
    scores = site.evaluate(instruction.download(), full=instruction.full)
    return Message(RecordDict({RECORD: ConfigRecord(score_record(
        site.client.cid, scores, len(site.test_tokens)))}), reply_to=msg)


def open_state(node_config, run: FlowerRun) -> SiteState:
    """This site's state for this run, from its node config's `state-dir`."""
    cid = client_id(node_config, run.config)
    return SiteState.open(state_dir(node_config, cid), run.config, run.out, cid)
