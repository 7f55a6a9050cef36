"""σ for a privacy budget: the smallest noise multiplier whose steps stay within ε at δ.

A plain bracket-and-bisect on σ, with ε from `fedlora.privacy.epsilon`:

* bracket: σ_hi = 20, 40, 80, … until ε(σ_hi) ≤ ε_target. Near the smallest ε the conversion
  can certify, ε(σ) flattens out (≈ floor + c/σ²) and each evaluation at huge σ is slow, so
  when doubling σ lowers ε by less than 0.5 % while ε is still above target, or σ passes 10⁶,
  the target is declared unreachable (`ConfigError`);
* bisect on [0, σ_hi]: the midpoint replaces σ_hi when its ε is below target, σ_lo otherwise,
  until ε(σ_hi) is within min(0.01, ε/200) of the target; σ_hi is the answer. (This is the
  search Opacus's `get_noise_multiplier` runs, so σ is what fedlora always calibrated.) A
  PRV ε that jumps across the target by more than the tolerance could keep the bisection
  going: after 200 evaluations the smallest σ seen within budget is taken;
* check: a fresh `PrivacyAccountant` (prior mechanisms, then the steps) must give ε ≤ target;
  σ is raised by 0.1 % steps until it does. ε is never under-reported.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

from fedlora.errors import ConfigError
from fedlora.privacy.epsilon import (_PRV_EPS_ERROR, RDP_ORDERS, History, _check_delta, _check_kind,
                                     _check_sample_rate, _check_steps, _epsilon, _real)

TOLERANCE = 0.01  # ε tolerance of the σ search: min(0.01, 0.5 % of ε)
MAX_EVALUATIONS = 200
FIRST_SIGMA = 20.0
MAX_SIGMA = 1e6


class _Unreachable(Exception):
    pass


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
    prior: History = (),
) -> float:
    """The smallest noise multiplier σ (up to an ε tolerance of min(0.01, ε/200)) such that `steps`
    Poisson-subsampled Gaussian steps at `sample_rate` give ε ≤ `epsilon` at `delta`.

    `prior`: `(σ, q, steps)` mechanisms the client runs before those steps (e.g. the DP feature
    statistics of `fedlora.federation.centering`); the budget is for their composition with
    the DP-SGD steps, so σ comes out a little larger than without them.
    Targets no σ can reach raise `ConfigError`. `epsilon = inf` means no privacy: σ = 0.
    Cached (PRV calibration takes seconds).
    """
    _check_kind(accountant)
    if not _real(epsilon) > 0:
        raise ConfigError(f"epsilon must be > 0 (or inf for no privacy), got {epsilon!r}")
    delta = _check_delta(delta)
    sample_rate = _check_sample_rate(sample_rate)
    steps = _check_steps(steps, minimum=1)
    if math.isinf(epsilon):
        return 0.0
    epsilon = _real(epsilon)
    # Below what RDP can certify with any σ: hopeless. PRV's bound carries +eps_error (0.01),
    # so for it only targets below both are rejected up front.
    floor = _rdp_floor(delta) if accountant == "rdp" else min(_rdp_floor(delta), _PRV_EPS_ERROR / 2)
    if epsilon <= floor:
        raise _unreachable(epsilon, delta, sample_rate, steps)
    prior = tuple((float(s), float(q), int(n)) for s, q, n in prior)

    def eps_of(sigma: float) -> float:
        return _epsilon(accountant, prior + ((sigma, sample_rate, steps),), delta)

    try:
        sigma = smallest_sigma(eps_of, epsilon, min(TOLERANCE, 0.005 * epsilon))
    except _Unreachable:
        raise _unreachable(epsilon, delta, sample_rate, steps) from None
    return _verified(sigma, epsilon, delta, sample_rate, steps, accountant, prior)


def smallest_sigma(eps_of: Callable[[float], float], target: float, tolerance: float) -> float:
    """Bracket, then bisect (see the module docstring); raises `_Unreachable`."""
    evaluations = 0
    best = math.inf  # the smallest σ seen with ε ≤ target

    def evaluate(sigma: float) -> float:
        nonlocal evaluations, best
        evaluations += 1
        eps = eps_of(sigma)
        if eps <= target:
            best = min(best, sigma)
        return eps

    hi, eps_hi = FIRST_SIGMA, evaluate(FIRST_SIGMA)
    while eps_hi > target:
        if 2 * hi > MAX_SIGMA:
            raise _Unreachable
        previous, hi = eps_hi, 2 * hi
        eps_hi = evaluate(hi)
        if eps_hi > target and eps_hi > 0.995 * previous:  # flat: no σ will do
            raise _Unreachable
    lo = 0.0
    while target - eps_hi > tolerance:
        if evaluations >= MAX_EVALUATIONS:
            return best
        mid = (lo + hi) / 2
        eps = evaluate(mid)
        if eps < target:
            hi, eps_hi = mid, eps
        else:
            lo = mid
    return hi


def _rdp_floor(delta: float) -> float:
    """The smallest ε the RDP conversion can certify at δ with any σ (RDP = 0 at every order)."""
    return min(-(math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in RDP_ORDERS)


def _unreachable(epsilon: float, delta: float, q: float, steps: int) -> ConfigError:
    return ConfigError(
        f"epsilon={epsilon:g} at delta={delta:g} cannot be reached with {steps} steps at sample "
        f"rate {q:g} with any noise multiplier; raise epsilon or delta, take fewer "
        "steps, or lower the sample rate"
    )


def _verified(sigma: float, epsilon: float, delta: float, q: float, steps: int, kind: str,
              prior: History = ()) -> float:
    """Raise σ by 0.1 % steps until a fresh `PrivacyAccountant` (prior mechanisms, then the
    steps) gives ε ≤ epsilon."""
    from fedlora.privacy.accountant import PrivacyAccountant

    for _ in range(1000):
        if math.isfinite(sigma):
            fresh = PrivacyAccountant(kind)
            for s, pq, n in prior:
                fresh.step(noise_multiplier=s, sample_rate=pq, steps=n)
            fresh.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
            if fresh.epsilon(delta) <= epsilon:
                return sigma
        sigma *= 1.001
    raise RuntimeError(f"noise calibration failed for ε={epsilon}, δ={delta}, q={q}, steps={steps}")
