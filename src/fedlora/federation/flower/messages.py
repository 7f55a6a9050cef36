"""What travels between the ServerApp and a site, as Flower records.

A train instruction carries the round and the download; a reply carries the upload, the
number of examples, the ε the site has spent so far (over every round), and its DP plan.
States travel as fedlora's safetensors encoding (`wire.encode_state`) in a `ConfigRecord`'s
bytes value, so the bytes counted here are exactly the bytes the in-process simulation counts;
Flower's own framing (message metadata, object ids) comes on top and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.federation.client import ClientReply
from fedlora.federation.wire import decode_state, encode_state
from fedlora.methods.base import State

RECORD = "fedlora"


@dataclass
class TrainInstruction:
    round: int  # 0-based; for an evaluation, the round whose result is scored
    client: int
    payload: bytes  # the encoded download
    label_names: list[str]
    checkpointed: int = 0  # rounds the server has checkpointed (0: none): never asked again
    full: bool = True  # an evaluation: all held-out examples, or the fixed subset (eval_examples)

    def download(self) -> State:
        return decode_state(self.payload)


@dataclass
class SiteFacts:
    """What a site says about itself (answer to a query, and part of every reply)."""

    client: int
    num_examples: int
    noise_multiplier: float
    sample_rate: float
    label_names: list[str]


def train_record(round: int, client: int, payload: bytes, label_names: list[str],
                 checkpointed: int = 0, full: bool = True) -> dict:
    return {"round": round, "client": client, "download": payload, "label-names": list(label_names),
            "checkpointed": checkpointed, "full": bool(full)}


def read_train(record) -> TrainInstruction:
    return TrainInstruction(int(record["round"]), int(record["client"]), bytes(record["download"]),
                            list(record["label-names"]), int(record["checkpointed"]),
                            bool(record["full"]))


def score_record(client: int, scores: dict, held_out: int) -> dict:
    """A site's scores of its own model: accuracy, loss, and how many of its `held_out`
    examples they are on (fewer: the fixed subset of a round before the last)."""
    return {"client": client, "accuracy": float(scores["test_accuracy"]),
            "loss": float(scores["test_loss"]),
            "examples": int(scores.get("test_examples", held_out)), "held-out": int(held_out)}


def facts_record(facts: SiteFacts) -> dict:
    return {"client": facts.client, "num-examples": facts.num_examples,
            "noise-multiplier": float(facts.noise_multiplier),
            "sample-rate": float(facts.sample_rate), "label-names": list(facts.label_names)}


def read_facts(record) -> SiteFacts:
    return SiteFacts(int(record["client"]), int(record["num-examples"]),
                     float(record["noise-multiplier"]), float(record["sample-rate"]),
                     list(record["label-names"]))


def reply_record(reply: ClientReply, facts: SiteFacts) -> tuple[dict, int]:
    """The reply as record values, and the size of its encoded upload (0 for a refusal)."""
    payload = encode_state(reply.upload) if reply.refused is None else b""
    return {**facts_record(facts), "upload": payload, "epsilon": float(reply.epsilon),
            "steps": int(reply.steps), "train-loss": float(reply.train_loss),
            "refused": reply.refused or ""}, len(payload)


def read_reply(record) -> tuple[ClientReply, SiteFacts, int]:
    """A site's reply, its facts, and the number of upload bytes it carried."""
    payload = bytes(record["upload"])
    refused = str(record["refused"]) or None
    reply = ClientReply(
        client=int(record["client"]),
        upload=decode_state(payload) if refused is None else {},
        num_examples=int(record["num-examples"]),
        epsilon=float(record["epsilon"]),
        steps=int(record["steps"]),
        train_loss=float(record["train-loss"]),
        refused=refused,
    )
    return reply, read_facts(record), len(payload)
