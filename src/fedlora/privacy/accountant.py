"""A client's privacy accountant: the history of its DP steps, and ε of that history.

The state is a compact history `[(σ, q, steps), ...]` (consecutive equal mechanisms merged), JSON
friendly for ledgers and checkpoints; the maths — RDP and PRV composition — is in
`fedlora.privacy.epsilon`, the σ calibration in `fedlora.privacy.calibration` (both re-exported
here for callers that want one import).
"""

from __future__ import annotations

from fedlora.errors import ConfigError
from fedlora.privacy.calibration import calibrate_noise
from fedlora.privacy.epsilon import (KINDS, RDP_ORDERS, History, _append, _check_delta,
                                     _check_kind, _check_noise, _check_sample_rate, _check_steps,
                                     _epsilon)

__all__ = ["PrivacyAccountant", "calibrate_noise", "KINDS", "RDP_ORDERS"]


class PrivacyAccountant:
    """One client's privacy ledger over all its DP-SGD steps, in all rounds.

    Each step is a Poisson-subsampled Gaussian mechanism with noise multiplier σ and sample
    rate q; ε(δ) is their composition, computed by Opacus's RDP or PRV accountant
    (`kind`). The history is kept compact: consecutive steps with equal (σ, q) are merged
    into one `(σ, q, steps)` entry, as Opacus does.
    """

    def __init__(self, kind: str = "rdp"):
        self._kind = _check_kind(kind)
        self._history: History = ()

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """`[(noise_multiplier, sample_rate, steps), ...]` in the order taken."""
        return list(self._history)

    @property
    def steps_taken(self) -> int:
        return sum(n for _, _, n in self._history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` (≥ 0) steps with noise multiplier σ at sample rate q."""
        self._history = _append(
            self._history, _check_noise(noise_multiplier), _check_sample_rate(sample_rate),
            _check_steps(steps, minimum=0),
        )

    def epsilon(self, delta: float) -> float:
        """ε at δ spent so far: 0.0 with no steps, inf if any step had σ = 0.

        For kind "prv": min(PRV bound, RDP bound), the RDP bound alone where Opacus's PRV
        accountant fails or would need too fine a grid (see the module docstring).
        """
        return _epsilon(self._kind, self._history, _check_delta(delta))

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float) -> float:
        """ε at δ if `steps` more steps at (σ, q) were taken. Does not change the accountant."""
        history = _append(
            self._history, _check_noise(noise_multiplier), _check_sample_rate(sample_rate),
            _check_steps(steps, minimum=0),
        )
        return _epsilon(self._kind, history, _check_delta(delta))

    def state_dict(self) -> dict:
        """`{"kind": ..., "history": [[σ, q, steps], ...]}`: plain JSON-serialisable values."""
        return {"kind": self._kind, "history": [[s, q, n] for s, q, n in self._history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; continuing afterwards matches one continuous accountant."""
        if not isinstance(state, dict) or "kind" not in state or "history" not in state:
            raise ConfigError("accountant state must be a dict with keys 'kind' and 'history'")
        if state["kind"] != self._kind:
            raise ConfigError(
                f"accountant state is of kind {state['kind']!r}, this accountant is {self._kind!r}"
            )
        history: History = ()
        for entry in state["history"]:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ConfigError(f"bad accountant history entry {entry!r}: want [sigma, q, steps]")
            sigma, q, n = entry
            history = _append(history, _check_noise(sigma), _check_sample_rate(q),
                              _check_steps(n, minimum=1))
        self._history = history

    def __repr__(self) -> str:
        return f"PrivacyAccountant(kind={self._kind!r}, steps_taken={self.steps_taken})"
