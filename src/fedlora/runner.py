"""The run driver: the round loop over any transport, writing the run folder as it goes.

`execute` is what every runner shares — the in-process simulation (`fedlora.api.run`) and the
Flower ServerApp — from a `ServerSide` (what the server holds) and a transport; it writes
config, metrics, checkpoints and ledgers while the rounds go, then the adapter export
(`export_adapter`) and the summary (`build_summary`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fedlora import report
from fedlora.config import Config, config_to_toml
from fedlora.device import device_of
from fedlora.federation.server_optimizer import ServerOptimizer
from fedlora.federation import checkpoint as ckpt
from fedlora.federation.centering import centering_enabled, fold_center
from fedlora.federation.client import Client
from fedlora.federation.server import Evaluate, FederationState, RoundPlan, Transport, run_rounds
from fedlora.federation.validate import UpdateValidator, template_state
from fedlora.methods import chain, keys
from fedlora.methods.base import GlobalState, Method, State
from fedlora.model import AdapterHandle, base_model_name, count_parameters, save_base_delta
from fedlora.modelcard import write_card
from fedlora.outputs import RunFolder
from fedlora.privacy.ledger import PrivacyLedger, adopt_ledger
from fedlora.privacy.randomness import load_or_create_key
from fedlora.tasks.base import Task


@dataclass
class ServerSide:
    """What the server holds: the method, the adapter every client starts from, the model it
    evaluates on its own held-out data. Never any client's training data."""

    config: Config
    method: Method
    handle: AdapterHandle
    initial: State
    evaluate: Evaluate  # evaluate(glob, full=True): see `fedlora.federation.server.Evaluate`
    majority_accuracy: float | None = None
    task: Task | None = None  # for the task's own exports (a causal LM's merged model)
    tokenizer: object = None
    label_names: list[str] | None = None  # a classifier's classes, in the head's order


