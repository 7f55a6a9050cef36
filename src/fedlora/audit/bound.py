"""The one-run audit's lower bound on ε (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846).

m canaries are each included independently with probability ½; after training the auditor
guesses "in" or "out" for r of them (abstaining on the rest) and v guesses are right. If the
mechanism is ε-DP, the number of right guesses is stochastically dominated by Binomial(r, p_ε),
p_ε = e^ε / (1 + e^ε): randomised response's accuracy (the paper's Theorem 3.1). With δ > 0
the tail gains a term (their Theorem 5.2's recursion, in the closed form of their Algorithm):

    P[W ≥ v] ≤ P[Binomial(r, p_ε) ≥ v] + 2·m·δ · max_{1≤i≤v} P[v−i ≤ Binomial(r, p_ε) < v] / i.

ε_lb is the largest ε this p-value rejects at level β: with probability ≥ 1 − β over the
inclusion coins the mechanism is not (ε', δ)-DP for any ε' < ε_lb. The ceiling is ε_lb when
every guess is right (v = r): no audit with these m, r can report more.
"""

from __future__ import annotations

import math

from scipy.stats import binom

BETA = 0.05  # the paper's confidence: the bound holds with probability ≥ 95%


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v right guesses out of r] under the null "the mechanism is (ε, δ)-DP"."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got m={m}, r={r}, v={v}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need ε ≥ 0 and 0 ≤ δ ≤ 1, got ε={epsilon}, δ={delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, p))  # P[Binomial(r, p) ≥ v]
    worst, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(binom.pmf(v - i, r, p))  # P[v − i ≤ Binomial(r, p) < v]
        worst = max(worst, below / i)
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = BETA,
                        tolerance: float = 1e-6) -> float:
    """The largest ε with p_value(ε) < β (0 when even ε = 0 is not rejected), by bisection:
    the p-value grows with ε."""
    if not 0 < beta < 1:
        raise ValueError(f"need 0 < β < 1, got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    while high - low > tolerance:
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low


def ceiling(m: int, r: int, delta: float, beta: float = BETA) -> float:
    """ε_lb if all r guesses were right: how tight this audit could possibly be."""
    return epsilon_lower_bound(m, r, r, delta, beta)
