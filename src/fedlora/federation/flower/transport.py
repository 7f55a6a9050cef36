"""The Flower transport: fedlora's round loop reaches the sites through Flower's Grid.

`exchange(round, downloads)` sends each selected client's download to the SuperNode that
serves it and turns the replies into `ClientReply`s. A site that fails (its ClientApp raised),
disconnects (the SuperLink reports it unavailable once its heartbeats stop) or does not answer
within the round timeout is logged and listed in `Exchange.failed`; the round loop decides
whether enough sites answered (`federation.min_clients`).

With `federation.secure_aggregation` a round goes through Flower's SecAgg+ instead
(secagg_server.py): the sites' uploads are masked, and the server receives only their weighted
mean, as one reply; the sites' public facts (n_k, ε, steps) come with it.

Which node serves which client is asked, not guessed: a `query` message to each new node
returns the fedlora client id from its node config (`client-id` or `partition-id`), so a run
matches the in-process simulation with the same seed and data whatever ids Flower assigns.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from fedlora.errors import FederationError
from fedlora.federation.flower.messages import (RECORD, SiteFacts, center_record, read_reply,
                                                train_record)
from fedlora.federation.flower.secagg import SummedUploads
from fedlora.federation.server import Exchange
from fedlora.federation.wire import encode_state
from fedlora.methods.base import State

log = logging.getLogger("fedlora.flower")


class FlowerTransport:
    def __init__(self, grid, label_names: list[str], num_clients: int, round_timeout: float,
                 say: Callable[[str], None] = log.info, secure: SummedUploads | None = None,
                 max_update_norm: float = 0.0):
        """`secure`: sum each round's uploads with SecAgg+ (secagg_server.py), quantised within
        ±`max_update_norm`; None: every site's upload comes to the server."""
        self.grid = grid
        self.label_names = list(label_names)
        self.num_clients = num_clients
        self.round_timeout = round_timeout
        self.say = say
        self.nodes: dict[int, int] = {}  # fedlora client id → Flower node id
        self.ignored: set[int] = set()  # nodes that failed the query or duplicate a client id
        self.facts: dict[int, SiteFacts] = {}  # the latest each site said about itself
        self.steps: dict[int, int] = {}
        self.saved_rounds = 0  # rounds the last checkpoint holds (0: none); sites may forget them
        self.last_round = -1  # the latest round exchanged (personalised scores are of it)
        self.withheld: set[int] = set()  # sites that keep their personalised scores
        self.secure = secure
        self.max_update_norm = max_update_norm
        self.sizes: dict[int, int] = {}  # n_k, asked before a secure round fixes its weights

    # ---------------------------------------------------------------- who is out there
    def connect(self, timeout: float, minimum: int) -> None:
        """Wait until every client has a node, or `timeout` seconds; at least `minimum` needed."""
        deadline = time.monotonic() + timeout
        while True:
            self.discover()
            if len(self.nodes) >= self.num_clients:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if len(self.nodes) < minimum:
            raise FederationError(
                f"only {len(self.nodes)} of {self.num_clients} sites connected within "
                f"{timeout:g} s (clients {sorted(self.nodes)}), fewer than federation.min_clients="
                f"{minimum} — start the missing SuperNodes or raise connect-timeout")
        self.say(f"going on with {len(self.nodes)} of {self.num_clients} sites: clients "
                 f"{sorted(self.nodes)}")

    def discover(self) -> None:
        """Ask every node not seen before which client it serves."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        known = set(self.nodes.values()) | self.ignored
        new = sorted(n for n in self.grid.get_node_ids() if n not in known)
        if not new:
            return
        messages = {n: Message(RecordDict({RECORD: ConfigRecord({})}), dst_node_id=n,
                               message_type=MessageType.QUERY) for n in new}
        replies = list(self.grid.send_and_receive(list(messages.values()), timeout=self.round_timeout))
        node_of = {m.metadata.message_id: n for n, m in messages.items()}
        for rep in replies:
            node = node_of.get(rep.metadata.reply_to_message_id)
            if node is None:
                continue
            if rep.has_error():
                self.say(f"node {node} cannot take part: {rep.error.reason}")
                self.ignored.add(node)
                continue
            cid = int(rep.content.config_records[RECORD]["client"])
            if cid in self.nodes:
                self.say(f"node {node} says it is client {cid}, which node {self.nodes[cid]} "
                         "already serves — ignored")
                self.ignored.add(node)
                continue
            self.nodes[cid] = node
            self.say(f"client {cid} is node {node}")

    # ---------------------------------------------------------------- one round
    def checkpointed(self, rounds: int) -> None:
        """The server has durably checkpointed its first `rounds` rounds; sites hear it with
        their next instruction and drop the state they kept to replay those rounds."""
        self.saved_rounds = rounds

    def exchange(self, round: int, downloads: dict[int, State]) -> Exchange:
        from flwr.app import MessageType

        self.last_round = round
        records = {cid: train_record(round, cid, encode_state(state), self.label_names,
                                     self.saved_rounds) for cid, state in downloads.items()}
        if self.secure is not None:
            return self._secure_round(round, downloads, records)
        return self._send(MessageType.TRAIN, records, f"round {round + 1}")

    def _secure_round(self, round: int, downloads: dict[int, State], records: dict[int, dict]) -> Exchange:
        """The round through SecAgg+: the server gets the weighted mean of the uploads only."""
        from fedlora.federation.flower.secagg_server import SecureRound, secure_round

        self.discover()
        failed = {c: "no SuperNode serves this client" for c in records if c not in self.nodes}
        self.ask_sizes([c for c in records if c in self.nodes and c not in self.sizes], failed)
        asked = {c: r for c, r in records.items() if c in self.sizes}
        exchange = secure_round(self.grid, SecureRound(
            round, downloads, asked, self.nodes, self.sizes, self.secure, self.max_update_norm,
            self.round_timeout, self.say, failed, self.facts))
        for reply in exchange.replies:
            self.steps[reply.client] = reply.steps
        return exchange

    def ask_sizes(self, clients: list[int], failed: dict[int, str]) -> None:
        """n_k of each of `clients` (public: docs/privacy.md), which fixes SecAgg+'s weights
        before any site trains; a site that does not answer goes in `failed`."""
        from flwr.app import MessageType

        if not clients:
            return
        records = {cid: {"ask": "size", "client": cid} for cid in clients}
        for cid, record in self._query(MessageType.QUERY, records).items():
            if isinstance(record, str):
                failed[cid] = record
            else:
                self.sizes[cid] = int(record["num-examples"])

    def _query(self, kind: str, records: dict[int, dict]) -> dict[int, object]:
        """Each record to its client's node: client → the reply's record, or why none came."""
        from flwr.app import ConfigRecord, Message, RecordDict

        messages = {cid: Message(RecordDict({RECORD: ConfigRecord(r)}), dst_node_id=self.nodes[cid],
                                 message_type=kind) for cid, r in records.items()}
        answers = list(self.grid.send_and_receive(list(messages.values()), timeout=self.round_timeout))
        client_of = {m.metadata.message_id: cid for cid, m in messages.items()}
        out: dict[int, object] = {cid: f"no answer within {self.round_timeout:g} s" for cid in records}
        for msg in answers:
            cid = client_of.get(msg.metadata.reply_to_message_id)
            if cid is not None:
                out[cid] = msg.error.reason if msg.has_error() else msg.content.config_records[RECORD]
        return out

    def ask_center(self, clients: list[int]) -> Exchange:
        """The DP feature-centring query, a query message of its own: nothing goes down."""
        from flwr.app import MessageType

        records = {cid: center_record(cid, self.label_names, self.saved_rounds) for cid in clients}
        return self._send(MessageType.QUERY, records, "the centring query")

    def _send(self, kind: str, records: dict[int, dict], what: str) -> Exchange:
        """Each client's record to its node; the replies as `ClientReply`s, sites that failed,
        and the bytes of the payloads that went down and came up."""
        from flwr.app import ConfigRecord, Message, RecordDict

        self.discover()
        failed: dict[int, str] = {}
        messages: dict[int, Message] = {}
        sent = 0
        for cid, record in records.items():
            if cid not in self.nodes:
                failed[cid] = "no SuperNode serves this client"
                continue
            sent += len(record.get("download", b""))
            messages[cid] = Message(RecordDict({RECORD: ConfigRecord(record)}),
                                    dst_node_id=self.nodes[cid], message_type=kind)
        answers = list(self.grid.send_and_receive(list(messages.values()), timeout=self.round_timeout))
        client_of = {m.metadata.message_id: cid for cid, m in messages.items()}
        replies, received = [], 0
        for msg in answers:
            cid = client_of.pop(msg.metadata.reply_to_message_id, None)
            if cid is None:
                continue
            if msg.has_error():
                failed[cid] = msg.error.reason
                continue
            reply, facts, size = read_reply(msg.content.config_records[RECORD])
            if reply.client != cid:
                failed[cid] = f"answered as client {reply.client}"
                continue
            self.facts[cid] = facts
            self.steps[cid] = reply.steps
            replies.append(reply)
            received += size
        for cid in client_of.values():
            failed[cid] = f"no answer within {self.round_timeout:g} s"
        for cid, why in sorted(failed.items()):
            self.say(f"{what}: client {cid} dropped out — {why}")
        replies.sort(key=lambda r: r.client)  # aggregation order as in the simulation
        return Exchange(replies, sent, received, failed)

    # ---------------------------------------------------------------- personalised scores
    def evaluate_sites(self, downloads: dict[int, State],
                       full: bool = True) -> dict[int, tuple[float, float, int, int]]:
        """Each site scores its own model (its personal tensors + `downloads[c]`) on its own
        held-out examples, all of them or (`full=False`) its fixed subset: client → (accuracy,
        loss, examples scored, examples held out). Sites that fail are logged and left out.
        This traffic is evaluation, not training: it is not in the byte counts."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        messages = {cid: Message(RecordDict({RECORD: ConfigRecord(train_record(
                        self.last_round, cid, encode_state(state), self.label_names,
                        self.saved_rounds, full))}),
                        dst_node_id=self.nodes[cid], message_type=MessageType.EVALUATE)
                    for cid, state in downloads.items() if cid in self.nodes}
        answers = list(self.grid.send_and_receive(list(messages.values()), timeout=self.round_timeout))
        client_of = {m.metadata.message_id: cid for cid, m in messages.items()}
        scores = {}
        for msg in answers:
            cid = client_of.get(msg.metadata.reply_to_message_id)
            if cid is None:
                continue
            if msg.has_error():
                self.say(f"client {cid} could not score its model — {msg.error.reason}")
                continue
            record = msg.content.config_records[RECORD]
            if "withheld" in record:
                if cid not in self.withheld:
                    self.say(f"client {cid} keeps its scores: {record['withheld']}")
                self.withheld.add(cid)
                continue
            scores[cid] = (float(record["accuracy"]), float(record["loss"]),
                           int(record["examples"]), int(record["held-out"]))
        return scores

    def client_facts(self) -> list[dict]:
        """Per client id, what the summary reports (None for a site never heard from)."""
        out = []
        for cid in range(self.num_clients):
            f = self.facts.get(cid)
            out.append({"noise_multiplier": f.noise_multiplier if f else None,
                        "sample_rate": f.sample_rate if f else None,
                        "steps": self.steps.get(cid), "size": f.num_examples if f else None})
        return out


def personalised_evaluation(transport: FlowerTransport, method, num_clients: int):
    """`evaluate(glob, full)` for personalised methods, as `PersonalisedEvaluation` reports it:
    the unweighted mean over the clients that answered, per-client lists (None: no answer),
    and `test_examples` when some site scored only its fixed subset."""
    def evaluate(glob, full: bool = True) -> dict:
        downloads = {c: method.download(glob, c) for c in range(num_clients)}
        scores = transport.evaluate_sites(downloads, full)
        acc = [scores[c][0] if c in scores else None for c in range(num_clients)]
        loss = [scores[c][1] if c in scores else None for c in range(num_clients)]
        got_acc, got_loss = [a for a in acc if a is not None], [x for x in loss if x is not None]
        if not got_acc:
            return {}
        out = {"test_accuracy": sum(got_acc) / len(got_acc),
               "test_loss": sum(got_loss) / len(got_loss),
               "test_accuracy_per_client": acc, "test_loss_per_client": loss}
        if any(examples < held for _, _, examples, held in scores.values()):
            out["test_examples"] = sum(examples for _, _, examples, _ in scores.values())
        return out
    return evaluate
