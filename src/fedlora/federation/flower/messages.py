"""What travels between the ServerApp and a site, as Flower records.

A train instruction carries the round and the download; a reply carries the upload, the
number of examples, the ε the site has spent so far (over every round), and its DP plan.
Every field a site sends is listed in `SITE_FIELDS`, with why it may leave the site
(docs/privacy.md has the same table); a test fails if a message carries any other. The
training loss is not among them: it is computed on the site's private batches without noise,
so it stays in the site's own log.
States travel as fedlora's safetensors encoding (`wire.encode_state`) in a `ConfigRecord`'s
bytes value, so the bytes counted here are exactly the bytes the in-process simulation counts;
Flower's own framing (message metadata, object ids) comes on top and is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlora.federation.client import ClientReply
from fedlora.federation.weighting import noise_scale
from fedlora.federation.wire import decode_state, encode_state
from fedlora.methods.base import State

RECORD = "fedlora"

# Every field of every message a site sends, and why it may leave the site. "DP": protected by
# the site's DP mechanism and counted in its ε. "public": a function of the config, of what the
# server sent, or of n_k, which the threat model treats as public (docs/privacy.md).
SITE_FIELDS: dict[str, dict[str, str]] = {
    "query": {"client": "public: the client id from the node config",
              "num-examples": "public: n_k, asked before a secure round fixes SecAgg+'s weights"},
    # the feature-centring query's answer: the fields of a training reply (below)
    "train": {
        "client": "public: the client id from the node config",
        "num-examples": "public: n_k, the site's number of training examples",
        "noise-multiplier": "public: σ_k, calibrated from the config and n_k",
        "sample-rate": "public: q_k = min(1, batch/n_k)",
        "label-names": "public: the run's label names, as the server sent them",
        "upload": "DP: the noisy update, or the centring query's noisy feature sum and c_k = q_m·n_k",
        "epsilon": "public: ε spent, a function of σ_k, q_k and the steps taken",
        "steps": "public: DP-SGD steps taken, a function of the config and the budget",
        "refused": "public: why the site sits a round out (its terms, its budget, a replay)",
    },
    # a secure round (federation.secure_aggregation): Flower's SecAgg+ stages, then the legacy
    # train result whose metrics are the public facts of a train reply (no `upload`)
    "secure-train": {
        "pk1": "public: a SecAgg+ public key (for the pairwise masks)",
        "pk2": "public: a SecAgg+ public key (for encrypting key shares)",
        "dsts": "public: which sites the encrypted key shares are for",
        "ctxts": "hidden: key shares encrypted for another site (the server cannot read them)",
        "masked_params": "hidden: w_k·Δ_k quantised and masked; only the sum of all is unmasked",
        "nids": "public: whose key shares follow (unmask stage)",
        "shares": "hidden alone: shares of live sites' mask seeds and dropped sites' keys — the "
                  "threshold of them rebuilds only what removes masks from the sum",
        "num_examples": "public: n_k (0 if the site sat the round out), Flower's weight",
        "client": "public: as in a train reply", "num-examples": "public: as in a train reply",
        "noise-multiplier": "public: as in a train reply", "sample-rate": "public: as in a train reply",
        "label-names": "public: as in a train reply", "epsilon": "public: as in a train reply",
        "steps": "public: as in a train reply", "refused": "public: as in a train reply",
        "code": "public: Flower's status code", "message": "public: Flower's status message",
    },
    "evaluate": {
        "client": "public: the client id from the node config",
        "withheld": "public: why the site keeps its scores (share-evaluation is off)",
        "accuracy": "NOT protected: sent only with share-evaluation=true (outside ε)",
        "loss": "NOT protected: sent only with share-evaluation=true (outside ε)",
        "examples": "public: how many held-out examples were scored",
        "held-out": "public: the site's number of held-out examples",
    },
}


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


def center_record(client: int, label_names: list[str], checkpointed: int = 0) -> dict:
    """A query message asking a site the DP feature-centring query (nothing is sent down)."""
    return {"ask": "center", "client": client, "label-names": list(label_names),
            "checkpointed": checkpointed}


def read_train(record) -> TrainInstruction:
    return TrainInstruction(int(record["round"]), int(record["client"]), bytes(record["download"]),
                            list(record["label-names"]), int(record["checkpointed"]),
                            bool(record["full"]))


def score_record(client: int, scores: dict, held_out: int) -> dict:
    """A site's scores of its own model: accuracy, loss, and how many of its `held_out`
    examples they are on (fewer: the fixed subset of a round before the last). Sent only when
    the site's node config says share-evaluation=true: they are not DP-protected."""
    return {"client": client, "accuracy": float(scores["test_accuracy"]),
            "loss": float(scores["test_loss"]),
            "examples": int(scores.get("test_examples", held_out)), "held-out": int(held_out)}


def withheld_record(client: int, reason: str) -> dict:
    """A site's answer to an evaluation when it keeps its scores to itself (the default)."""
    return {"client": client, "withheld": reason}


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
            "steps": int(reply.steps), "refused": reply.refused or ""}, len(payload)


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
        train_loss=math.nan,  # never sent: the site's training loss stays in its own log
        refused=refused,
    )
    facts = read_facts(record)
    if facts.noise_multiplier > 0:  # a private site: its public σ_k, q_k, n_k give s_k
        reply.noise_scale = noise_scale(facts.noise_multiplier, facts.sample_rate, facts.num_examples)
    return reply, facts, len(payload)
