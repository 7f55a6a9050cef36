"""A client's privacy ledger on disk: what it has spent, and what it has released.

A client writes its ledger entry for a round *before* its update leaves (atomic replaces,
fsync'd), so whatever the server later remembers, the client's ε is never lower than what it
released. An entry holds the digest of what the client started from (the download and its
personal tensors), its accountant after the round, and — beside the ledger, in
`<ledger>-release-<round>.safetensors` — the exact tensors it released (the upload and its
personal tensors after the round).

After a crash the server resumes from its last checkpoint and may ask a client for a round
again:

* same round, same digest, release kept — the client re-sends the stored release, bit for
  bit whatever device or thread count it now has: post-processing of what was already
  accounted, so it costs no ε (the round is *replayed*).
* same round, different digest — retraining would pair a second update with the first on the
  same noise stream (their difference would be noise-free), so the client refuses.
* a round whose release was dropped — after a checkpoint the server says it will never ask
  for earlier rounds again (`forget_before`), and the released bytes go; the digest stays, so
  a server that asks anyway (on any model) is refused. What a client needs to recognise a
  round it released is never pruned on the server's word.

Where the ledger lives is the transport's business: in simulation one file per client inside
the run folder; in a deployment each site keeps its own (a Flower site's state folder).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.errors import FedloraError
from fedlora.federation.wire import decode_state, encode_state, state_digest
from fedlora.fsutil import atomic_write_bytes

State = dict


class LedgerError(FedloraError):
    """A client's privacy ledger is unreadable."""


class PrivacyLedger:
    """`{"rounds": {round: {"digest", "accountant"?, "steps", "loss"}}}` plus release files.

    Keys are round numbers, or a name for a release that precedes the rounds ("center": the
    feature-centring query, `fedlora.federation.centering`).

    The entry with the most steps holds what the client has spent; older entries let a
    replayed round report the ε it reported the first time (so a resumed run's metrics match
    an uninterrupted one). Entries of forgotten rounds keep their digest only.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rounds: dict[int, dict] = {}
        # called with the accountant state before an entry is written (a Flower site charges
        # its per-data-set book first: `sitestate.SpentBook`)
        self.before_record = None
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.rounds = {_key(r): _entry(e) for r, e in data["rounds"].items()}
            if self.rounds and self._latest_round() is None:
                raise ValueError("no entry holds the accountant")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"privacy ledger '{self.path}' is unreadable ({err}) — the client's "
                              "spent ε cannot be trusted; restore the file or start a new run") from None

    @property
    def latest(self) -> dict | None:
        """The accountant state after the last round this client trained (None: never trained).

        That is the entry with the most steps, not the highest round: a client that missed a
        round before a crash may, after the server resumes, train that earlier round for the
        first time, and its entry then holds every step charged before it as well."""
        r = self._latest_round()
        return None if r is None else self.rounds[r]["accountant"]

    def _latest_round(self) -> int | None:
        held = [r for r, e in self.rounds.items() if "accountant" in e]
        if not held:
            return None
        return max(held, key=lambda r: (_steps(self.rounds[r]["accountant"]), _order(r)))

    def entry(self, round: int) -> dict | None:
        """`{"digest", ...}` of round `round` if this client released it."""
        return self.rounds.get(round)

    def release_path(self, round: int) -> Path:
        return self.path.with_name(f"{self.path.stem}-release-{round}.safetensors")

    def release(self, round: int) -> tuple[State, State] | None:
        """(upload, personal tensors) released in `round`, if still kept; None once forgotten."""
        path = self.release_path(round)
        if not path.exists():
            return None
        try:
            tensors = decode_state(path.read_bytes())
        except Exception as err:  # noqa: BLE001 — any failure to parse means the file is damaged
            raise LedgerError(f"released round '{path}' is unreadable ({err}) — restore it or "
                              "start a new run") from None
        if state_digest(tensors) != self.rounds[round].get("release"):
            raise LedgerError(f"released round '{path}' does not match its checksum in "
                              f"'{self.path}' — restore it or start a new run")
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items()  # noqa: E731
                               if k.startswith(prefix)}
        return part("upload/"), part("personal/")

    def forget_before(self, round: int) -> None:
        """The server has checkpointed rounds before `round` and will never ask for them again:
        drop their released bytes and accountant states (keeping the latest, which is what
        the client has spent) but never their digests, so a server that asks again anyway is
        refused. Keeps the ledger as small as the checkpoint interval, plus one line per round."""
        latest, changed = self._latest_round(), False
        for r, e in self.rounds.items():
            if _order(r) < round and ("release" in e or ("accountant" in e and r != latest)):
                self.release_path(r).unlink(missing_ok=True)
                e.pop("release", None)
                if r != latest:
                    e.pop("accountant", None)
                changed = True
        if changed:  # most rounds there is nothing to forget: no write, no fsync
            self._write()

    def record(self, round: int, digest: str, accountant_state: dict, upload: State,
               personal: State, steps: int, loss: float | None = None) -> None:
        """Persist round `round`'s release and the accountant after it: call before the upload
        leaves. The release file goes first, so an entry never names a missing file."""
        if self.before_record is not None:
            self.before_record(accountant_state)
        tensors = {**{f"upload/{k}": v for k, v in upload.items()},
                   **{f"personal/{k}": v for k, v in personal.items()}}
        atomic_write_bytes(self.release_path(round), encode_state(tensors))
        self.rounds[round] = {"digest": digest, "accountant": accountant_state, "steps": int(steps),
                              "loss": loss, "release": state_digest(tensors)}
        self._write()

    def _write(self) -> None:
        data = {"rounds": {str(r): e for r, e in sorted(self.rounds.items(),
                                                        key=lambda item: _order(item[0]))}}
        atomic_write_bytes(self.path, json.dumps(data).encode("utf-8"))


def _key(text: str) -> int | str:
    """A round number, or the name of a release that is not a round (the centring query's)."""
    return int(text) if text.lstrip("-").isdigit() else str(text)


def _order(key: int | str) -> int:
    """Where an entry stands in time: rounds by number, a named query before round 0."""
    return key if isinstance(key, int) else -1


def _entry(e: dict) -> dict:
    out = {"digest": str(e["digest"])}
    if "accountant" in e:
        out["accountant"] = dict(e["accountant"])
        _steps(out["accountant"])  # which entry is the latest depends on it
    for key, kind in (("steps", int), ("release", str)):
        if key in e:
            out[key] = kind(e[key])
    if e.get("loss") is not None:
        out["loss"] = float(e["loss"])
    return out


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
