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
    """

    epsilon: float
    delta: float
    clip: float
    sample_rate: float
    noise_multiplier: float
    planned_steps: int
    accountant: PrivacyAccountant = field(repr=False)

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.epsilon)

    def spent(self) -> float:
        return self.accountant.epsilon(self.delta) if self.enabled else math.inf

    def can_take(self, steps: int) -> bool:
        """Would `steps` more steps keep ε within the target?"""
        if not self.enabled:
            return True
        after = self.accountant.epsilon_after(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=steps,
            delta=self.delta,
        )
        return after <= self.epsilon

    def record_step(self) -> None:
        if self.enabled:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)


def plan_client_privacy(
    config: PrivacyConfig, num_examples: int, batch_size: int, planned_steps: int
) -> ClientPrivacy:
    q = min(1.0, batch_size / num_examples)
    if math.isinf(config.epsilon):
        sigma = 0.0
    else:
        sigma = calibrate_noise(config.epsilon, config.delta, q, planned_steps, config.accountant)
    return ClientPrivacy(
        epsilon=config.epsilon,
        delta=config.delta,
        clip=config.clip,
        sample_rate=q,
        noise_multiplier=sigma,
        planned_steps=planned_steps,
        accountant=PrivacyAccountant(config.accountant),
    )
