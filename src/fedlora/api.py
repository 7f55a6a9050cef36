"""`fedlora.run`: one private federated fine-tuning run, from config to a complete run folder."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

from fedlora import report
from fedlora.config import Config, apply_override, config_from_dict, config_to_toml, load_config
from fedlora.errors import ConfigError, FedloraError
from fedlora.experiment import Experiment, build_experiment, majority_accuracy, partition_report
from fedlora.federation import checkpoint as ckpt
from fedlora.federation.server import FederationState, RoundPlan, run_rounds
from fedlora.federation.simulation import InProcessTransport
from fedlora.federation.validate import UpdateValidator, template_state
from fedlora.model import count_parameters, save_base_delta
from fedlora.outputs import RunFolder, default_out_dir
from fedlora.privacy.ledger import PrivacyLedger, adopt_ledger


def run(config: Config | dict | str | Path | None = None, out: str | Path | None = None, *,
        overrides: list[str] | None = None,
        progress: Callable[[str], None] | None = print,
        resume: str | Path | None = None) -> dict[str, Any]:
    """Run one experiment and return its summary (also written to `out/summary.json`).

    `config` is a `Config`, a nested dict (as in the TOML file), a path to a TOML file, or None
    for the default job; `overrides` are `section.key=value` strings applied on top.

    `resume=DIR` continues the interrupted run whose folder is `DIR.partial/` from its last
    checkpoint, with the config saved there. A `config` given as well must resolve to the same
    config, and `overrides` (applied on top of the saved config, or of `config`) may change only
    `threads`. The result equals an uninterrupted run's.
    """
    say = progress or (lambda _: None)
    start = time.perf_counter()
    if resume is not None:
        folder = RunFolder(resume, resume=True)
        config, saved = _resume_config(folder, config, overrides)
    else:
        config, saved = _resolve(config, overrides), None
        folder = RunFolder(out or default_out_dir(config.method.name, config.privacy.epsilon))
    say(report.banner(config))
    exp = build_experiment(config)  # every input check happens here, before anything is written
    say(report.describe_setup(exp))
    folder.open()
    try:
        summary = _execute(exp, folder, say, start, saved)
        final = folder.commit()
    except BaseException as err:
        keep = folder.resuming or _resumable(folder)
        folder.abort(keep)
        if keep:
            err.add_note(f"the run so far is kept in '{folder.partial}' — continue it with "
                         f"`fedlora run --resume {folder.final}`")
        raise
    summary["out"] = str(final)
    say(report.summary_table(summary))
    say(f"run folder: {final}")
    return summary


def _resume_config(folder: RunFolder, config, overrides) -> tuple[Config, ckpt.Checkpoint | None]:
    """The interrupted run's config (checked against any config given) and its checkpoint."""
    try:
        stored = load_config(folder.path("config.toml"))
    except FedloraError as err:
        raise ckpt.CheckpointError(f"--resume: '{folder.partial}' holds no usable config.toml "
                                   f"({err}) — it cannot be resumed") from None
    if config is not None or overrides:  # overrides alone apply on top of the stored config
        asked = _resolve(dataclasses.asdict(stored) if config is None else config, overrides)
        diff = _differences(stored, asked)
        if diff:
            raise ConfigError(f"--resume: '{folder.partial}' was started with another config "
                              f"({'; '.join(diff[:3])}) — resume without --config/overrides, "
                              "or start a new run with --out")
        # only the cores may change (float sums may then differ in their last bits)
        stored = dataclasses.replace(stored, threads=asked.threads)
    for ledger in sorted(folder.path("ledger").glob("client-*.json")):
        PrivacyLedger(ledger)  # unreadable: refused now, before anything is touched
    path = folder.path(ckpt.FILENAME)
    return stored, (ckpt.load_checkpoint(path, stored) if path.exists() else None)


