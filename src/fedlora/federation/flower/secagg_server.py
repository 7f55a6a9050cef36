"""One round's uploads summed by Flower's SecAgg+ workflow: the server gets only their mean.

`secure_round` runs Flower's `SecAggPlusWorkflow` stage by stage — setup (public keys), share
keys (encrypted key shares), collect masked vectors (the sites train here), unmask — over the
run's Grid, with a legacy `Strategy` of ours that hands each site its train instruction and
receives the one unmasked vector Flower reconstructs. Each site's train reply carries, besides
its masked vector, only the public facts of `messages.SITE_FIELDS` (n_k, ε, steps, refusal).

A site that fails or disappears after the key sharing is removed from the sum by Flower (the
others' shares rebuild its masks) as long as every site still has `threshold` live neighbours;
fewer stops the round with a `FederationError` (the run folder stays resumable).

Bytes counted are the payloads of every stage (our download, public keys, encrypted shares,
masked vectors, key shares), as the plain transport counts its payloads; Flower's framing is not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

from fedlora.errors import FederationError
from fedlora.federation.client import ClientReply
from fedlora.federation.flower.messages import SiteFacts
from fedlora.federation.flower.secagg import Quantisation, SummedUploads
from fedlora.federation.server import Exchange
from fedlora.methods.base import State

SUMMED = -1  # the client id of the one reply that stands for the sum
CONFIG = "fitins.config"  # the legacy record a train instruction travels in under SecAgg+


def record_bytes(content) -> int:
    """Payload bytes of a RecordDict: bytes values (and lists of them) of its config records,
    and the data of its arrays."""
    total = 0
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in items if isinstance(v, bytes))
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    return total


class CountingGrid:
    """The run's Grid, counting payload bytes each way and remembering which nodes failed."""

    def __init__(self, grid):
        self.grid = grid
        self.down = self.up = 0
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.down += sum(record_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for rep in replies:
            if rep.has_error():
                self.errors[node_of.get(rep.metadata.reply_to_message_id, -1)] = rep.error.reason
            else:
                self.up += record_bytes(rep.content)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def _strategy_class():
    from flwr.server.strategy import Strategy

    class SumOnly(Strategy):
        """Hands out the prepared train instructions; keeps the one vector Flower unmasked and
        the sites' public facts. `aggregate_fit` is the only server code that sees a result, and
        it sees the sum (every result's parameters are the same unmasked mean)."""

        def __init__(self, instructions):
            self.instructions = instructions  # [(proxy, FitIns)]
            self.mean = None
            self.results = []

        def configure_fit(self, server_round, parameters, client_manager):
            return self.instructions

        def aggregate_fit(self, server_round, results, failures):
            from flwr.common import parameters_to_ndarrays

            self.results = [(proxy.node_id, res) for proxy, res in results]
            if results:
                self.mean = parameters_to_ndarrays(results[0][1].parameters)
            return None, {}

        def initialize_parameters(self, client_manager):
            return None

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return SumOnly


@dataclass
class SecureRound:
    """What one secure round needs from the transport."""

    round: int
    downloads: dict[int, State]
    records: dict[int, dict]  # client → its train instruction (`messages.train_record`)
    nodes: dict[int, int]  # client → Flower node
    sizes: dict[int, int]  # client → n_k
    summed: SummedUploads
    max_update_norm: float
    timeout: float
    say: Callable[[str], None]
    failed: dict[int, str] = field(default_factory=dict)
    facts: dict[int, SiteFacts] = field(default_factory=dict)  # updated from the replies


def secure_round(grid, job: SecureRound) -> Exchange:
    """Run SecAgg+ for `job.round` over `grid`: per-site replies without uploads, and the
    one summed reply (client `SUMMED`) whose upload is the weighted mean of the uploads."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, Parameters
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    clients = [c for c in sorted(job.records) if c in job.nodes]
    q = Quantisation.choose(job.max_update_norm, [job.sizes[c] for c in clients])
    counted = CountingGrid(grid)
    instructions = [(GridClientProxy(job.nodes[c], counted, 0),
                     FitIns(Parameters([], ""), {**_flat(job.records[c]), **_prefixed(q.config())}))
                    for c in clients]
    strategy = _strategy_class()(instructions)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: job.round + 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(q.sites, q.threshold, max_weight=float(q.max_weight),
                                  clipping_range=q.range, quantization_range=q.levels,
                                  modulus_range=q.modulus, timeout=job.timeout)
    state = WorkflowState()
    stages = (("setup", workflow.setup_stage), ("key sharing", workflow.share_keys_stage),
              ("masked-vector collection", workflow.collect_masked_vectors_stage),
              ("unmasking", workflow.unmask_stage))
    what = f"round {job.round + 1}"
    for name, stage in stages:
        if not stage(counted, context, state):
            live = len(state.active_node_ids)
            raise FederationError(
                f"{what}: secure aggregation stopped in its {name} stage — {live} of {q.sites} "
                f"sites still answer, and each site needs {q.threshold} live neighbours (the "
                f"reconstruction threshold) to rebuild the masks ({_errors(counted, job.nodes)}); "
                "restart the missing SuperNodes and resume the run")
        job.say(f"{what}: secure aggregation, {name} done ({len(state.active_node_ids)} of "
                f"{q.sites} sites)")
    return _exchange(job, strategy, counted, q, clients)


def _exchange(job: SecureRound, strategy, counted: CountingGrid, q: Quantisation,
              clients: list[int]) -> Exchange:
    """The round's Exchange from what the workflow left: per-site facts, the sum, failures."""
    client_of = {job.nodes[c]: c for c in clients}
    replies, in_sum = [], []
    for node, res in strategy.results:
        cid = client_of[node]
        reply, job.facts[cid] = _site_reply(cid, res)
        replies.append(reply)
        if reply.refused is None:
            in_sum.append(cid)
    failed = dict(job.failed)
    for c in clients:
        if c not in {r.client for r in replies}:
            failed[c] = counted.errors.get(job.nodes[c], "dropped out of the secure aggregation")
    for cid, why in sorted(failed.items()):
        job.say(f"round {job.round + 1}: client {cid} dropped out — {why}")
    replies.sort(key=lambda r: r.client)
    in_sum.sort()
    summed = None
    if in_sum and strategy.mean is not None:
        sent = job.downloads[in_sum[0]]  # every site was sent the same shared tensors
        total = sum(job.sizes[c] for c in in_sum)
        summed = ClientReply(SUMMED, job.summed.summed_state(strategy.mean[:], sent, job.round),
                             total, 0.0, 0, math.nan)
    secure = {"sites": in_sum, "threshold": q.threshold, "range": q.range, "levels": q.levels,
              "modulus": q.modulus, "max_weight": q.max_weight,
              "bound": q.bound([job.sizes[c] for c in in_sum]) if in_sum else None}
    return Exchange(replies, counted.down, counted.up, failed, summed=summed, secure=secure)


def _site_reply(cid: int, res) -> tuple[ClientReply, SiteFacts]:
    """A site's public facts from its legacy train result (its parameters are the sum's)."""
    m = res.metrics
    if int(m["client"]) != cid:
        raise FederationError(f"node of client {cid} answered as client {m['client']}")
    facts = SiteFacts(cid, int(m["num-examples"]), float(m["noise-multiplier"]),
                      float(m["sample-rate"]), json.loads(str(m["label-names"])))
    return ClientReply(client=cid, upload={}, num_examples=facts.num_examples,
                       epsilon=float(m["epsilon"]), steps=int(m["steps"]), train_loss=math.nan,
                       refused=str(m["refused"]) or None), facts


def _flat(record: dict) -> dict:
    """A train record as legacy config values (scalars only): lists travel as JSON text."""
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()}


def _prefixed(values: dict) -> dict:
    return {f"secagg-{k}": v for k, v in values.items()}


def _errors(counted: CountingGrid, nodes: dict[int, int]) -> str:
    client_of = {n: c for c, n in nodes.items()}
    parts = [f"client {client_of.get(n, n)}: {why}" for n, why in sorted(counted.errors.items())]
    return "; ".join(parts) or "no site reported an error: they stopped answering"
