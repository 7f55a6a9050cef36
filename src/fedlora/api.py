"""`fedlora.run`: one private federated fine-tuning run, from config to a complete run folder.

The public facade: `run`, its config resolution and `--resume`; the simulation's transport
and clients are built here and handed to the shared driver, `fedlora.runner.execute`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from fedlora import report
from fedlora.config import Config, apply_override, config_differences, config_from_dict, load_config
from fedlora.errors import ConfigError, FedloraError
from fedlora.experiment import Experiment, build_experiment, majority_accuracy, partition_report
from fedlora.federation import checkpoint as ckpt
from fedlora.federation.simulation import InProcessTransport
from fedlora.outputs import RunFolder, default_out_dir
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.runner import ServerSide, client_facts, execute

__all__ = ["run", "resume_config", "execute", "ServerSide", "client_facts"]


def run(config: Config | dict | str | Path | None = None, out: str | Path | None = None, *,
        overrides: list[str] | None = None,
        progress: Callable[[str], None] | None = print,
        resume: str | Path | None = None, instrument: Any = None) -> dict[str, Any]:
    """Run one experiment and return its summary (also written to `out/summary.json`).

    `config` is a `Config`, a nested dict (as in the TOML file), a path to a TOML file, or None
    for the default job; `overrides` are `section.key=value` strings applied on top.

    `resume=DIR` continues the interrupted run whose folder is `DIR.partial/` from its last
    checkpoint, with the config saved there. A `config` given as well must resolve to the same
    config, and `overrides` (applied on top of the saved config, or of `config`) may change only
    `threads` and `device`. The result equals an uninterrupted run's (on the same device).

    `instrument` (used by `fedlora audit`): `instrument.attach(experiment)` runs once the
    experiment is built, `instrument.finish(folder, summary)` after the last round, before the
    folder is complete; an instrumented run is never kept for resuming.
    """
    say = progress or (lambda _: None)
    start = time.perf_counter()
    if resume is not None:
        folder = RunFolder(resume, resume=True)
        config, saved = resume_config(folder, config, overrides)
    else:
        config, saved = _resolve(config, overrides), None
        folder = RunFolder(out or default_out_dir(config.method.name, config.privacy.epsilon))
    say(report.banner(config))
    exp = build_experiment(config)  # every input check happens here, before anything is written
    say(report.describe_setup(exp))
    if instrument is not None:
        instrument.attach(exp)
    folder.open()
    try:
        summary = _execute(exp, folder, say, start, saved)
        if instrument is not None:
            instrument.finish(folder, summary)
        final = folder.commit()
    except BaseException as err:
        keep = instrument is None and (folder.resuming or _resumable(folder))
        folder.abort(keep)
        if keep:
            err.add_note(f"the run so far is kept in '{folder.partial}' — continue it with "
                         f"`fedlora run --resume {folder.final}`")
        raise
    summary["out"] = str(final)
    say(report.summary_table(summary))
    say(f"run folder: {final}")
    return summary


def resume_config(folder: RunFolder, config, overrides) -> tuple[Config, ckpt.Checkpoint | None]:
    """The interrupted run's config (checked against any config given) and its checkpoint."""
    try:
        stored = load_config(folder.path("config.toml"))
    except FedloraError as err:
        raise ckpt.CheckpointError(f"--resume: '{folder.partial}' holds no usable config.toml "
                                   f"({err}) — it cannot be resumed") from None
    if config is not None or overrides:  # overrides alone apply on top of the stored config
        asked = _resolve(dataclasses.asdict(stored) if config is None else config, overrides)
        diff = config_differences(stored, asked)
        if diff:
            raise ConfigError(f"--resume: '{folder.partial}' was started with another config "
                              f"({'; '.join(diff[:3])}) — resume without --config/overrides, "
                              "or start a new run with --out")
        # only the cores and the device may change (float sums may then differ in their last
        # bits; sampling and DP noise are drawn on the CPU whatever the device)
        stored = dataclasses.replace(stored, threads=asked.threads, device=asked.device)
    for ledger in sorted(folder.path("ledger").glob("client-*.json")):
        PrivacyLedger(ledger)  # unreadable: refused now, before anything is touched
    path = folder.path(ckpt.FILENAME)
    return stored, (ckpt.load_checkpoint(path, stored) if path.exists() else None)


def _resumable(folder: RunFolder) -> bool:
    """Is there anything in `DIR.partial/` worth resuming: a checkpoint or a spent ε?"""
    ledgers = folder.path("ledger")  # its keys alone (made before round 1) spent nothing
    return folder.path(ckpt.FILENAME).exists() or (ledgers.is_dir()
                                                   and any(ledgers.glob("client-*.json")))


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
    if not folder.resuming:
        folder.write_json("partition.json", partition_report(exp))
    server = ServerSide(exp.config, exp.method, exp.trainer.handle, exp.initial, exp.evaluate,
                        majority_accuracy(exp), exp.task, exp.tokenizer,
                        label_names=_label_names(exp))
    transport = InProcessTransport(exp.trainer, exp.clients)
    return execute(server, transport, folder, say, start,
                   lambda: [client_facts(c) for c in exp.clients], exp.clients, saved)


def _label_names(exp: Experiment) -> list[str] | None:
    return list(exp.dataset.label_names) if exp.task.kind == "classification" else None
