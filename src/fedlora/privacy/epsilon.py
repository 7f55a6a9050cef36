"""ε of a history of Poisson-subsampled Gaussian steps: the maths, without state.

The accountant's state (its history) is `fedlora.privacy.accountant.PrivacyAccountant`; the
σ calibration is `fedlora.privacy.calibration`.

Rényi DP (kind "rdp", the default) and the PRV accountant (kind "prv": numerical composition
of privacy-loss random variables, tighter) are Opacus's; kind "pld" is Google's
`dp_accounting` privacy-loss-distribution accountant (also numerical, `_pld_epsilon`). We call the
functions `RDPAccountant` and `PRVAccountant.get_epsilon` are made of (`compute_rdp`,
`get_privacy_spent`; `PoissonSubsampledGaussianPRV`, `discretize`, `compose_heterogeneous`)
rather than the classes, for one reason: speed. RDP of one step at each order depends only
on (σ, q), a client keeps the same (σ, q) for all its steps, and RDP composes by addition,
so that curve is computed once and cached; the classes recompute it on every call (PRV's
grid sizing alone computes it twice more), which made one PRV ε take ~1 s and calibration
~10 s. `tests/test_accountant.py` checks both kinds equal the Opacus classes' numbers.

On top: input checks (`ConfigError`), a compact JSON-friendly history, caching, and:

* RDP orders: Opacus's default orders (1.1 … 63) plus 128, 256, 512, 1024, the orders
  `dp_accounting` uses too. Larger orders make small ε reachable (at δ=1e-5 the default
  orders cannot certify ε below ≈ 0.1 however much noise is added).
* PRV robustness: Opacus's PRV accountant discretises the privacy loss on a grid whose size
  grows with the number of steps and with ε (it took minutes for 10⁵ steps, and forever for
  tiny σ), it raises for some settings (σ = 0, very small δ, "Cannot compute epsilon"), and
  its safe-domain computation is only trusted for `eps_error < 1`; for grids wider than
  t ≈ 709 its exp(t) overflows and it silently returns ε ≈ 709.8 whatever the truth.
  `epsilon` therefore (1) widens `eps_error` beyond 0.01 only as much as needed to keep
  the grid at most `_PRV_MAX_POINTS` points, (2) falls back to the RDP bound when that would
  need `eps_error > 0.5`, when the grid's half-width exceeds 700, when numpy reports an
  overflow/NaN, or when Opacus raises, and (3) returns min(PRV bound, RDP bound) — both are
  valid upper bounds on ε, so the minimum is too. ε is never under-reported.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Any

import numpy as np

from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedlora.config import ACCOUNTANTS
from fedlora.errors import ConfigError

KINDS = ACCOUNTANTS  # declared once, with the option (config.py imports no torch/opacus)

_OPACUS_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
#: RDP orders: Opacus's defaults plus the large orders dp_accounting also uses.
RDP_ORDERS: tuple[float, ...] = _OPACUS_ORDERS + (128, 256, 512, 1024)

_PRV_EPS_ERROR = 0.01  # Opacus's default; the PRV bound is at most this much above the truth.
_PRV_MAX_EPS_ERROR = 0.5  # Opacus's domain-size heuristic is only trusted for eps_error < 1.
_PRV_MAX_POINTS = 1_000_000  # grid points (≈1 s of FFT on a laptop core)
_PRV_MAX_HALF_WIDTH = 700.0  # Opacus evaluates exp(±t) on the grid: overflows past t ≈ 709

History = tuple[tuple[float, float, int], ...]  # (noise_multiplier, sample_rate, steps)


# --------------------------------------------------------------------------- validation


def _real(x: Any) -> float:
    """`x` as a float if it is a real number (not a bool), else NaN (which fails every check)."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    return math.nan


def _check_delta(delta: float) -> float:
    if not 0.0 < _real(delta) < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return _real(delta)


def _check_sample_rate(sample_rate: float) -> float:
    if not 0.0 < _real(sample_rate) <= 1.0:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return _real(sample_rate)


def _check_noise(noise_multiplier: float) -> float:
    if not 0.0 <= _real(noise_multiplier) < math.inf:
        raise ConfigError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    return _real(noise_multiplier)


def _check_steps(steps: int, minimum: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < minimum:
        raise ConfigError(f"steps must be an integer >= {minimum}, got {steps!r}")
    return int(steps)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"unknown privacy accountant {kind!r}; valid kinds: {', '.join(KINDS)}")
    return kind


# --------------------------------------------------------------------------- epsilon


