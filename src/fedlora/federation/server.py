"""The round loop, written once for every runner; transports differ only in how messages travel.

    once, first:     DP feature-centring query, if the plan asks for it (`centering`): its own
                     message (`Transport.ask_center`), not a round
    for each round:  pick clients → download(global) → [transport: clients train] →
                     validate replies → aggregate(accepted) → end_round (a chain's merge)
                     → evaluate → one metrics record
                     → checkpoint (every `checkpoint_every` rounds and after the last)

`evaluate(glob, full=...)` is asked for the whole held-out set after the last round only;
before it, an evaluator may score a fixed subset (`federation.eval_examples`, see
`fedlora.federation.evaluate`) and says so in its scores (`test_examples`).

A reply that fails validation never reaches `method.aggregate`: it is rejected and logged with
the client's id; the round goes on with the others, or the run stops (`on_bad_update`). Under
secure aggregation (`Exchange.summed`) the server holds one reply, the weighted mean of the
uploads: that is what is validated and what `method.aggregate` receives, as one update.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from fedlora.errors import FederationError
from fedlora.federation import centering
from fedlora.federation.client import ClientReply
from fedlora.federation.server_optimizer import ServerOptimizer, server_step
from fedlora.federation.weighting import aggregation_weight
from fedlora.federation.timing import Laps, Timings
from fedlora.federation.validate import UpdateValidator
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
    # secure aggregation (Flower's SecAgg+): the replies carry no upload; `summed` is the one
    # upload the server sees, the weighted mean of the sites' uploads (None: nobody
    # contributed), and `secure` says who is in it and how it was quantised
    summed: ClientReply | None = None
    secure: dict | None = None


class Transport(Protocol):
    def exchange(self, round: int, downloads: dict[int, State]) -> Exchange:
        """Send each client its download, let it train, return its reply."""

    def ask_center(self, clients: list[int]) -> Exchange:
        """Ask each client the DP feature-centring query (`centering`); nothing is sent down."""

    def checkpointed(self, rounds: int) -> None:
        """A checkpoint holds the first `rounds` ≥ 1 rounds (and anything before round 1): no
        client will be asked for them again (what it keeps to replay them may go)."""


@dataclass
class RoundPlan:
    rounds: int
    num_clients: int
    clients_per_round: int  # 0 = all
    eval_every: int
    seed: int
    min_clients: int = 1
    checkpoint_every: int = 0  # 0 = never
    on_bad_update: str = "skip"  # or "stop"
    center_dim: int = 0  # > 0: run the DP feature-centring query for features of this size
    server_optimizer: ServerOptimizer = ServerOptimizer()  # the server's step (FedOpt)
    weighting: str = "examples"  # the aggregation weights (`federation.weighting`)


class UpdateRejected(FederationError):
    """A client's update failed validation and the run is configured to stop."""


@dataclass
class FederationState:
    """Everything the loop accumulates: the global model, per-client ε and steps, totals."""

    glob: GlobalState
    epsilon: dict[int, float] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    history: list[dict] = field(default_factory=list)
    center: dict = field(default_factory=dict)  # what the centring query gave (see `centering`)
    seconds_before: float = 0.0  # wall time of earlier attempts, each up to its last checkpoint
    server_buffers: dict = field(default_factory=dict)  # the server optimizer's m (and v)


class Evaluate(Protocol):
    def __call__(self, glob: GlobalState, full: bool = True) -> dict[str, float]:
        """Scores of `glob` on held-out data: on all of it when `full`, else possibly on a
        fixed subset (the scores then carry `<prefix>_examples`)."""
Checkpoint = Callable[[FederationState], None]


def select_clients(plan: RoundPlan, round: int) -> list[int]:
    """All clients, or a seeded sample of `clients_per_round` without replacement."""
    k = plan.clients_per_round or plan.num_clients
    if k >= plan.num_clients:
        return list(range(plan.num_clients))
    rng = np.random.default_rng(derive_seed(plan.seed, "select", round))
    return sorted(int(c) for c in rng.choice(plan.num_clients, size=k, replace=False))


