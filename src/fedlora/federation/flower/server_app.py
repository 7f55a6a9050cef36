"""The ServerApp: the server side of a fedlora run, with the round loop reaching sites via Flower.

It builds what the server holds — the method, the initial adapter (from the run's seed), an
evaluator on the server's own held-out data — and runs `execute`, the same loop and run
folder as `fedlora run`, over a `FlowerTransport`. Client training data is never read here:
with `test-path` the server evaluates on its own file; without it (demos) it takes the held-out
test split of the shared demo set, exactly the examples the simulation tests on. Personalised
methods are scored by each site on its own held-out part, as the simulation scores them.

Like `fedlora run`, it checkpoints the global state and the loop's state into `out`.partial/
every `federation.checkpoint_every` rounds; a ServerApp that dies leaves that folder, and
`flwr run APP CONNECTION --run-config resume=true` continues from its last checkpoint. Sites
keep their own privacy ledgers (sitestate.py), so a round asked again after the crash is
replayed without a new charge, and ε is never under-reported.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedlora import report  # noqa: E402
from fedlora.api import resume_config  # noqa: E402
from fedlora.runner import ServerSide, execute  # noqa: E402
from fedlora.config import Config  # noqa: E402
from fedlora.experiment import (build_base, build_evaluators, evaluate_all, load_data,  # noqa: E402
                                split_data)
from fedlora.federation import checkpoint as ckpt  # noqa: E402
from fedlora.federation.flower.runconfig import FlowerRun, read_run_config  # noqa: E402
from fedlora.federation.flower.secagg import SummedUploads  # noqa: E402
from fedlora.federation.validate import template_state  # noqa: E402
from fedlora.federation.flower.transport import FlowerTransport, personalised_evaluation  # noqa: E402
from fedlora.methods import get_method  # noqa: E402
from fedlora.tasks import get_task  # noqa: E402
from fedlora.errors import ConfigError  # noqa: E402
from fedlora.outputs import PARTIAL, RunFolder, default_out_dir  # noqa: E402

app = ServerApp()


def _say(text: str) -> None:
    from logging import INFO

    from flwr.common.logger import log

    for line in text.splitlines():
        log(INFO, "%s", line)


def held_out(config: Config, test_path: str, task) -> tuple[Any, list[int], list[int]]:
    """The server's evaluation data through the run's task: (data set, test positions,
    validation positions) — its own file, or the demo split the simulation tests on."""
    if test_path:
        own = dataclasses.replace(config, data=dataclasses.replace(
            config.data, path=test_path, max_examples=0, partition="iid"))
        data = get_task(own).load_data()
        return data, list(range(len(data))), []
    data = load_data(config, task)
    split = split_data(data, config)
    return data, split.test, split.validation


def build_server(config: Config, test_path: str) -> tuple[ServerSide, list[str]]:
    """What the server holds, built by the simulation's task-driven builders: the method, the
    initial adapter, and the task's evaluators on the server's own held-out data. Returns it
    and the label names the sites number their labels by (none for a causal LM)."""
    method, task = get_method(config.method), get_task(config)
    data, test, validation = held_out(config, test_path, task)
    if method.personalised:  # each site scores its own model (see personalised_evaluation)
        test, validation = [], []
    base = build_base(config, data.num_labels, method, task)
    idx = sorted(set(test) | set(validation))
    ids, targets = task.encode(base.tokenizer, data.subset(idx))  # also readies a causal format
    evaluators = build_evaluators(config, base, data, {"test": test, "validation": validation},
                                  dict(zip(idx, ids)), dict(zip(idx, targets)))

    def evaluate(glob, full: bool = True):
        return evaluate_all(evaluators, glob, full)

    labels = list(data.label_names) if task.kind == "classification" else []
    return ServerSide(config, base.method, base.handle, base.initial, evaluate, task=task,
                      tokenizer=base.tokenizer, label_names=labels or None), labels


def connect(grid, run: FlowerRun, say=_say) -> tuple[ServerSide, FlowerTransport]:
    """The server side and its transport, once enough sites have connected."""
    config = run.config
    server, label_names = build_server(config, run.test_path)
    f = config.federation
    secure = None
    if f.secure_aggregation:  # the server then holds the weighted mean of the uploads only
        secure = SummedUploads(server.method, template_state(server.handle, server.initial))
        say(f"secure aggregation (SecAgg+): the server sees only the sum of the sites' uploads; "
            f"updates quantised within ±{f.max_update_norm:g} (federation.max_update_norm)")
    transport = FlowerTransport(grid, label_names, f.clients, run.round_timeout, say=say,
                                secure=secure, max_update_norm=f.max_update_norm)
    if server.method.personalised:
        server.evaluate = personalised_evaluation(transport, server.method, config.federation.clients)
    transport.connect(run.connect_timeout, config.federation.min_clients)
    return server, transport


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, read_run_config(context.run_config))


def serve(grid, run: FlowerRun, say=_say) -> dict:
    """The whole run over `grid`: a new run folder, or (`resume`) the interrupted one's."""
    start = time.perf_counter()
    folder, config, saved = open_folder(run)  # checked before waiting for any site
    say(report.banner(config))
    server, transport = connect(grid, dataclasses.replace(run, config=config), say)
    folder.open()
    try:
        summary = execute(server, transport, folder, say, start, transport.client_facts,
                          saved=saved)
        final = folder.commit()
    except BaseException as err:
        # worth resuming once any site may have trained: a resumed run replays those rounds
        # from each site's ledger, a new run in the same folder would be refused
        keep = folder.resuming or folder.path(ckpt.FILENAME).exists() or transport.last_round >= 0
        folder.abort(keep)
        if keep:
            err.add_note(f"the run so far is kept in '{folder.partial}' — continue it with "
                         "`flwr run <app> <connection> --run-config resume=true`")
        raise
    summary["out"] = str(final)
    say(report.summary_table(summary))
    say(f"run folder: {final}")
    return summary


def open_folder(run: FlowerRun) -> tuple[RunFolder, Config, ckpt.Checkpoint | None]:
    """The run folder, the config to run and the checkpoint to continue from (if any).

    Resuming takes the config saved in `out`.partial/: the run config's must resolve to the
    same one (`threads` may differ), as for `fedlora run --resume`."""
    config = run.config
    if not run.resume:
        out = Path(run.out) if run.out else default_out_dir(config.method.name, config.privacy.epsilon)
        if out.with_name(out.name + PARTIAL).is_dir():
            raise ConfigError(f"out: an interrupted run is in '{out}{PARTIAL}' — continue it with "
                              "`flwr run <app> <connection> --run-config resume=true`, or remove it")
        return RunFolder(out), config, None
    folder = RunFolder(run.out, resume=True)
    config, saved = resume_config(folder, config, None)
    return folder, config, saved
