"""A site: one SuperNode's client, built from the run's config and the node's own config.

Node config (`flower-supernode --node-config '...'`), one of:

* `data-path="/data/site.csv"` (+ `text-column`, `label-column`, `client-id`): the site's own
  file, all of it training data, read by the run's task (labelled texts for classification,
  prompt → answer pairs for a causal LM); `client-id` is its fedlora client number (0-based).
* `partition-id=K num-partitions=N`: for demos, part K of the run's `data.path` split exactly
  as the in-process simulation splits it (N must equal `federation.clients`).

plus, for any site, `state-dir="/abs/folder"`: where the site keeps its privacy ledger, secret
keys and personal tensors (see sitestate.py; default `$FLWR_HOME/fedlora-state/client-<k>`),
`device="cuda:1"` (or cpu, cuda, auto): where this site computes, instead of the run's `device`
(whose default, auto, already lets each site use its own GPU if it has one), and the site's own
privacy terms — `epsilon`, `delta`, `clip`, `allow-seeded-noise`, `share-evaluation` (terms.py).

Flower starts a fresh ClientApp process for every message, so a site is rebuilt each round
(the base model and LoRA A come from the run's seed, identical everywhere) and what must
outlive a round — the privacy accountant's history, the steps taken, personal tensors — is
kept on the site's disk, read at the start of every message and written before a reply
leaves. ε is therefore composed over every step the site ever took, exactly as one
continuous accountant would, across restarts of the SuperNode and of the server.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from fedlora.config import Config
from fedlora.data.sources import TextDataset, split_holdout
from fedlora.config import DEVICE_NAMES, valid_device_name
from fedlora.errors import ConfigError, DataError
from fedlora.experiment import (Base, build_base, build_client, build_trainer, held_out_evaluator,
                                load_data, split_data)
from fedlora.federation.client import Client, LocalTrainer
from fedlora.federation.evaluate import personal_share
from fedlora.federation.flower.messages import SiteFacts
from fedlora.federation.flower.sitestate import data_digest
from fedlora.federation.flower.terms import TERM_KEYS
from fedlora.methods import get_method
from fedlora.tasks import get_task
from fedlora.methods.base import State
from fedlora.seeding import derive_seed

log = logging.getLogger("fedlora.site")

DEMO_KEYS = ("partition-id", "num-partitions")
OWN_KEYS = ("data-path", "text-column", "label-column", "client-id")
SITE_KEYS = ("state-dir", "device") + TERM_KEYS  # either kind of site


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
    valid = DEMO_KEYS + OWN_KEYS + SITE_KEYS
    unknown = sorted(set(node_config) - set(valid))
    if unknown:
        raise ConfigError(f"node config: unknown keys {unknown} — valid: {', '.join(valid)}")


def site_config(config: Config, node_config: Mapping[str, Any]) -> Config:
    """The run's config with this node's `device`, if its node config names one."""
    if "device" not in node_config:
        return config
    value = node_config["device"]
    if not valid_device_name(value):
        raise ConfigError(f"node config: device={value!r} must be one of "
                          f"{', '.join(DEVICE_NAMES)} (N = GPU index), e.g. device=\"cuda:0\"")
    return dataclasses.replace(config, device=value)


@dataclass
class SiteData:
    """A site's examples, loaded by the run's task: the data set, the positions it trains on,
    and — for personalised methods — its own held-out positions, on which its own model is
    scored."""

    client: int
    dataset: Any  # TextDataset (classification) or PairDataset (causal)
    train: list[int]
    test: list[int] = field(default_factory=list)


def site_examples(config: Config, node_config: Mapping[str, Any]) -> SiteData:
    """This site's data through the run's task, split as the simulation splits it
    (personalised: a held-out part)."""
    cid = client_id(node_config, config)
    personalised = get_method(config.method).personalised
    if "data-path" in node_config:
        d = config.data
        own = dataclasses.replace(config, data=dataclasses.replace(
            d, path=str(node_config["data-path"]), max_examples=0, partition="iid",
            text_column=str(node_config.get("text-column", d.text_column)),
            label_column=str(node_config.get("label-column", d.label_column))))
        data = get_task(own).load_data()  # all of it is this site's
        train, test = list(range(len(data))), []
        if personalised:  # as the simulation holds out part of each client's examples
            train, test = split_holdout(data.labels, d.test_fraction, derive_seed(config.seed, "test", cid))
        return SiteData(cid, data, train, test)
    parts = node_config.get("num-partitions")
    if parts != config.federation.clients:
        raise ConfigError(f"node config: num-partitions={parts!r} but the run has federation.clients="
                          f"{config.federation.clients} — start every SuperNode with "
                          f"num-partitions={config.federation.clients}")
    dataset = load_data(config)  # the shared demo set, split exactly as the simulation does
    split = split_data(dataset, config, personalised)
    test = split.client_test[cid] if split.client_test is not None else []
    return SiteData(cid, dataset, split.clients[cid], test)


def in_run_labels(data: SiteData, label_names: list[str]) -> SiteData:
    """A classification site's labels numbered as the server numbers them (by name)."""
    ds = data.dataset
    if not isinstance(ds, TextDataset) or ds.label_names == list(label_names):
        return data
    used = [ds.label_names[ds.labels[i]] for i in data.train + data.test]
    unknown = sorted(set(used) - set(label_names))
    if unknown:  # named in the site's own log only: the site's label set is its own business
        log.error("site %d: labels %s are not among the run's labels %s — relabel the site's "
                  "data", data.client, unknown, label_names)
        raise DataError(f"site {data.client}: some of its labels are not among the run's "
                        "labels (the site's log names them) — relabel the site's data")
    index = {n: i for i, n in enumerate(label_names)}
    relabelled = dataclasses.replace(ds, labels=[index.get(ds.label_names[y], -1) for y in ds.labels],
                                     label_names=list(label_names))
    return dataclasses.replace(data, dataset=relabelled)