def _append(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """History with `steps` more steps at (σ, q), merged into the last entry if it matches."""
    if steps == 0:
        return history
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        sigma, q, n = history[-1]
        return history[:-1] + ((sigma, q, n + steps),)
    return history + ((noise_multiplier, sample_rate, steps),)


@functools.lru_cache(maxsize=1024)
def _rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at every order in `RDP_ORDERS` (Opacus's `compute_rdp`).

    RDP composes by addition and does not depend on δ, so this is all the RDP work there is
    for a history: a client keeps the same (σ, q), and the curve is computed once.
    """
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                  orders=list(RDP_ORDERS)), dtype=float)


def _rdp_to_epsilon(rdp: np.ndarray, orders: tuple[float, ...], delta: float) -> float:
    """Opacus's RDP → (ε, δ) conversion (`get_privacy_spent`), minimised over `orders`."""
    with warnings.catch_warnings():  # "Optimal order is the largest alpha": harmless, noisy
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp[: len(orders)], delta=delta)
    return float(eps)


def _history_rdp(history: History) -> np.ndarray:
    return sum(n * _rdp_curve(sigma, q) for sigma, q, n in history)


def _rdp_epsilon(history: History, delta: float) -> float:
    """ε at δ by RDP over `RDP_ORDERS`: exactly `RDPAccountant.get_epsilon(delta, alphas=...)`."""
    return _rdp_to_epsilon(_history_rdp(history), RDP_ORDERS, delta)


def _prv_half_width(history: History, eps_error: float, delta_error: float) -> float:
    """Opacus's `compute_safe_domain_size` (an RDP bound over Opacus's default orders), from
    the cached RDP curves instead of three fresh RDP computations."""
    total = sum(n for _, _, n in history)
    width = _rdp_to_epsilon(_history_rdp(history), _OPACUS_ORDERS, delta_error / 4)
    for sigma, q, _ in history:
        width = max(width, _rdp_to_epsilon(_rdp_curve(sigma, q), _OPACUS_ORDERS,
                                           delta_error / (8 * total)))
    return max(width, eps_error) + 3


def _prv_mesh(history: History, eps_error: float, delta_error: float) -> float:
    """Opacus's grid spacing: eps_error / sqrt(T·log(12/δ_err)/2), T = total steps."""
    total = sum(n for _, _, n in history)
    return eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)


def _prv_eps_error(history: History, delta_error: float) -> float | None:
    """The smallest eps_error ≥ 0.01 whose PRV grid has ≤ `_PRV_MAX_POINTS` points, or None
    (the grid would need eps_error > 0.5, or reach past t = 700 where exp(t) overflows)."""
    half_width = _prv_half_width(history, _PRV_MAX_EPS_ERROR, delta_error)  # an upper bound
    if not half_width < _PRV_MAX_HALF_WIDTH:
        return None
    points_at_unit_error = 2 * half_width / _prv_mesh(history, 1.0, delta_error)
    eps_error = max(_PRV_EPS_ERROR, points_at_unit_error / _PRV_MAX_POINTS)
    return eps_error if eps_error <= _PRV_MAX_EPS_ERROR else None


def _prv_upper_bound(history: History, delta: float, eps_error: float, delta_error: float) -> float:
    """Opacus's PRV accountant, step by step as `PRVAccountant.get_epsilon` (Opacus 1.6) does
    it — discretise each (σ, q) PRV on a common grid, FFT-compose, read off ε's upper bound —
    but with the grid's half-width from the cached RDP curves (`_prv_half_width`)."""
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [n for _, _, n in history]
    half_width = _prv_half_width(history, eps_error, delta_error)
    domain = Domain.create_aligned(-half_width, half_width, _prv_mesh(history, eps_error, delta_error))
    dprvs = [discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max), domain)
             for prv in prvs]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
    _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(eps_upper)


def _prv_epsilon(history: History, delta: float) -> float:
    """min(PRV upper bound, RDP bound); the RDP bound alone where PRV is impractical."""
    rdp = _rdp_epsilon(history, delta)
    if not rdp > _PRV_EPS_ERROR:  # inf, or so small that PRV's +eps_error cannot beat it
        return rdp
    delta_error = delta / 1000  # Opacus's default
    try:
        eps_error = _prv_eps_error(history, delta_error)
        if eps_error is None:
            return rdp
        # Overflow / NaN inside Opacus's PRV code means its number is garbage (it reported
        # ε = 709.8, i.e. log(max float), where the truth was > 1000): use RDP instead.
        with np.errstate(over="raise", invalid="raise", divide="ignore"):
            prv = _prv_upper_bound(history, delta, eps_error, delta_error)
    except (ValueError, RuntimeError, OverflowError, FloatingPointError, MemoryError):
        return rdp
    return max(0.0, min(prv, rdp)) if math.isfinite(prv) else rdp


@functools.lru_cache(maxsize=4096)
def _epsilon(kind: str, history: History, delta: float) -> float:
    """ε at δ after the steps in `history` (validated inputs; cached: PRV takes ~0.1–1 s)."""
    if not history:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf
    if kind == "pld":
        return _pld_epsilon(history, delta)
    return _rdp_epsilon(history, delta) if kind == "rdp" else _prv_epsilon(history, delta)


_PLD_INTERVAL = 1e-3  # 10× dp_accounting's default grid: the same ε to 3 decimals, ~8× faster here


def _pld_epsilon(history: History, delta: float) -> float:
    """min(PLD bound, RDP bound): Google's `dp_accounting` privacy-loss-distribution accountant
    (Koskela et al.; Doroshenko et al., PETS 2022), composing each (σ, q, steps) entry as a
    Poisson-subsampled Gaussian under add/remove-one. Its discretisation is pessimistic (the
    default `pessimistic_estimate`), so its ε is an upper bound, as RDP's is."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    rdp = _rdp_epsilon(history, delta)
    accountant = PLDAccountant(value_discretization_interval=_PLD_INTERVAL)
    for sigma, q, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    try:
        pld = float(accountant.get_epsilon(delta))
    except (ValueError, OverflowError, FloatingPointError, MemoryError):
        return rdp
    return max(0.0, min(pld, rdp)) if math.isfinite(pld) else rdp


# --------------------------------------------------------------------------- calibration
