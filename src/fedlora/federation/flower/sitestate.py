"""What a site keeps on its own disk, so that a restarted SuperNode carries on where it stopped.

Flower starts a new ClientApp process for every message, and a SuperNode that is restarted —
or a server that is restarted, which makes a new Flower run — forgets everything it held in
memory. A site's privacy ledger must not be forgotten with it: starting again from ε = 0
would under-report what the site has released. So a site keeps, in its state folder
(node config `state-dir`):

    <state-dir>/
        spent-<data>.json           what the site has spent on one data set, per run, over every
                                    run ever (`SpentBook`): a new run folder, a changed config or
                                    a restarted server never starts its ε at 0 again
        .lock                       one ClientApp process at a time, whatever the run
        run-<key>/
            site.json               which run (config digest, server's run folder) and client
            secret.key              the run's secret key (0600): its DP noise and Poisson batches
                                    come from it (`fedlora.privacy.randomness`); never sent
            ledger.json             the run's privacy ledger (`fedlora.privacy.ledger`): per round
                                    released, the digest of what the site started from and its
                                    accountant after it — written before the upload leaves
            ledger-release-<r>.safetensors   the tensors released in round r, for replays
            round-<r>.safetensors   the site's personal tensors after round r (steps in metadata)

`key` hashes the run's config (threads aside) and the server's run folder: a resumed run
(same folder, same config) finds its ledger and key again; another run gets a new key, so no
two runs share noise. `data` hashes the site's training examples. Every file is written
atomically; anything unreadable is refused with one message rather than trained past, and a
missing key beside a ledger that records releases is refused too (`load_or_create_key`).

Why keep the personal tensors of each round rather than the last: a server resumed from its
checkpoint after round c asks for round c + 1 again. To replay it — and be charged nothing,
see the ledger — the site must start from exactly what it started from the first time,
its state after its last round ≤ c. The server says with every instruction which rounds it
has checkpointed; older snapshots and released tensors are dropped then, never the digests
that let the site recognise (and refuse) a round it already released.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from safetensors.torch import load, save

from fedlora.config import Config
from fedlora.errors import ConfigError
from fedlora.federation.checkpoint import _metadata, _short, config_digest
from fedlora.federation.client import Client
from fedlora.federation.wire import state_digest
from fedlora.fsutil import atomic_write_bytes
from fedlora.methods.base import State
from fedlora.privacy.ledger import LedgerError, PrivacyLedger, adopt_ledger
from fedlora.privacy.randomness import load_or_create_key

SNAPSHOT = re.compile(r"round-(\d+)\.safetensors")


def state_dir(node_config: Mapping[str, Any], cid: int) -> Path:
    """The node's `state-dir`; without one, `$FLWR_HOME/fedlora-state/client-<cid>` (FLWR_HOME
    defaults to ~/.flwr, the folder Flower itself keeps on the site's machine)."""
    value = node_config.get("state-dir")
    if value is None:
        home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
        return Path(home) / "fedlora-state" / f"client-{cid}"
    if not isinstance(value, str) or not Path(value).expanduser().is_absolute():
        raise ConfigError(f"node config: state-dir={value!r} must be an absolute folder path, "
                          "e.g. state-dir=\"/var/lib/fedlora/site0\" — the site keeps its privacy "
                          "ledger there")
    return Path(value).expanduser()


def run_key(config: Config, out: str) -> str:
    """What names a run on every site: its config (threads aside) and the server's run folder."""
    return hashlib.sha256(f"{config_digest(config)}\n{out}".encode()).hexdigest()[:16]


