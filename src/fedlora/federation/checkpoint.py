"""Resumable checkpoints: one safetensors file, written atomically, verified when read.

A checkpoint after round r holds everything the rest of the run depends on:

* the global state — adapter tensors, base-weight changes, statistics and a chain's merged
  links (`adapter/<key>`, `base/<key>`, `statistics/<key>`, `links/<key>`), and the server
  optimizer's buffers (`server/<key>`);
* each client's state — its personal tensors (`client/<k>/<key>`), its step count and its
  accountant's history (a client in a deployment keeps these itself; the server part stands
  alone: `clients` may be empty);
* the loop's accumulators — per-client ε and steps, byte totals, the metrics history (whose
  length is the next round), the wall seconds so far;
* the torch RNG state. Every random stream of a round is seeded from
  `derive_seed(seed, tag, client, round)`, so this is belt and braces;
* the digest of the config it belongs to, and a SHA-256 over all of the above: a truncated or
  altered file is refused, never half-loaded.

The JSON part rides in the safetensors header's `__metadata__`, so one rename publishes the
whole checkpoint at once (`fsutil.atomic_write_bytes`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save

from fedlora.config import Config, identity_text
from fedlora.errors import FedloraError
from fedlora.federation.server import FederationState
from fedlora.federation.wire import state_digest
from fedlora.fsutil import atomic_write_bytes
from fedlora.methods.base import GlobalState

FILENAME = "checkpoint.safetensors"
FORMAT = 2  # 2: the feature centre is a statistic (`statistics/`), no longer a base change


class CheckpointError(FedloraError):
    """A checkpoint cannot be used to resume."""


def config_digest(config: Config) -> str:
    """SHA-256 of the run's identity (`fedlora.config.run_identity`: the config, cores and
    device aside — a resumed run may be given other cores, or another device)."""
    return hashlib.sha256(identity_text(config).encode()).hexdigest()


@dataclass
class Checkpoint:
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def round(self) -> int:
        """Rounds completed: the run continues with this 0-based round."""
        return len(self.meta["history"])


def save_checkpoint(path: str | Path, config: Config, state: FederationState, clients=(),
                    seconds: float = 0.0) -> None:
    """`seconds`: the run's wall time so far, earlier attempts included (the summary's total
    after a resume)."""
    tensors = {f"adapter/{k}": v for k, v in state.glob.adapter.items()}
    tensors.update({f"base/{k}": v for k, v in state.glob.base_delta.items()})
    tensors.update({f"statistics/{k}": v for k, v in state.glob.statistics.items()})
    tensors.update({f"links/{k}": v for k, v in state.glob.links.items()})
    tensors.update({f"server/{k}": v for k, v in state.server_buffers.items()})
    for c in clients:
        tensors.update({f"client/{c.cid}/{k}": v for k, v in c.personal.items()})
    tensors["rng/torch"] = torch.get_rng_state()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "config": config_digest(config),
        "epsilon": {str(k): v for k, v in state.epsilon.items()},
        "steps": {str(k): v for k, v in state.steps.items()},
        "bytes_uploaded": state.bytes_uploaded,
        "bytes_downloaded": state.bytes_downloaded,
        "history": state.history,
        "center": state.center,
        "seconds": seconds,
        "clients": {str(c.cid): {"steps": c.steps, "accountant": c.privacy.accountant.state_dict()}
                    for c in clients},
    }
    text = json.dumps(meta)
    header = {"fedlora": text, "digest": _digest(text, tensors)}
    atomic_write_bytes(path, save(tensors, metadata=header))


def load_checkpoint(path: str | Path, config: Config | None = None) -> Checkpoint:
    """Read and verify a checkpoint; `CheckpointError` with the reason if it cannot be used."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        header = _metadata(raw)
        tensors = dict(load(raw))
        text, digest = header["fedlora"], header["digest"]
        meta = json.loads(text)
    except Exception as err:  # noqa: BLE001 — any failure to parse means the file is damaged
        raise CheckpointError(f"--resume: checkpoint '{path}' is corrupted or truncated "
                              f"({_short(err)}) — it cannot be resumed; remove the folder "
                              "to start the run again") from None
    if _digest(text, tensors) != digest:
        raise CheckpointError(f"--resume: checkpoint '{path}' does not match its checksum — it "
                              "was altered or damaged; remove the folder to start the run again")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"--resume: checkpoint '{path}' has format {meta.get('format')!r}, "
                              f"this fedlora reads format {FORMAT}")
    if config is not None and meta["config"] != config_digest(config):
        raise CheckpointError(f"--resume: checkpoint '{path}' belongs to another config than "
                              "the folder's config.toml — the folder was changed by hand; restore "
                              "its config.toml, or remove the folder to start the run again")
    return Checkpoint(meta, tensors)


def restore(ckpt: Checkpoint, clients=()) -> FederationState:
    """The loop state of `ckpt`; also restores the clients' state and the torch RNG."""
    t, m = ckpt.tensors, ckpt.meta
    glob = GlobalState(adapter=_under(t, "adapter/"), base_delta=_under(t, "base/"),
                       statistics=_under(t, "statistics/"), links=_under(t, "links/"))
    state = FederationState(
        glob=glob,
        epsilon={int(k): float(v) for k, v in m["epsilon"].items()},
        steps={int(k): int(v) for k, v in m["steps"].items()},
        bytes_uploaded=int(m["bytes_uploaded"]),
        bytes_downloaded=int(m["bytes_downloaded"]),
        history=list(m["history"]),
        server_buffers=_under(t, "server/"),
        center=dict(m.get("center", {})),
        seconds_before=float(m.get("seconds", 0.0)),
    )
    for c in clients:
        saved = m["clients"].get(str(c.cid))
        if saved is None:
            raise CheckpointError(f"--resume: the checkpoint has no state for client {c.cid}")
        c.personal = _under(t, f"client/{c.cid}/")
        c.steps = int(saved["steps"])
        c.privacy.accountant.load_state_dict(saved["accountant"])
    torch.set_rng_state(t["rng/torch"])
    return state


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _digest(text: str, tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(text.encode() + state_digest(tensors).encode()).hexdigest()


def _metadata(raw: bytes) -> dict:
    """The `__metadata__` of a safetensors file: 8-byte little-endian header length, JSON."""
    if len(raw) < 8:
        raise ValueError(f"{len(raw)} bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError("header longer than the file")
    return json.loads(raw[8:8 + n])["__metadata__"]


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
