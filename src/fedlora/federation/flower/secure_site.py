"""A site's side of a secure round: read the legacy instruction, hand its update to SecAgg+.

Under `federation.secure_aggregation` the train instruction arrives as Flower's legacy
`fitins.config` (the record `SecAggPlusWorkflow` forwards), and the reply is a legacy `fitres`:
its parameters — the site's update Δ_k = u_k − s, in the order `SummedUploads.keys` gives — are
weighted, quantised and masked by Flower's `secaggplus_mod` before anything leaves the site, and
its metrics carry only the public facts of `messages.SITE_FIELDS["secure-train"]`. A site that
sits the round out (its terms, its budget) masks zeros with weight 0 and says why; a site whose
update lies beyond the quantisation range raises (secagg.RangeError) and drops out of the round.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from fedlora.federation.flower.messages import TrainInstruction
from fedlora.federation.flower.runconfig import FlowerRun
from fedlora.federation.flower.secagg import Quantisation, RangeError, SummedUploads
from fedlora.federation.flower.site import client_id, site_examples
from fedlora.federation.validate import template_state

log = logging.getLogger("fedlora.site")

SECURE = "fitins.config"


def read_secure_train(record) -> tuple[TrainInstruction, Quantisation]:
    """The instruction and the round's quantisation from a legacy `fitins.config`."""
    instruction = TrainInstruction(int(record["round"]), int(record["client"]),
                                   bytes(record["download"]), json.loads(str(record["label-names"])),
                                   int(record["checkpointed"]), bool(record["full"]))
    q = Quantisation(float(record["secagg-range"]), int(record["secagg-levels"]),
                     int(record["secagg-modulus"]), int(record["secagg-max-weight"]),
                     int(record["secagg-threshold"]), 0)
    return instruction, q


def size_record(node_config: Mapping[str, Any], run: FlowerRun) -> dict:
    """n_k, the number of this site's training examples (public), from its data alone."""
    return {"client": client_id(node_config, run.config),
            "num-examples": len(site_examples(run.config, node_config).train)}


def secure_content(site, reply, instruction: TrainInstruction, q: Quantisation):
    """The legacy train result `secaggplus_mod` masks: Δ_k (or zeros, weight 0, if the site
    refused) and the site's public facts."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    summed = SummedUploads(site.base.method, template_state(site.base.handle, site.base.initial))
    if reply.refused is None:
        try:
            arrays = summed.masked_input(reply.upload, instruction.download(), instruction.round, q)
        except RangeError as err:
            log.error("site %d: %s", site.client.cid, err)
            raise
        weight = reply.num_examples
    else:
        arrays, weight = summed.zeros(instruction.round), 0
    facts = site.facts
    metrics = {"client": facts.client, "num-examples": facts.num_examples,
               "noise-multiplier": float(facts.noise_multiplier),
               "sample-rate": float(facts.sample_rate), "label-names": json.dumps(facts.label_names),
               "epsilon": float(reply.epsilon), "steps": int(reply.steps),
               "refused": reply.refused or ""}
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)
    return fitres_to_recorddict(result, keep_input=False)
