"""The ClientApp a SuperNode runs: answer who it is, train its own client on its own data,
and (personalised methods) score its own model on its own held-out examples.

Every fedlora method and the DP-SGD step run unchanged: the site builds the same
`LocalTrainer` and `Client` the simulation builds, only from its own data.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedlora.federation.flower.messages import RECORD, read_train, reply_record  # noqa: E402
from fedlora.federation.flower.runconfig import read_run_config  # noqa: E402
from fedlora.federation.flower.site import Site, client_id  # noqa: E402

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which fedlora client this node serves (read from its node config; no data is loaded)."""
    run = read_run_config(context.run_config)
    cid = client_id(context.node_config, run.config)
    return Message(RecordDict({RECORD: ConfigRecord({"client": cid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    run = read_run_config(context.run_config)
    instruction = read_train(msg.content.config_records[RECORD])
    site = Site.build(run.config, context.node_config, instruction.label_names)
    if site.client.cid != instruction.client:
        raise RuntimeError(f"sent to client {instruction.client}, but this site is client "
                           f"{site.client.cid}")
    site.restore(context.state)
    reply = site.trainer.train(site.client, instruction.download(), instruction.round)
    site.save(context.state)  # the accountant has recorded every step before anything leaves
    content, _ = reply_record(reply, site.facts)
    return Message(RecordDict({RECORD: ConfigRecord(content)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised methods: this client's own model, scored on its own held-out examples."""
    run = read_run_config(context.run_config)
    instruction = read_train(msg.content.config_records[RECORD])
    site = Site.build(run.config, context.node_config, instruction.label_names)
    site.restore(context.state)  # its personal tensors, as its last round left them
    scores = site.evaluate(instruction.download())
    return Message(RecordDict({RECORD: ConfigRecord({
        "client": site.client.cid, "accuracy": float(scores["test_accuracy"]),
        "loss": float(scores["test_loss"])})}), reply_to=msg)