class SiteState:
    """One site's state for one run (see the module docstring for the layout)."""

    def __init__(self, folder: Path, cid: int):
        self.folder = folder
        self.key = folder.name[len("run-"):]
        self.cid = cid
        self.ledger = PrivacyLedger(folder / "ledger.json")  # unreadable: LedgerError

    @classmethod
    def open(cls, root: Path, config: Config, out: str, cid: int) -> "SiteState":
        """The state of client `cid` in the run (`config`, `out`), created on first use."""
        folder = root / f"run-{run_key(config, out)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"node config: state-dir '{root}' cannot be created ({err}) — give "
                              "the site a folder it can write") from None
        about = folder / "site.json"
        meta = {"client": cid, "config": config_digest(config), "out": out}
        if about.exists():
            try:
                saved = json.loads(about.read_text(encoding="utf-8"))
                client = int(saved["client"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise LedgerError(f"site state '{about}' is unreadable ({err}) — the site's spent "
                                  "ε cannot be trusted; restore the folder or start a new run") from None
            if client != cid:
                raise ConfigError(f"this site served client {client} earlier in the run (state in "
                                  f"'{folder}'), now its node config says {cid} — keep node "
                                  "configs fixed for a run")
        else:
            atomic_write_bytes(about, json.dumps(meta, indent=2).encode("utf-8"))
        return cls(folder, cid)

    @contextmanager
    def locked(self) -> Iterator["SiteState"]:
        """Hold the site's lock: a ClientApp still finishing a message of a crashed server's run
        and one serving the resumed run must not both charge the same round, and two runs on the
        same data must not both update its `SpentBook`."""
        import fcntl

        with open(self.folder.parent / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                for torn in self.folder.glob(".*.tmp-*"):  # half-written by a killed process
                    torn.unlink(missing_ok=True)
                self.ledger = PrivacyLedger(self.ledger.path)  # as the last holder left it
                yield self
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- rounds
    def restore(self, client: Client, round: int, config: Config, data_digest: str,
                budget: float) -> None:
        """Set up `client` to train (0-based) round `round`: its accountant is what its ledger
        says it has spent (over every round, replayed ones included), after what the site spent
        on the same data in other runs (`SpentBook`), all within `budget`; its randomness is the
        run's secret key (in secret mode); its personal tensors and steps are as its last round
        before `round` left them."""
        adopt_ledger(self.ledger, client.privacy.accountant)
        book = SpentBook(self.folder.parent / f"spent-{data_digest[:32]}.json")
        book.charge(self.key, client.privacy.accountant.history)  # a crash may have left it behind
        client.privacy.prior = tuple(book.others(self.key))
        client.privacy.budget = budget
        # charged on the site's book before the run's own ledger entry, so that a crash between
        # the two can over-count, never under-count. A run without DP records no steps, yet it
        # released the data unprotected: the book marks it with σ = 0 (ε = ∞ from then on).
        exposed = [[0.0, 1.0, 1]]
        self.ledger.before_record = lambda state: book.charge(
            self.key, state["history"] if config.private else exposed)
        client.ledger = self.ledger
        if config.privacy.noise == "secret":
            client.randomness = load_or_create_key(self.folder / "secret.key",
                                                   released=bool(self.ledger.rounds))
        client.personal, client.steps = self.before(round)

    def before(self, round: int) -> tuple[State, int]:
        """(personal tensors, steps) after the site's last round < `round`; ({}, 0) if none."""
        done = [r for r in self._snapshots() if r < round]
        return self._read(max(done)) if done else ({}, 0)

    def save(self, round: int, client: Client) -> None:
        """Keep `client`'s personal tensors and steps after `round` (after the ledger entry)."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in client.personal.items()}
        meta = {"client": str(client.cid), "round": str(round), "steps": str(client.steps),
                "digest": state_digest(tensors)}
        atomic_write_bytes(self._path(round), save(tensors, metadata=meta))

    def forget_before(self, round: int) -> None:
        """The server has checkpointed rounds < `round`: it will never ask for them again. Keep
        the last snapshot before `round` (the start of the next) and the spent ε. `round` 0
        means no checkpoint yet: even the centring query before round 1 may come again."""
        if round <= 0:
            return
        done = self._snapshots()
        keep = max((r for r in done if r < round), default=None)
        for r in done:
            if r < round and r != keep:
                self._path(r).unlink(missing_ok=True)
        self.ledger.forget_before(round)

    # ---------------------------------------------------------------- files
    def _path(self, round: int) -> Path:
        return self.folder / f"round-{round}.safetensors"

    def _snapshots(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.folder.iterdir()
                      if (m := SNAPSHOT.fullmatch(p.name)))

    def _read(self, round: int) -> tuple[State, int]:
        path = self._path(round)
        try:
            raw = path.read_bytes()
            tensors = dict(load(raw))
            meta = _metadata(raw)
            steps = int(meta["steps"])
            if (int(meta["client"]), int(meta["round"])) != (self.cid, round):
                raise ValueError(f"it holds client {meta['client']}'s round {meta['round']}")
            if meta["digest"] != state_digest(tensors):
                raise ValueError("its tensors do not match their checksum")
        except Exception as err:  # noqa: BLE001 — any failure to parse means the file is damaged
            raise LedgerError(f"site state '{path}' is unreadable ({_short(err)}) — the site "
                              "cannot start its next round from it; restore the folder or start "
                              "a new run") from None
        return tensors, steps


class SpentBook:
    """What a site has spent on one data set: `{"runs": {run key: [[σ, q, steps], ...]}}`.

    The site's ε on that data composes every run's history (`ClientPrivacy.prior` holds the
    other runs'). A run's entry only grows: `charge` keeps the longer of what is written and
    what it is given."""

    def __init__(self, path: Path):
        self.path = path
        self.runs: dict[str, list] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.runs = {str(k): [[float(s), float(q), int(n)] for s, q, n in v]
                             for k, v in data["runs"].items()}
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise LedgerError(f"site ledger '{path}' is unreadable ({err}) — what the site has "
                                  "spent on its data cannot be trusted; restore the file") from None

    def others(self, run: str) -> list[tuple[float, float, int]]:
        return [tuple(e) for k, v in sorted(self.runs.items()) if k != run for e in v]

    def charge(self, run: str, history) -> None:
        history = [[float(s), float(q), int(n)] for s, q, n in history]
        if sum(e[2] for e in history) <= sum(e[2] for e in self.runs.get(run, [])):
            return
        self.runs[run] = history
        atomic_write_bytes(self.path, json.dumps({"runs": self.runs}).encode("utf-8"))


def data_digest(rows: list[str]) -> str:
    """Names a site's data set whatever the order of its rows: SHA-256 of its sorted examples."""
    hashed = sorted(hashlib.sha256(r.encode()).hexdigest() for r in rows)
    return hashlib.sha256("\n".join(hashed).encode()).hexdigest()