def example_rows(dataset: Any, positions: list[int]) -> list[str]:
    """The examples at `positions` as text rows (what names a site's data: `data_digest`)."""
    if isinstance(dataset, TextDataset):
        return [f"{dataset.texts[i]}\0{dataset.label_names[dataset.labels[i]]}" for i in positions]
    return [f"{dataset.prompts[i]}\0{dataset.answers[i]}" for i in positions]


@dataclass
class Site:
    """One site's client and trainer, built by the same task-driven builders as the simulation
    (`fedlora.experiment`): data, base model, tokens, DP plan and — personalised methods — the
    evaluator of its own model on its own held-out examples."""

    client: Client
    trainer: LocalTrainer
    label_names: list[str]
    base: Base
    data: SiteData
    tokens: dict[int, list[int]]
    targets: dict[int, int]
    config: Config
    data_digest: str = ""  # names the site's training data: its ledger is per data set

    @classmethod
    def build(cls, config: Config, node_config: Mapping[str, Any], label_names: list[str]) -> "Site":
        """`label_names` are the server's: a classification site's labels are numbered by
        name, as the server's (a causal site has none)."""
        here = site_config(config, node_config)
        task = get_task(here)
        data = in_run_labels(site_examples(config, node_config), label_names)
        base = build_base(here, max(1, len(label_names)), task=task)
        mine = data.train + data.test
        ids, targets = task.encode(base.tokenizer, data.dataset.subset(mine))
        tokens, targets = dict(zip(mine, ids)), dict(zip(mine, targets))
        client = build_client(config, data.client, [tokens[i] for i in data.train],
                              [targets[i] for i in data.train])
        return cls(client, build_trainer(config, base), list(label_names), base, data, tokens,
                   targets, config, data_digest(example_rows(data.dataset, data.train)))

    def evaluate(self, download: State, full: bool = True) -> dict[str, float]:
        """This client's own model (its personal tensors + the download) on its held-out part:
        all of it, or (`full=False`) the fixed stratified subset the simulation scores for this
        client (same share, same seed) — the simulation's own evaluator builder."""
        data, cid = self.data, self.client.cid
        if not data.test:
            raise DataError(f"site {cid} has no held-out examples to score its model on")
        base, f = self.base, self.config.federation
        own = base.method.client_state(base.initial, self.client.personal, download, cid)
        scorer = held_out_evaluator(self.config, base, data.dataset, data.test, self.tokens,
                                    self.targets, "test", personal_share(f.eval_examples, f.clients),
                                    ("test", cid), view=lambda glob: own)
        return scorer(None, full=full)

    @property
    def test_size(self) -> int:
        return len(self.data.test)

    @property
    def facts(self) -> SiteFacts:
        p = self.client.privacy
        return SiteFacts(self.client.cid, self.client.num_examples, p.noise_multiplier,
                         p.sample_rate, self.label_names)
