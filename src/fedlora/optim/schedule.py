"""The local learning rate's schedule over the rounds of a run (`train.lr_schedule`).

A client builds a new optimizer every round; the schedule scales that round's rates (`train.lr`
and `train.head_lr` alike) by a factor of the round alone, so every client and every optimizer
(Adam, SGD, LoRA-Pro, LoRA-RITE, GaLore) follows it, and a resumed run picks it up where it
stopped. It is a public function of the round: no ε cost.

With rounds indexed r = 0…R−1 as the server counts them (R = `federation.rounds`):

- ``constant``: f(r) = 1.
- ``cosine``: f(r) = ½·(1 + cos(π·r/R)): 1 in the first round, falling to
  ½·(1 + cos(π·(R − 1)/R)) > 0 in the last, so no round is spent at rate 0.
"""

from __future__ import annotations

import math

from fedlora.config import SCHEDULES


def lr_factor(schedule: str, round: int, rounds: int) -> float:
    """The factor on the learning rates of round index `round` (0-based) of `rounds`."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * round / rounds))
    raise ValueError(f"unknown learning-rate schedule '{schedule}'; one of {', '.join(SCHEDULES)}")
