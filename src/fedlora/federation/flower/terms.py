"""A site's own privacy terms, from its node config: the server may ask for less, never more.

On Flower the run config — ε, δ, the clip, the noise source — is written by the server. A site
that took it on trust would let the server set its privacy (ε = inf, or seeded noise it can
regenerate). So a site may fix its terms in its own node config:

    flower-supernode ... --node-config 'state-dir="/var/lib/fedlora" epsilon=3.0 delta=1e-5 clip=1.0'

* `epsilon`: the most this site spends on its data, over every run ever (its ledger is per data
  set: `sitestate.SpentBook`). A run asking for a larger ε (or none: inf) is refused. Without
  it, the run's own ε bounds the site's total spending on that data.
* `delta`: a run asking for a larger δ is refused.
* `clip`: a run must use exactly this per-example clip.
* `allow-seeded-noise`: false by default. `privacy.noise = "seeded"` derives the DP noise from
  the run's seed, which the server knows: the site refuses such a run unless this is true.
* `share-evaluation`: false by default. Personalised methods score each site's own model on its
  own held-out examples; those scores are not DP-protected, so by default they stay in the
  site's log and the server gets none. True sends them (outside ε; see docs/privacy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from fedlora.config import Config
from fedlora.errors import ConfigError

TERM_KEYS = ("epsilon", "delta", "clip", "allow-seeded-noise", "share-evaluation")


@dataclass(frozen=True)
class SiteTerms:
    epsilon: float | None = None
    delta: float | None = None
    clip: float | None = None
    allow_seeded_noise: bool = False
    share_evaluation: bool = False

    @classmethod
    def read(cls, node_config: Mapping[str, Any]) -> "SiteTerms":
        values = {}
        for key in ("epsilon", "delta", "clip"):
            if key in node_config:
                v = node_config[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                        or (key != "epsilon" and not math.isfinite(v)):
                    raise ConfigError(f"node config: {key}={v!r} must be a positive number, e.g. "
                                      f"{key}={ {'epsilon': 3.0, 'delta': 1e-5, 'clip': 1.0}[key]}")
                values[key] = float(v)
        if values.get("delta", 0) >= 1:
            raise ConfigError("node config: delta must be below 1, e.g. delta=1e-5")
        for key in ("allow-seeded-noise", "share-evaluation"):
            if key in node_config and not isinstance(node_config[key], bool):
                raise ConfigError(f"node config: {key}={node_config[key]!r} must be true or false")
        return cls(values.get("epsilon"), values.get("delta"), values.get("clip"),
                   bool(node_config.get("allow-seeded-noise", False)),
                   bool(node_config.get("share-evaluation", False)))

    def refusal(self, config: Config) -> str | None:
        """Why this site will not train for a run with `config` (None: it will)."""
        p = config.privacy
        if p.noise == "seeded" and not self.allow_seeded_noise:
            return ("the run asks for privacy.noise=seeded: its DP noise would come from the run's "
                    "seed, which the server knows and could subtract — this site draws its noise "
                    "from its own secret key and refuses (for research, its node config may say "
                    "allow-seeded-noise=true)")
        if self.epsilon is not None and not p.epsilon <= self.epsilon:
            return (f"the run asks for privacy.epsilon={p.epsilon:g}, more than this site allows "
                    f"on its data (epsilon={self.epsilon:g} in its node config) — run with "
                    f"privacy.epsilon ≤ {self.epsilon:g}")
        if self.delta is not None and not p.delta <= self.delta:
            return (f"the run asks for privacy.delta={p.delta:g}, more than this site allows "
                    f"(delta={self.delta:g} in its node config) — run with privacy.delta ≤ "
                    f"{self.delta:g}")
        if self.clip is not None and p.clip != self.clip:
            return (f"the run asks for privacy.clip={p.clip:g}, this site trains only with "
                    f"clip={self.clip:g} (its node config) — run with privacy.clip={self.clip:g}")
        return None

    def budget(self, config: Config) -> float:
        """The most this site may have spent on its data, over all runs, after any release."""
        return self.epsilon if self.epsilon is not None else config.privacy.epsilon