def run_rounds(method: Method, state: FederationState, transport: Transport, plan: RoundPlan,
               evaluate: Evaluate, on_round: Callable[[dict], None] | None = None, *,
               validator: UpdateValidator | None = None,
               checkpoint: Checkpoint | None = None,
               on_center: Callable[[dict], None] | None = None,
               timings: Timings | None = None) -> FederationState:
    """Run rounds `len(state.history)` … `plan.rounds − 1`, mutating and returning `state`.

    Starting from a restored state continues a run exactly where its checkpoint left it.
    `timings`, if given, accumulates the seconds of each phase of every round: download,
    exchange (the transport: local training and the wire), validate, aggregate, evaluate,
    report (the `on_round` callback), checkpoint; `rounds` counts the rounds timed.
    """
    if plan.center_dim and not state.history and not centering.has_center(state.glob):
        gather_center(method, state, transport, plan)
        if on_center:
            on_center(state.center)
    for r in range(len(state.history), plan.rounds):
        start = time.perf_counter()
        lap = Laps(timings)
        selected = select_clients(plan, r)
        downloads = {c: method.download(state.glob, c) for c in selected}
        lap("download")
        exchange = transport.exchange(r, downloads)
        lap("exchange")
        if len(exchange.replies) < plan.min_clients:
            raise FederationError(
                f"round {r + 1}: only {len(exchange.replies)} of {len(selected)} clients answered "
                f"({_failures(exchange)}), fewer than federation.min_clients={plan.min_clients} — "
                "restart the missing sites, or lower federation.min_clients")
        accepted, rejected = _screen_exchange(exchange, downloads, validator, r)
        lap("validate")
        if rejected and plan.on_bad_update == "stop":
            cid, reason = next(iter(rejected.items()))
            raise UpdateRejected(f"round {r + 1}: the update of client {cid} was rejected ({reason}) "
                                 "— federation.on_bad_update='stop' ends the run; set it to 'skip' "
                                 "to go on without that client's update")
        updates = [Update(rep.client, rep.upload, rep.num_examples,
                          aggregation_weight(plan.weighting, rep.client, rep.num_examples,
                                             rep.noise_scale)) for rep in accepted]
        aggregate = method.aggregate(state.glob, updates, r)
        if updates:  # no update, no step: the state (and the buffers) stay as they are
            aggregate, state.server_buffers = server_step(plan.server_optimizer, state.glob,
                                                          aggregate, state.server_buffers)
        state.glob = method.end_round(aggregate, r)
        lap("aggregate")
        for rep in exchange.replies:
            if rep.client in downloads and _is_epsilon(rep.epsilon):  # ε never goes down
                state.epsilon[rep.client] = max(state.epsilon.get(rep.client, 0.0), rep.epsilon)
                state.steps[rep.client] = rep.steps
        state.bytes_uploaded += exchange.bytes_uploaded
        state.bytes_downloaded += exchange.bytes_downloaded
        exhausted = all(rep.refused is not None for rep in exchange.replies)
        last = r == plan.rounds - 1 or exhausted
        lap("report")
        # the last round's scores are the run's result: always on the whole held-out set
        scores = evaluate(state.glob, full=last) if (r + 1) % plan.eval_every == 0 or last else {}
        lap("evaluate")
        record = _record(r, selected, exchange, accepted, rejected, state, scores,
                         time.perf_counter() - start)
        state.history.append(record)
        if on_round:
            on_round(record)
        lap("report")
        if checkpoint and plan.checkpoint_every and ((r + 1) % plan.checkpoint_every == 0 or last):
            checkpoint(state)
        lap("checkpoint")
        if timings is not None:
            timings["rounds"] = timings.get("rounds", 0) + 1
        if exhausted:  # every selected client refused: nobody has budget left
            break
    return state