def _differences(a: Config, b: Config) -> list[str]:
    fa, fb = _flat(dataclasses.asdict(a)), _flat(dataclasses.asdict(b))
    return [f"{k}: {fa.get(k)!r} there, {fb.get(k)!r} here"
            for k in sorted(set(fa) | set(fb)) if k != "threads" and fa.get(k) != fb.get(k)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _resumable(folder: RunFolder) -> bool:
    """Is there anything in `DIR.partial/` worth resuming: a checkpoint or a spent ε?"""
    ledgers = folder.path("ledger")
    return folder.path(ckpt.FILENAME).exists() or (ledgers.is_dir() and any(ledgers.iterdir()))


def _resolve(config, overrides) -> Config:
    if isinstance(config, Config):
        if not overrides:
            return config
        config = dataclasses.asdict(config)
    if isinstance(config, dict):
        raw = copy.deepcopy(config)
        for item in overrides or []:
            apply_override(raw, item)
        return config_from_dict(raw)
    return load_config(config, overrides)


def _execute(exp: Experiment, folder: RunFolder, say, start: float,
             saved: ckpt.Checkpoint | None) -> dict[str, Any]:
    config = exp.config
    if not folder.resuming:
        folder.write_text("config.toml", config_to_toml(config))
        folder.write_json("partition.json", partition_report(exp))
    f = config.federation
    plan = RoundPlan(f.rounds, f.clients, f.clients_per_round, f.eval_every, config.seed,
                     checkpoint_every=f.checkpoint_every, on_bad_update=f.on_bad_update)
    folder.path("ledger").mkdir(exist_ok=True)
    if saved is not None:
        state = ckpt.restore(saved, exp.clients)
        say(f"resuming after round {saved.round} of {f.rounds} from {folder.partial}")
    else:
        state = FederationState(glob=exp.method.init_global(exp.initial))
    for client in exp.clients:  # a client's ε never goes below what its ledger says it spent
        client.ledger = PrivacyLedger(folder.path(f"ledger/client-{client.cid}.json"))
        adopt_ledger(client.ledger, client.privacy.accountant)
    folder.write_jsonl("metrics.jsonl", state.history)  # drops lines past the checkpoint
    transport = InProcessTransport(exp.trainer, exp.clients)
    validator = UpdateValidator(exp.method, template_state(exp.trainer.handle, exp.initial),
                                f.max_update_norm)

    def on_round(record: dict) -> None:
        folder.append_jsonl("metrics.jsonl", record)
        say(report.round_line(record, config))

    def save(state: FederationState) -> None:
        ckpt.save_checkpoint(folder.path(ckpt.FILENAME), config, state, exp.clients)
        for client in exp.clients:
            client.ledger.forget_before(len(state.history))

    run_rounds(exp.method, state, transport, plan, exp.evaluate, on_round,
               validator=validator, checkpoint=save)
    export_adapter(exp, state, folder.path("adapter"))
    summary = build_summary(exp, state, time.perf_counter() - start)
    folder.write_json("summary.json", summary)
    folder.path(ckpt.FILENAME).unlink(missing_ok=True)  # the results supersede it
    return summary


def export_adapter(exp: Experiment, state: FederationState, path: Path) -> None:
    """The global adapter (LoRA A, B and the head) in PEFT's format, loadable with
    `PeftModel.from_pretrained(base, path)`.

    Methods that change base weights (FedEx-LoRA, FLoRA, full) also write
    `base_delta.safetensors` next to `adapter/`: Δ keyed by the plain model's parameter names,
    to add to the base before loading the adapter (`fedlora.model.apply_base_delta`).
    Personalised methods also write each client's own adapter to `clients/<k>/adapter`.
    """
    glob = state.glob
    handle = exp.trainer.handle
    handle.install({**exp.initial, **glob.tensors()})
    exp.model.save_pretrained(str(path))
    if glob.base_delta:
        save_base_delta(glob.base_delta, path.parent / "base_delta.safetensors")
    if exp.method.personalised:
        for client in exp.clients:
            handle.install(exp.method.client_state(
                exp.initial, client.personal, exp.method.download(glob, client.cid), client.cid))
            exp.model.save_pretrained(str(path.parent / "clients" / str(client.cid) / "adapter"))
    handle.install({**exp.initial, **glob.tensors()})


def build_summary(exp: Experiment, state: FederationState, seconds: float) -> dict[str, Any]:
    config, last = exp.config, (state.history[-1] if state.history else {})
    evaluated = [h for h in state.history if h.get("test_accuracy") is not None]
    final = evaluated[-1] if evaluated else {}
    shapes = exp.trainer.handle.shapes()
    trained = sum(math.prod(s) for k, s in shapes.items() if exp.method.trainable(k, 0))
    return {
        "method": config.method.name,
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "test_accuracy_per_client": final.get("test_accuracy_per_client"),
        "validation_accuracy": final.get("validation_accuracy"),
        "majority_accuracy": majority_accuracy(exp),
        "epsilon": max(state.epsilon.values(), default=0.0),
        "epsilon_target": config.privacy.epsilon,
        "epsilon_per_client": [state.epsilon.get(c.cid, 0.0) for c in exp.clients],
        "delta": config.privacy.delta,
        "accountant": config.privacy.accountant,
        "clip": config.privacy.clip,
        "noise_multiplier": [c.privacy.noise_multiplier for c in exp.clients],
        "sample_rates": [c.privacy.sample_rate for c in exp.clients],
        "steps": [c.steps for c in exp.clients],
        "client_sizes": [c.num_examples for c in exp.clients],
        "rounds": len(state.history),
        "rounds_planned": config.federation.rounds,
        "clients": config.federation.clients,
        "bytes_uploaded": state.bytes_uploaded,
        "bytes_downloaded": state.bytes_downloaded,
        "trainable_parameters": trained,
        "adapter_parameters": count_parameters(exp.initial),
        "refused": {str(k): v for h in state.history for k, v in h.get("refused", {}).items()},
        "rejected": {f"round {h['round']}, client {k}": v for h in state.history
                     for k, v in h.get("rejected", {}).items()},
        "seed": config.seed,
        "wall_seconds": round(seconds, 2),
        "private": not math.isinf(config.privacy.epsilon),
        "last_round": last.get("round"),
    }
