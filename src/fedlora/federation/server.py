"""The round loop, written once for every runner; transports differ only in how messages travel.

    for each round:  pick clients → download(global) → [transport: clients train] →
                     aggregate(updates) → evaluate → one metrics record
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from fedlora.errors import FederationError
from fedlora.federation.client import ClientReply
from fedlora.methods.base import GlobalState, Method, State, Update
from fedlora.seeding import derive_seed


@dataclass
class Exchange:
    """What one round's traffic returned: the replies, the bytes that crossed the wire, and the
    selected clients that never answered (client → why: failed, disconnected, timed out)."""

    replies: list[ClientReply]
    bytes_downloaded: int
    bytes_uploaded: int
    failed: dict[int, str] = field(default_factory=dict)


class Transport(Protocol):
    def exchange(self, round: int, downloads: dict[int, State]) -> Exchange:
        """Send each client its download, let it train, return its reply."""


@dataclass
class RoundPlan:
    rounds: int
    num_clients: int
    clients_per_round: int  # 0 = all
    eval_every: int
    seed: int
    min_clients: int = 1


@dataclass
class FederationState:
    """Everything the loop accumulates: the global model, per-client ε and steps, totals."""

    glob: GlobalState
    epsilon: dict[int, float] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    history: list[dict] = field(default_factory=list)


Evaluate = Callable[[GlobalState], dict[str, float]]


def select_clients(plan: RoundPlan, round: int) -> list[int]:
    """All clients, or a seeded sample of `clients_per_round` without replacement."""
    k = plan.clients_per_round or plan.num_clients
    if k >= plan.num_clients:
        return list(range(plan.num_clients))
    rng = np.random.default_rng(derive_seed(plan.seed, "select", round))
    return sorted(int(c) for c in rng.choice(plan.num_clients, size=k, replace=False))


def run_rounds(method: Method, state: FederationState, transport: Transport, plan: RoundPlan,
               evaluate: Evaluate, on_round: Callable[[dict], None] | None = None) -> FederationState:
    """Run `plan.rounds` rounds, mutating and returning `state`."""
    for r in range(len(state.history), plan.rounds):
        start = time.perf_counter()
        selected = select_clients(plan, r)
        downloads = {c: method.download(state.glob, c) for c in selected}
        exchange = transport.exchange(r, downloads)
        if len(exchange.replies) < plan.min_clients:
            raise FederationError(
                f"round {r + 1}: only {len(exchange.replies)} of {len(selected)} clients answered "
                f"({_failures(exchange)}), fewer than federation.min_clients={plan.min_clients} — "
                "restart the missing sites, or lower federation.min_clients")
        accepted = [rep for rep in exchange.replies if rep.refused is None]
        updates = [Update(rep.client, rep.upload, rep.num_examples) for rep in accepted]
        state.glob = method.aggregate(state.glob, updates, r)
        for rep in exchange.replies:
            state.epsilon[rep.client] = rep.epsilon
            state.steps[rep.client] = rep.steps
        state.bytes_uploaded += exchange.bytes_uploaded
        state.bytes_downloaded += exchange.bytes_downloaded
        last = r == plan.rounds - 1 or not accepted
        scores = evaluate(state.glob) if (r + 1) % plan.eval_every == 0 or last else {}
        record = _record(r, selected, exchange, accepted, state, scores, time.perf_counter() - start)
        state.history.append(record)
        if on_round:
            on_round(record)
        if not accepted:  # every selected client refused: nobody has budget left
            break
    return state


def _record(r, selected, exchange, accepted, state, scores, seconds) -> dict:
    losses = [rep.train_loss for rep in accepted if not math.isnan(rep.train_loss)]
    return {
        "round": r + 1,
        **{k: scores.get(k) for k in ("test_accuracy", "test_loss")},
        **{k: v for k, v in scores.items() if k not in ("test_accuracy", "test_loss")},
        "train_loss": sum(losses) / len(losses) if losses else None,
        "epsilon": max(state.epsilon.values(), default=0.0),
        "epsilon_per_client": [state.epsilon.get(c, 0.0) for c in range(_n(state))],
        "clients": selected,
        "refused": {rep.client: rep.refused for rep in exchange.replies if rep.refused},
        "failed": dict(exchange.failed),
        "bytes_uploaded": exchange.bytes_uploaded,
        "bytes_downloaded": exchange.bytes_downloaded,
        "seconds": round(seconds, 3),
    }


def _failures(exchange: Exchange) -> str:
    return "; ".join(f"client {c}: {why}" for c, why in sorted(exchange.failed.items())) or "no reason given"


def _n(state: FederationState) -> int:
    return max(state.epsilon, default=-1) + 1
