"""In-process transport: every client trains in this process on the one shared model.

Payloads are serialised exactly as they would be on a network, so the byte counts are real
and a client only ever sees what was sent to it.
"""

from __future__ import annotations

from fedlora.federation.client import Client, LocalTrainer
from fedlora.federation.server import Exchange
from fedlora.federation.timing import Timings, phase
from fedlora.federation.wire import decode_state, encode_state
from fedlora.methods.base import State


class InProcessTransport:
    """`timings`, if given, accumulates seconds under `train` (the client's whole local round)
    and `serialise` (encoding and decoding payloads, both ways)."""

    def __init__(self, trainer: LocalTrainer, clients: list[Client], timings: Timings | None = None):
        self.trainer = trainer
        self.clients = {c.cid: c for c in clients}
        self.timings = timings

    def exchange(self, round: int, downloads: dict[int, State]) -> Exchange:
        replies, down, up = [], 0, 0
        for cid, state in downloads.items():
            with phase(self.timings, "serialise"):
                sent = encode_state(state)
                received_download = decode_state(sent)
            down += len(sent)
            with phase(self.timings, "train"):
                reply = self.trainer.train(self.clients[cid], received_download, round)
            with phase(self.timings, "serialise"):
                received = encode_state(reply.upload)
                reply.upload = decode_state(received)
            up += len(received) if reply.refused is None else 0
            replies.append(reply)
        return Exchange(replies, down, up)

    def ask_center(self, clients: list[int]) -> Exchange:
        """The DP feature-centring query: nothing goes down, each client's noisy sum comes up."""
        replies, up = [], 0
        for cid in clients:
            with phase(self.timings, "train"):
                reply = self.trainer.answer_center_query(self.clients[cid])
            with phase(self.timings, "serialise"):
                received = encode_state(reply.upload)
                reply.upload = decode_state(received)
            up += len(received) if reply.refused is None else 0
            replies.append(reply)
        return Exchange(replies, 0, up)

    def checkpointed(self, rounds: int) -> None:
        """Rounds before `rounds` are checkpointed and never replayed: the clients' ledgers may
        forget them (keeping what each has spent), so a ledger stays as small as the interval."""
        for client in self.clients.values():
            if client.ledger is not None:
                client.ledger.forget_before(rounds)
