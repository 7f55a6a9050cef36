"""A site: one SuperNode's client, built from the run's config and the node's own config.

Node config (`flower-supernode --node-config '...'`), one of:

* `data-path="/data/site.csv"` (+ `text-column`, `label-column`, `client-id`): the site's own
  labelled file, all of it training data; `client-id` is its fedlora client number (0-based).
* `partition-id=K num-partitions=N`: for demos, part K of the run's `data.path` split exactly
  as the in-process simulation splits it (N must equal `federation.clients`).

Flower starts a fresh ClientApp process for every message, so a site is rebuilt each round
(the base model and LoRA A come from the run's seed, identical everywhere) and what must
outlive a round — the privacy accountant's history, the steps taken, personal tensors — is
kept in the node's `Context.state`, which the SuperNode holds for the whole run. ε is therefore
composed over every step the site ever took, exactly as one continuous accountant would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from fedlora.config import Config
from fedlora.data.sources import load_dataset
from fedlora.errors import ConfigError, DataError
from fedlora.experiment import build_base, build_client, build_trainer, load_data, split_data
from fedlora.federation.client import Client, LocalTrainer
from fedlora.federation.flower.messages import SiteFacts
from fedlora.federation.wire import decode_state, encode_state
from fedlora.methods import get_method

STATE = "fedlora-site"
DEMO_KEYS = ("partition-id", "num-partitions")
OWN_KEYS = ("data-path", "text-column", "label-column", "client-id")


def client_id(node_config: Mapping[str, Any], config: Config) -> int:
    """The fedlora client this node serves: `client-id`, else `partition-id`."""
    _check_keys(node_config)
    key = "client-id" if "data-path" in node_config else "partition-id"
    if key not in node_config:
        raise ConfigError(f"node config: '{key}' is missing — start the SuperNode with "
                          f"--node-config 'partition-id=0 num-partitions={config.federation.clients}' "
                          "or 'data-path=\"site.csv\" client-id=0'")
    cid = node_config[key]
    if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < config.federation.clients:
        raise ConfigError(f"node config: {key}={cid!r} must be an integer in "
                          f"[0, {config.federation.clients - 1}] (federation.clients="
                          f"{config.federation.clients})")
    return cid


def _check_keys(node_config: Mapping[str, Any]) -> None:
    unknown = sorted(set(node_config) - set(DEMO_KEYS) - set(OWN_KEYS))
    if unknown:
        raise ConfigError(f"node config: unknown keys {unknown} — valid: "
                          f"{', '.join(DEMO_KEYS + OWN_KEYS)}")


def site_examples(config: Config, node_config: Mapping[str, Any]) -> tuple[int, list[str], list[str]]:
    """(client id, texts, label names per text) of this site's training data."""
    cid = client_id(node_config, config)
    if "data-path" in node_config:
        d = config.data
        data = load_dataset(str(node_config["data-path"]),
                            text_column=str(node_config.get("text-column", d.text_column)),
                            label_column=str(node_config.get("label-column", d.label_column)))
        return cid, data.texts, [data.label_names[y] for y in data.labels]
    parts = node_config.get("num-partitions")
    if parts != config.federation.clients:
        raise ConfigError(f"node config: num-partitions={parts!r} but the run has federation.clients="
                          f"{config.federation.clients} — start every SuperNode with "
                          f"num-partitions={config.federation.clients}")
    dataset = load_data(config)  # the shared demo set, split exactly as the simulation does
    part = split_data(dataset, config, get_method(config.method).personalised).clients[cid]
    return cid, [dataset.texts[i] for i in part], [dataset.label_names[dataset.labels[i]] for i in part]


@dataclass
class Site:
    client: Client
    trainer: LocalTrainer
    label_names: list[str]

    @classmethod
    def build(cls, config: Config, node_config: Mapping[str, Any], label_names: list[str]) -> "Site":
        """`label_names` are the server's: a site's labels are numbered by name, as the server's."""
        cid, texts, names = site_examples(config, node_config)
        unknown = sorted(set(names) - set(label_names))
        if unknown:
            raise DataError(f"site {cid}: labels {unknown} are not among the run's labels "
                            f"{label_names} — relabel the site's data")
        index = {n: i for i, n in enumerate(label_names)}
        base = build_base(config, len(label_names))
        client = build_client(config, cid, base.encode(texts, config), [index[n] for n in names])
        return cls(client, build_trainer(config, base), list(label_names))

    @property
    def facts(self) -> SiteFacts:
        p = self.client.privacy
        return SiteFacts(self.client.cid, self.client.num_examples, p.noise_multiplier,
                         p.sample_rate, self.label_names)

    # ---------------------------------------------------------------- kept between rounds
    def restore(self, state) -> None:
        """Continue from the node's saved ledger (nothing saved: the site's first round)."""
        if STATE not in state.config_records:
            return
        saved = state.config_records[STATE]
        if int(saved["client"]) != self.client.cid:
            raise ConfigError(f"this SuperNode served client {saved['client']} earlier in the run, "
                              f"now its node config says {self.client.cid} — keep node configs fixed")
        self.client.privacy.accountant.load_state_dict(json.loads(str(saved["accountant"])))
        self.client.steps = int(saved["steps"])
        self.client.personal = decode_state(bytes(saved["personal"]))

    def save(self, state) -> None:
        from flwr.app import ConfigRecord

        state.config_records[STATE] = ConfigRecord({
            "client": self.client.cid,
            "accountant": json.dumps(self.client.privacy.accountant.state_dict()),
            "steps": self.client.steps,
            "personal": encode_state(self.client.personal),
        })

