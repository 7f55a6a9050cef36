"""A client's privacy ledger on disk: what it has spent survives a crash of anyone.

A client writes its accountant state to its ledger *before* its update leaves (an atomic
replace, fsync'd), so whatever the server later remembers, the client's ε is never lower than
what it released. After a crash the server resumes from its last checkpoint and may ask a
client to train a round again. The ledger also keeps, per round, a digest of what the client
started from (the download and its personal tensors):

* same round, same digest — the client's computation is a deterministic function of its data,
  that starting state and seeds derived from (seed, client, round), so the retrained upload is
  bit-for-bit the one already released and accounted for: releasing it again is
  post-processing and costs no ε. The round is *replayed* without charging the accountant.
  (Bit-for-bit needs the same float arithmetic: same machine and thread count. Otherwise the
  two uploads share their noise and differ only by rounding in the noiseless part.)
* same round, different digest — retraining would reuse the same noise on a different model,
  and the difference of two such uploads is noise-free: the client refuses that round.

Where the ledger lives is the transport's business: in simulation one file per client inside
the run folder; in a deployment each client keeps its own (e.g. a Flower ClientApp's disk).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.errors import FedloraError
from fedlora.fsutil import atomic_write_bytes


class LedgerError(FedloraError):
    """A client's privacy ledger is unreadable."""


class PrivacyLedger:
    """`{"rounds": {round: {"digest": ..., "accountant": state_dict after that round}}}`.

    The latest entry is what the client has spent; older entries let a replayed round report
    the ε it reported the first time (so a resumed run's metrics match an uninterrupted one).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rounds: dict[int, dict] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.rounds = {int(r): {"digest": str(e["digest"]), "accountant": dict(e["accountant"])}
                           for r, e in data["rounds"].items()}
            for e in self.rounds.values():
                _steps(e["accountant"])  # which entry is the latest depends on it
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"privacy ledger '{self.path}' is unreadable ({err}) — the client's "
                              "spent ε cannot be trusted; restore the file or start a new run") from None

    @property
    def latest(self) -> dict | None:
        """The accountant state after the last round this client trained (None: never trained).

        That is the entry with the most steps, not the highest round: a client that missed a
        round before a crash may, after the server resumes, train that earlier round for the
        first time, and its entry then holds every step charged before it as well."""
        return self.rounds[self._latest_round()]["accountant"] if self.rounds else None

    def _latest_round(self) -> int | None:
        if not self.rounds:
            return None
        return max(self.rounds, key=lambda r: (_steps(self.rounds[r]["accountant"]), r))

    def entry(self, round: int) -> dict | None:
        """`{"digest", "accountant"}` of round `round` if this client trained it."""
        return self.rounds.get(round)

    def forget_before(self, round: int) -> None:
        """Drop entries of rounds before `round` (the server has checkpointed them: they will
        never be replayed), keeping the latest, which is what the client has spent. Keeps the
        ledger's size bounded by the checkpoint interval, not the run's length; the file
        follows at the next `record`."""
        latest = self._latest_round()
        self.rounds = {r: e for r, e in self.rounds.items() if r >= round or r == latest}

    def record(self, round: int, digest: str, accountant_state: dict) -> None:
        """Persist the accountant after round `round`: call before the upload leaves."""
        self.rounds[round] = {"digest": digest, "accountant": accountant_state}
        data = {"rounds": {str(r): e for r, e in sorted(self.rounds.items())}}
        atomic_write_bytes(self.path, json.dumps(data).encode("utf-8"))


def _steps(accountant_state: dict) -> int:
    """Steps an accountant state has composed (its history is `[[σ, q, steps], ...]`)."""
    history = accountant_state.get("history")
    if not isinstance(history, list) or not all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[2], int) for e in history):
        raise ValueError(f"accountant history {history!r} is not [[sigma, q, steps], ...]")
    return sum(e[2] for e in history)


def adopt_ledger(ledger: PrivacyLedger, accountant) -> None:
    """Load the ledger's latest state into `accountant` if it has spent more: after a crash a
    client's ledger can be ahead of the server's checkpoint, never behind what was released."""
    from fedlora.privacy.accountant import PrivacyAccountant

    if ledger.latest is None:
        return
    recorded = PrivacyAccountant(accountant.kind)
    try:
        recorded.load_state_dict(ledger.latest)
    except FedloraError as err:
        raise LedgerError(f"privacy ledger '{ledger.path}' is unreadable ({err})") from None
    if recorded.steps_taken > accountant.steps_taken:
        accountant.load_state_dict(ledger.latest)
