"""Each client's DP-SGD parameters: sampling rate, calibrated noise, and its accountant."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedlora.config import PrivacyConfig
from fedlora.privacy.accountant import PrivacyAccountant, calibrate_noise


@dataclass
class ClientPrivacy:
    """Sample-level DP-SGD for one client.

    q = min(1, B/n) (Poisson sampling with expected batch B out of the client's n examples);
    σ is calibrated so that `planned_steps` steps at q give ε ≤ target at δ; the accountant
    composes every step the client actually takes, over all rounds.

    With feature centring (`center_rate` > 0) the client also answers, once, a Gaussian query
    on a Poisson sample of its features at rate `center_rate` with noise multiplier
    `center_noise`; σ is calibrated for that query composed with all the DP-SGD steps.
    """

    epsilon: float
    delta: float
    clip: float
    sample_rate: float
    noise_multiplier: float
    planned_steps: int
    accountant: PrivacyAccountant = field(repr=False)
    center_rate: float = 0.0  # 0: no feature-centring query planned
    center_noise: float = 0.0
    # What the client spent on the same data before this run (a Flower site's ledger is per
    # data set: `[(σ, q, steps), ...]` of its other runs), and the cap on everything together
    # (None: `epsilon`). Both count in `spent` and in every budget check.
    prior: tuple = ()
    budget: float | None = None

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.epsilon)

    def total(self, accountant: PrivacyAccountant | None = None) -> PrivacyAccountant:
        """`accountant` (default: this run's) composed after the prior spending."""
        accountant = accountant or self.accountant
        if not self.prior:
            return accountant
        both = PrivacyAccountant(accountant.kind)
        both.load_state_dict({"kind": accountant.kind,
                              "history": [list(e) for e in (*self.prior, *accountant.history)]})
        return both

    def spent(self) -> float:
        return self.total().epsilon(self.delta) if self.enabled else math.inf

    def _fits(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        if not self.enabled:
            return True
        after = self.total().epsilon_after(noise_multiplier=noise_multiplier,
                                           sample_rate=sample_rate, steps=steps, delta=self.delta)
        return after <= (self.budget if self.budget is not None else self.epsilon)

    def can_take(self, steps: int) -> bool:
        """Would `steps` more steps keep ε (prior spending included) within the budget?"""
        return self._fits(self.noise_multiplier, self.sample_rate, steps)

    def record_step(self) -> None:
        if self.enabled:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def can_answer_center_query(self) -> bool:
        return self._fits(self.center_noise, self.center_rate, 1)

    def record_center_query(self) -> None:
        if self.enabled:
            self.accountant.step(noise_multiplier=self.center_noise, sample_rate=self.center_rate)


def plan_client_privacy(
    config: PrivacyConfig, num_examples: int, batch_size: int, planned_steps: int,
    center_examples: int = 0,
) -> ClientPrivacy:
    """`center_examples` > 0: plan the feature-centring query too, on an expected
    `center_examples` of the client's examples (rate min(1, m/n))."""
    q = min(1.0, batch_size / num_examples)
    center_rate = min(1.0, center_examples / num_examples) if center_examples > 0 else 0.0
    if math.isinf(config.epsilon):
        sigma, center_noise = 0.0, 0.0
    else:
        center_noise = config.center_noise if center_rate > 0 else 0.0
        prior = ((center_noise, center_rate, 1),) if center_rate > 0 else ()
        sigma = calibrate_noise(config.epsilon, config.delta, q, planned_steps, config.accountant,
                                prior)
    return ClientPrivacy(
        epsilon=config.epsilon,
        delta=config.delta,
        clip=config.clip,
        sample_rate=q,
        noise_multiplier=sigma,
        planned_steps=planned_steps,
        accountant=PrivacyAccountant(config.accountant),
        center_rate=center_rate,
        center_noise=center_noise,
    )