def gather_center(method: Method, state: FederationState, transport: Transport,
                  plan: RoundPlan) -> None:
    """The DP feature-centring query: μ from the clients' noisy feature sums, into `state.glob`.

    Asked of all clients, or of a seeded sample of `clients_per_round`; answers that fail the
    check are left out and named in `state.center`; with no usable answer μ stays 0 (logged).
    """
    start = time.perf_counter()
    selected = select_clients(plan, centering.SELECTION_TAG)
    # nothing to send: before round 1 the global model is the initial adapter, which every client
    # builds itself from the shared seed
    exchange = transport.ask_center(selected)
    answers, rejected = [], {}
    for rep in exchange.replies:
        if rep.refused is not None or rep.client not in selected:
            continue
        reason = centering.check_answer(rep.upload, plan.center_dim)
        if reason is None:
            answers.append(rep.upload)
        else:
            rejected[str(rep.client)] = reason
        if _is_epsilon(rep.epsilon):
            state.epsilon[rep.client] = max(state.epsilon.get(rep.client, 0.0), rep.epsilon)
    if answers:
        center = centering.center_from(answers)
        state.glob = centering.with_center(state.glob, center)
    state.bytes_uploaded += exchange.bytes_uploaded
    state.bytes_downloaded += exchange.bytes_downloaded
    state.center = {
        "clients": len(answers),
        "examples": round(sum(float(a[centering.COUNT]) for a in answers), 1),
        "norm": float(center.norm()) if answers else None,
        "rejected": rejected,
        "refused": {str(rep.client): rep.refused for rep in exchange.replies if rep.refused},
        "failed": {str(c): why for c, why in exchange.failed.items()},
        "bytes_uploaded": exchange.bytes_uploaded,
        "bytes_downloaded": exchange.bytes_downloaded,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _screen(replies: list[ClientReply], downloads: dict[int, State],
            validator: UpdateValidator | None, r: int) -> tuple[list[ClientReply], dict[str, str]]:
    """The replies that may be aggregated, and {client: reason} for those rejected."""
    accepted, rejected, seen = [], {}, set()
    for rep in replies:
        if rep.refused is not None:
            continue
        if rep.client not in downloads or rep.client in seen:
            reason = "was not asked to train this round" if rep.client not in downloads \
                else "sent more than one update"
        elif validator is not None:
            reason = validator.check(rep.client, rep.upload, rep.num_examples, rep.epsilon,
                                     downloads[rep.client], r)
        else:
            reason = None
        seen.add(rep.client)
        if reason is None:
            accepted.append(rep)
        else:
            rejected[str(rep.client)] = reason
    return accepted, rejected


def _screen_exchange(exchange: Exchange, downloads: dict[int, State],
                     validator: UpdateValidator | None, r: int):
    """`_screen` of the replies, or — under secure aggregation — of the one summed reply: its
    keys, shapes, dtypes, finiteness and (a bound on a mean is a bound on it) norm, checked
    against what any selected client was sent (every client is sent the same shared tensors)."""
    if exchange.secure is None:
        return _screen(exchange.replies, downloads, validator, r)
    if exchange.summed is None:
        return [], {}
    sent = downloads[exchange.secure["sites"][0]]
    accepted, rejected = _screen([exchange.summed], {exchange.summed.client: sent}, validator, r)
    return accepted, {"sum" if k == str(exchange.summed.client) else k: v for k, v in rejected.items()}


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_epsilon(x: object) -> bool:
    return _is_number(x) and not math.isnan(x) and x >= 0


def _record(r, selected, exchange, accepted, rejected, state, scores, seconds) -> dict:
    losses = [rep.train_loss for rep in accepted if _is_number(rep.train_loss)
              and math.isfinite(rep.train_loss)]
    return {
        "round": r + 1,
        **{k: scores.get(k) for k in ("test_accuracy", "test_loss")},
        **{k: v for k, v in scores.items() if k not in ("test_accuracy", "test_loss")},
        # the clients' mean training loss: a local diagnostic the simulation reads in-process;
        # it is not DP-protected, so a real (Flower) server never receives it (None there)
        "local_train_loss": sum(losses) / len(losses) if losses else None,
        "epsilon": max(state.epsilon.values(), default=0.0),
        "epsilon_per_client": [state.epsilon.get(c, 0.0) for c in range(_n(state))],
        "clients": selected,
        "refused": {str(rep.client): rep.refused for rep in exchange.replies if rep.refused},
        "rejected": rejected,
        "failed": {str(c): why for c, why in exchange.failed.items()},
        "bytes_uploaded": exchange.bytes_uploaded,
        "bytes_downloaded": exchange.bytes_downloaded,
        "seconds": round(seconds, 3),
        **({"secure_aggregation": exchange.secure} if exchange.secure is not None else {}),
    }


def _failures(exchange: Exchange) -> str:
    return "; ".join(f"client {c}: {why}" for c, why in sorted(exchange.failed.items())) or "no reason given"


def _n(state: FederationState) -> int:
    return max(state.epsilon, default=-1) + 1
