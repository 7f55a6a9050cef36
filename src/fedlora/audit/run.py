"""`fedlora audit`: one training run with gradient canaries in one client's DP sums, then the
one-run lower bound on that client's ε, written beside the run as `audit.json` and `audit.md`.

Threat model audited: the curious server of docs/privacy.md — it knows the code, the config and
every message, and watches the audited client's uploads; it does not know the client's key
(the canaries' sampling comes from it) or the auditor's coins (which canaries are in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedlora.audit.bound import BETA, ceiling, epsilon_lower_bound
from fedlora.audit.canaries import BREAKS, GradientCanaries, auditor_rng
from fedlora.errors import ConfigError

#: the audited run's optimizer: its updates are then linear in each step's noisy sum
PLAIN_SGD = ["train.optimizer=sgd", "train.momentum=0"]


@dataclass(frozen=True)
class AuditPlan:
    """What the auditor fixes before training: who is audited, m, k₊ and k₋, β, a break."""

    client: int = 0
    canaries: int = 1000
    guesses_in: int = 100
    guesses_out: int = 100
    beta: float = BETA
    broken: str | None = None

    def check(self) -> None:
        if self.canaries < 1:
            raise ConfigError(f"--canaries must be ≥ 1, got {self.canaries}")
        if self.guesses_in < 0 or self.guesses_out < 0 or self.guesses_in + self.guesses_out < 1:
            raise ConfigError("--guesses K_IN,K_OUT must be ≥ 0 each and not both 0, e.g. 100,100")
        if self.guesses_in + self.guesses_out > self.canaries:
            raise ConfigError(f"--guesses {self.guesses_in},{self.guesses_out}: more guesses than "
                              f"the {self.canaries} canaries — lower them or raise --canaries")
        if self.broken is not None and self.broken not in BREAKS:
            raise ConfigError(f"--break must be one of {', '.join(BREAKS)}, got '{self.broken}'")
        if not 0 < self.beta < 1:
            raise ConfigError(f"β must be in (0, 1), got {self.beta}")


class Audit:
    """The `instrument` of `fedlora.run`: draws the canaries once the experiment is built, and
    writes the audit into the run folder after the last round."""

    def __init__(self, plan: AuditPlan, rng=None):
        plan.check()
        self.plan = plan
        self.rng = rng  # the auditor's coins; None: fresh OS entropy (tests pass a seeded one)
        self.canaries: GradientCanaries | None = None
        self.result: dict[str, Any] | None = None

    def attach(self, exp) -> None:
        config, plan = exp.config, self.plan
        if math.isinf(config.privacy.epsilon):
            raise ConfigError("privacy.epsilon = inf: there is no DP guarantee to audit — give a "
                              "finite privacy.epsilon, e.g. 3")
        if not 0 <= plan.client < len(exp.clients):
            raise ConfigError(f"--client {plan.client}: the run has clients 0…{len(exp.clients) - 1}")
        try:
            self.canaries = GradientCanaries.draw(exp.initial, exp.method, plan.client,
                                                  plan.canaries, self.rng or auditor_rng(),
                                                  plan.broken)
        except ValueError as err:
            raise ConfigError(f"--canaries {plan.canaries}: {err} — lower --canaries") from None
        exp.trainer.audit = self.canaries

    def finish(self, folder, summary: dict) -> None:
        self.result = audit_result(self.canaries, self.plan, summary)
        folder.write_json("audit.json", self.result)
        folder.write_text("audit.md", audit_markdown(self.result))


def audit_result(canaries: GradientCanaries, plan: AuditPlan, summary: dict) -> dict[str, Any]:
    """audit.json's content: the claim, the bound, and the canaries' coins and scores (published
    after training, so anyone can recount the guesses)."""
    m, delta = len(canaries.coordinates), float(summary["delta"])
    guess = canaries.guesses(plan.guesses_in, plan.guesses_out)
    r, v = int((guess != 0).sum()), canaries.correct(guess)
    claimed = summary["epsilon_per_client"][plan.client]
    return {
        "kind": "gradient",
        "client": plan.client,
        "epsilon": claimed,
        "epsilon_lower_bound": epsilon_lower_bound(m, r, v, delta, plan.beta),
        "ceiling": ceiling(m, r, delta, plan.beta),
        "canaries": m,
        "included": int(canaries.included.sum()),
        "guesses": r,
        "guesses_in": plan.guesses_in,
        "guesses_out": plan.guesses_out,
        "correct": v,
        "beta": plan.beta,
        "delta": delta,
        "broken": plan.broken,
        "noise": summary.get("noise"),
        "optimizer": "sgd, no momentum",
        "canary_coordinates": [[k, i] for k, i in canaries.coordinates],
        "canary_included": [bool(x) for x in canaries.included],
        "canary_scores": [float(x) for x in canaries.scores],
    }


def audit_markdown(a: dict) -> str:
    broken = (f"\n**The mechanism was broken on purpose (`--break {a['broken']}`)**: the ε above "
              "is what the unbroken one would claim.\n" if a["broken"] else "")
    return "\n".join([
        f"# Privacy audit of client {a['client']} (one run, gradient canaries)",
        "",
        "| claimed ε | audited lower bound ε_lb | ceiling | canaries m | guesses r | correct v | δ | β |",
        "|---|---|---|---|---|---|---|---|",
        f"| {a['epsilon']:.3f} | {a['epsilon_lower_bound']:.3f} | {a['ceiling']:.3f} | {a['canaries']} "
        f"| {a['guesses']} ({a['guesses_in']} in, {a['guesses_out']} out) | {a['correct']} "
        f"| {a['delta']:g} | {a['beta']:g} |",
        broken,
        "ε_lb is a lower bound that holds with probability ≥ 1 − β: a correct mechanism gives "
        "ε_lb ≤ ε, and ε_lb > ε proves the claimed ε false. ε_lb far below ε does not show the "
        "claim is tight: a one-run audit of subsampled DP-SGD is weak, and the ceiling is the most "
        "it could report with these m and r (Steinke, Nasr & Jagielski, NeurIPS 2023).",
        "",
    ])


def audit(config=None, out: str | Path | None = None, overrides: list[str] | None = None,
          plan: AuditPlan = AuditPlan(), progress: Callable[[str], None] | None = print,
          rng=None) -> dict:
    """One audited run; returns audit.json's content (with the run folder under "out")."""
    import fedlora
    from fedlora.config import load_config
    from fedlora.methods import method_class
    from fedlora.methods.base import Method
    from fedlora.outputs import default_out_dir

    instrument = Audit(plan, rng)
    name = (config.method.name if hasattr(config, "method")
            else load_config(config, overrides).method.name)
    if method_class(name).local_optimizer is not Method.local_optimizer:
        raise ConfigError(f"fedlora audit scores plain SGD steps, and method.name '{name}' brings "
                          "its own optimizer — audit another method")
    overrides = list(overrides or []) + PLAIN_SGD
    say = progress or (lambda _: None)
    say("fedlora audit: the audited run trains with plain SGD, no momentum (train.optimizer=sgd, "
        "train.momentum=0), so each update is linear in its noisy sums, as the white-box scores "
        "need")
    resolved = config if hasattr(config, "method") else load_config(config, overrides)
    if out is None:
        out = default_out_dir(f"audit-{resolved.method.name}", resolved.privacy.epsilon)
    summary = fedlora.run(config, out, overrides=overrides, progress=progress, instrument=instrument)
    result = dict(instrument.result)
    say(f"audit of client {result['client']}: ε_lb = {result['epsilon_lower_bound']:.3f} "
        f"(claimed ε = {result['epsilon']:.3f}; ceiling {result['ceiling']:.3f}; "
        f"{result['correct']} of {result['guesses']} guesses right, {result['canaries']} canaries)"
        + (f" — mechanism broken on purpose: {plan.broken}" if plan.broken else ""))
    result["out"] = summary["out"]
    return result