def execute(server: ServerSide, transport: Transport, folder: RunFolder, say, start: float,
            facts: Callable[[], list[dict]], clients: Sequence[Client] = (),
            saved: ckpt.Checkpoint | None = None,
            timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The round loop over any transport, writing the run folder as it goes.

    `facts()` gives, per client id, what the summary reports about it: its DP noise
    multiplier, sample rate, steps taken and number of examples (None where unknown).
    `clients` are the clients this process holds (the simulation's), for personal exports;
    their state goes into the checkpoints and each gets a privacy ledger in the run folder.
    `saved` is the checkpoint to continue from. Replies are validated against what the method
    expects before they are aggregated, whatever the transport. `timings`, if given, collects
    the seconds per phase of the round loop (`run_rounds`).
    """
    config = server.config
    if not folder.resuming:
        folder.write_text("config.toml", config_to_toml(config))
    f = config.federation
    plan = RoundPlan(f.rounds, f.clients, f.clients_per_round, f.eval_every, config.seed,
                     f.min_clients, checkpoint_every=f.checkpoint_every,
                     on_bad_update=f.on_bad_update, center_dim=_center_dim(config, server.handle),
                     server_optimizer=ServerOptimizer(f.server_optimizer, f.server_lr,
                                                      f.server_momentum), weighting=f.weighting)
    if saved is not None:
        state = ckpt.restore(saved, clients)
        say(f"resuming after round {saved.round} of {f.rounds} from {folder.partial}")
    else:
        state = FederationState(glob=server.method.init_global(server.initial))
    if clients:
        folder.path("ledger").mkdir(exist_ok=True)
    for client in clients:  # a client's ε never goes below what its ledger says it spent
        client.ledger = PrivacyLedger(folder.path(f"ledger/client-{client.cid}.json"))
        adopt_ledger(client.ledger, client.privacy.accountant)
        if config.privacy.noise == "secret":  # the run folder's private part: never share it
            client.randomness = load_or_create_key(folder.path(f"ledger/client-{client.cid}.key"),
                                                   released=bool(client.ledger.rounds))
    folder.write_jsonl("metrics.jsonl", state.history)  # drops lines past the checkpoint
    initial = _initial_scores(server, state, folder, say)
    validator = UpdateValidator(server.method, template_state(server.handle, server.initial),
                                f.max_update_norm)

    def on_round(record: dict) -> None:
        folder.append_jsonl("metrics.jsonl", record)
        say(report.round_line(record, config))

    def save(state: FederationState) -> None:
        ckpt.save_checkpoint(folder.path(ckpt.FILENAME), config, state, clients,
                             seconds=state.seconds_before + time.perf_counter() - start)
        transport.checkpointed(len(state.history))

    if saved is not None:  # what the checkpoint holds will never be asked for again
        transport.checkpointed(saved.round)

    def on_center(info: dict) -> None:
        say(report.center_line(info, config))

    run_rounds(server.method, state, transport, plan, server.evaluate, on_round,
               validator=validator, checkpoint=save, on_center=on_center, timings=timings)
    export_adapter(server, state, folder.path("adapter"), clients)
    # after a resume: the earlier attempts' time up to their last checkpoint, plus this one's
    summary = build_summary(server, state, facts(),
                            state.seconds_before + time.perf_counter() - start)
    if initial is not None:
        summary["initial"] = initial
    clients_dir = folder.path("clients")
    own = sorted(clients_dir.glob("*/adapter")) if clients_dir.is_dir() else []
    for path in [folder.path("adapter"), folder.path("merged"), *own]:
        # PEFT's empty template gives way to what is known
        write_card(path, config, summary, base_model_name(config.model.path),
                   merged=path.name == "merged", site=path.parent.name if path in own else None)
    folder.write_json("summary.json", summary)
    folder.path(ckpt.FILENAME).unlink(missing_ok=True)  # the results supersede it
    return summary


def _center_dim(config: Config, handle: AdapterHandle) -> int:
    """The feature size μ has, if this run centres the classifier's features (else 0)."""
    if not centering_enabled(config) or keys.CENTER not in handle.statistics:
        return 0
    return handle.statistics[keys.CENTER].shape[0]


def _initial_scores(server: ServerSide, state: FederationState, folder: RunFolder,
                    say) -> dict | None:
    """With `federation.evaluate_initial`: the starting model's scores (kept in the run folder,
    so a resumed run reports the same ones without evaluating again)."""
    if not server.config.federation.evaluate_initial:
        return None
    path = folder.path("initial_scores.json")
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    if state.history:  # resumed past round 1 without them: the starting model is gone
        return None
    scores = server.evaluate(state.glob, full=True)  # reported beside the final (whole-set) score
    folder.write_json("initial_scores.json", scores)
    say(report.initial_line(scores, server.config))
    return scores


def client_facts(client: Client) -> dict:
    return {"noise_multiplier": client.privacy.noise_multiplier,
            "sample_rate": client.privacy.sample_rate, "steps": client.steps,
            "size": client.num_examples}


def export_adapter(server: ServerSide, state: FederationState, path: Path,
                   clients: Sequence[Client] = ()) -> None:
    """The global adapter (LoRA A, B and the head) in PEFT's format, loadable with
    `PeftModel.from_pretrained(base, path)`.

    The feature centre μ (`fedlora.federation.centering`) is folded into the head's bias, so the
    adapter loads on a fresh base model. Methods that change base weights (FedEx-LoRA, FLoRA,
    full) and chains (their merged links, `method.chain_every`) also write
    `base_delta.safetensors` next to `adapter/`: Δ keyed by the plain model's parameter names,
    to add to the base before loading the adapter (`fedlora.model.apply_base_delta`).
    The task may add files of its own: a causal LM writes `merged/`, the base model with the
    adapter (and any base change) folded in, for plain `AutoModelForCausalLM.from_pretrained`.
    A method whose training-time model has a structure of its own (ResLoRA's residual paths)
    rewrites the saved adapter as the plain LoRA that computes the same (`Method.finish_export`).
    Personalised methods also write each client's own adapter to `clients/<k>/adapter`, for
    the clients this process holds (all of them in simulation; none on a Flower server, where
    personal tensors never leave their sites).
    """
    glob, method = state.glob, server.method
    handle = server.handle
    if not method.peft_export:
        _export_mixture(server, glob, path, clients)
        return
    handle.install(fold_center({**server.initial, **glob.tensors()}))
    handle.model.save_pretrained(str(path))
    method.finish_export(path)  # e.g. ResLoRA's residual paths merged into plain LoRA
    if server.task is not None:
        server.task.export(handle.model, server.tokenizer, path.parent)
    change = base_change(glob)
    if change:
        save_base_delta(change, path.parent / "base_delta.safetensors")
    if method.personalised:
        for client in clients:
            handle.install(fold_center(method.client_state(
                server.initial, client.personal, method.download(glob, client.cid), client.cid)))
            own = path.parent / "clients" / str(client.cid) / "adapter"
            handle.model.save_pretrained(str(own))
            method.finish_export(own)
    handle.install({**server.initial, **glob.tensors()})


def _export_mixture(server: ServerSide, glob: GlobalState, path: Path,
                    clients: Sequence[Client]) -> None:
    """A mixture of experts (mole) has no PEFT form (its gate weighs the experts per token):
    every tensor of the model goes to `mixture.safetensors` by state key, with μ folded into the
    head — the shared experts with the initial (uniform) gate in `adapter/`, each client's own
    model in `clients/<k>/adapter/`; `fedlora predict` / `evaluate` rebuild and load them."""
    from fedlora.mixture import save_mixture

    method = server.method
    save_mixture(fold_center({**server.initial, **glob.tensors()}), path)
    for client in clients:
        own = method.client_state(server.initial, client.personal,
                                  method.download(glob, client.cid), client.cid)
        save_mixture(fold_center(own), path.parent / "clients" / str(client.cid) / "adapter")


def base_change(glob: GlobalState) -> State:
    """Every change to the pre-trained weights: the method's base deltas plus a chain's merged
    links (Σ s·B_i·A_i), in the weights' own dtype."""
    change = {k: v.clone() for k, v in glob.base_delta.items()}
    for key, delta in chain.base_change(glob.links).items():
        dtype = change[key].dtype if key in change else glob.links[next(iter(glob.links))].dtype
        change[key] = (change[key].double() + delta if key in change else delta).to(dtype)
    return change


def build_summary(server: ServerSide, state: FederationState, facts: list[dict],
                  seconds: float) -> dict[str, Any]:
    config, last = server.config, (state.history[-1] if state.history else {})
    # the last evaluated round is the last round, scored on the whole held-out set (run_rounds)
    evaluated = [h for h in state.history if h.get("test_accuracy") is not None]
    final = evaluated[-1] if evaluated else {}
    shapes = server.handle.shapes()
    # what one client trains (client 0's: mole's clients each train their own expert)
    trained = sum(math.prod(s) for k, s in shapes.items() if server.method.client_trains(k, 0, 0))
    column = lambda key: [c.get(key) for c in facts]  # noqa: E731
    return {
        "method": config.method.name,
        "task": config.task.kind,
        "metric": server.task.metric if server.task is not None else "accuracy",
        # the head's output k is class label_names[k] (`fedlora predict` names its answers so)
        "label_names": server.label_names,
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "test_accuracy_per_client": final.get("test_accuracy_per_client"),
        "validation_accuracy": final.get("validation_accuracy"),
        "majority_accuracy": server.majority_accuracy,
        "epsilon": max(state.epsilon.values(), default=0.0),
        "epsilon_target": config.privacy.epsilon,
        "epsilon_per_client": [state.epsilon.get(c, 0.0) for c in range(len(facts))],
        "delta": config.privacy.delta,
        "accountant": config.privacy.accountant,
        # "seeded": ε holds only against parties who do not know the seed (docs/privacy.md)
        "noise": config.privacy.noise,
        "clip": config.privacy.clip,
        "noise_multiplier": column("noise_multiplier"),
        "sample_rates": column("sample_rate"),
        "steps": column("steps"),
        "client_sizes": column("size"),
        "feature_center": state.center or None,
        "rounds": len(state.history),
        "rounds_planned": config.federation.rounds,
        "clients": config.federation.clients,
        "bytes_uploaded": state.bytes_uploaded,
        "bytes_downloaded": state.bytes_downloaded,
        "trainable_parameters": trained,
        "adapter_parameters": count_parameters(server.initial),
        "refused": {str(k): v for h in state.history for k, v in h.get("refused", {}).items()},
        "rejected": {f"round {h['round']}, client {k}": v for h in state.history
                     for k, v in h.get("rejected", {}).items()},
        "failed": {str(k): v for h in state.history for k, v in h.get("failed", {}).items()},
        "seed": config.seed,
        "device": str(device_of(server.handle.model)),
        "wall_seconds": round(seconds, 2),
        "private": not math.isinf(config.privacy.epsilon),
        "last_round": last.get("round"),
    }
