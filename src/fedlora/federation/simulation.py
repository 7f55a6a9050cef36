"""In-process transport: every client trains in this process on the one shared model.

Payloads are serialised exactly as they would be on a network, so the byte counts are real
and a client only ever sees what was sent to it.
"""

from __future__ import annotations

from fedlora.federation.client import Client, LocalTrainer
from fedlora.federation.server import Exchange
from fedlora.federation.wire import decode_state, encode_state
from fedlora.methods.base import State


class InProcessTransport:
    def __init__(self, trainer: LocalTrainer, clients: list[Client]):
        self.trainer = trainer
        self.clients = {c.cid: c for c in clients}

    def exchange(self, round: int, downloads: dict[int, State]) -> Exchange:
        replies, down, up = [], 0, 0
        for cid, state in downloads.items():
            sent = encode_state(state)
            down += len(sent)
            reply = self.trainer.train(self.clients[cid], decode_state(sent), round)
            received = encode_state(reply.upload)
            up += len(received) if reply.refused is None else 0
            reply.upload = decode_state(received)
            replies.append(reply)
        return Exchange(replies, down, up)

    def checkpointed(self, rounds: int) -> None:
        """Rounds before `rounds` are checkpointed and never replayed: the clients' ledgers may
        forget them (keeping what each has spent), so a ledger stays as small as the interval."""
        for client in self.clients.values():
            if client.ledger is not None:
                client.ledger.forget_before(rounds)
