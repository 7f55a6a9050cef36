"""White-box gradient canaries: what a curious server could learn about one example.

Each canary j is a Dirac "gradient" g_j = G·e_{c_j} on one coordinate c_j of a tensor the audited
client trains and uploads (a LoRA B entry for FFA-LoRA), with raw norm G = 10·C so that clipping
is what brings it to C. The auditor includes each canary with probability ½ (its own coins,
never the client's key); at every DP-SGD step of the audited client each included canary joins
the batch independently with the client's Poisson rate q (drawn from the client's secret
"canary" stream, so the auditor does not know when), is clipped like an example and added to
the clipped sum before the noise: exactly an example whose gradient is g_j.

With plain SGD (no momentum) a round's change of the uploaded tensor is −η·Σ_steps g̃/B̄, linear
in each step's noisy sum, so the server's best score for canary j is the summed descent along
e_{c_j}: s_j = −Σ_rounds (upload − download)[c_j]. The auditor guesses "in" for the k₊ highest
scores and "out" for the k₋ lowest (k₊, k₋ fixed before training) and counts the right guesses.

`broken` deliberately breaks the audited client's mechanism, for testing the audit only:
`noise` adds no noise, `sigma/10` a tenth of it, `clip` clips nothing (canaries and examples).
The ε printed stays the unbroken one, so a working audit must catch each.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fedlora.methods import keys as state_keys
from fedlora.methods.base import Method, State
from fedlora.privacy.dpsgd import clip_factors
from fedlora.privacy.randomness import Stream

BREAKS = ("noise", "sigma/10", "clip")
RAW_NORM = 10.0  # canary gradient norm in units of C before clipping


def auditor_rng() -> np.random.Generator:
    """The auditor's own coins (OS entropy): unknown to the client, the server and the seed."""
    return np.random.default_rng(secrets.randbits(128))


def candidate_coordinates(state: State, method: Method,
                          client: int | None = None) -> list[tuple[str, int]]:
    """Keys (with their sizes) the server sees move: trained (by `client`, where clients train
    different tensors: mole's own expert) and uploaded from round 1 on.
    LoRA B entries when the method trains B (FFA-LoRA's only adapter factor), else any."""
    trains = (lambda k: method.trainable(k, 0)) if client is None \
        else (lambda k: method.client_trains(k, 0, client))  # noqa: E731
    seen = [k for k in sorted(state) if trains(k) and method.communicated(k)
            and not state_keys.is_statistic(k)]
    b = [k for k in seen if state_keys.is_lora_b(k)]
    return [(k, state[k].numel()) for k in (b or seen)]


@dataclass
class GradientCanaries:
    """m Dirac canaries in client `client`'s DP sums; `scores` fills in as rounds are observed."""

    client: int
    coordinates: list[tuple[str, int]]  # (state key, flat index), distinct
    included: np.ndarray                # bool, shape (m,): the auditor's secret coins
    broken: str | None = None
    scores: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.broken is not None and self.broken not in BREAKS:
            raise ValueError(f"broken must be one of {', '.join(BREAKS)}, got {self.broken!r}")
        self.scores = np.zeros(len(self.coordinates))

    @classmethod
    def draw(cls, state: State, method: Method, client: int, m: int,
             rng: np.random.Generator, broken: str | None = None) -> "GradientCanaries":
        """m distinct coordinates at random among `candidate_coordinates`, each included with
        probability ½, all from the auditor's `rng`."""
        pool = candidate_coordinates(state, method, client)
        total = sum(n for _, n in pool)
        if m > total:
            raise ValueError(f"{m} canaries but only {total} trained coordinates")
        flat = np.sort(rng.choice(total, size=m, replace=False))
        starts = np.cumsum([0] + [n for _, n in pool])
        coordinates = []
        for position in flat:
            t = int(np.searchsorted(starts, position, side="right")) - 1
            coordinates.append((pool[t][0], int(position - starts[t])))
        return cls(client, coordinates, rng.random(m) < 0.5, broken)

    # -------------------------------------------------------------- inside the client's step
    @property
    def noise_scale(self) -> float:
        """The factor the audited client's noise std is multiplied by (1 unless broken)."""
        return {"noise": 0.0, "sigma/10": 0.1}.get(self.broken, 1.0)

    def clip(self, clip: float) -> float:
        """The clip bound the audited client really applies (∞ when `clip` is broken)."""
        return math.inf if self.broken == "clip" else clip

    def add(self, summed: dict[str, Tensor], names: dict[str, str], rate: float, clip: float,
            stream: Stream) -> int:
        """Add every sampled included canary's clipped gradient to `summed` (parameter name →
        Σ clipped example gradients; `clip` the configured C); returns how many were added. One uniform per canary per
        step (included or not) keeps the stream's use independent of the coins."""
        u = stream.uniform(len(self.coordinates)).numpy()
        sampled = self.included & (u < rate)
        raw = torch.tensor([RAW_NORM * clip], dtype=torch.float64)
        value = float(raw * clip_factors(raw, self.clip(clip)))  # clipped as an example is
        added = 0
        for j in np.flatnonzero(sampled):
            key, index = self.coordinates[j]
            name = names.get(key)
            if name in summed:  # the tensor is trained this round (RoLoRA alternates)
                summed[name].view(-1)[index] += value
                added += 1
        return added

    # -------------------------------------------------------------- what the server sees
    def observe(self, before: State, after: State) -> None:
        """Add one round's −(after − before) at each canary's coordinate to its score."""
        for j, (key, index) in enumerate(self.coordinates):
            if key in before and key in after:
                self.scores[j] -= float(after[key].reshape(-1)[index].double()
                                        - before[key].reshape(-1)[index].double())

    def guesses(self, k_in: int, k_out: int) -> np.ndarray:
        """+1 ("in") for the k_in highest scores, −1 for the k_out lowest, 0 (abstain) else."""
        m = len(self.coordinates)
        if k_in + k_out > m:
            raise ValueError(f"{k_in} + {k_out} guesses for {m} canaries")
        order = np.argsort(self.scores, kind="stable")
        guess = np.zeros(m, dtype=int)
        guess[order[m - k_in:]] = 1
        guess[order[:k_out]] = -1
        return guess

    def correct(self, guess: np.ndarray) -> int:
        truth = np.where(self.included, 1, -1)
        return int(((guess != 0) & (guess == truth)).sum())
