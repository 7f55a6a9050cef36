"""What each local optimiser costs, side by side in one process: fedlora's DP step of FFA-LoRA
and LoRA with Adam, LoRA-Pro and LoRA-RITE (`train.optimizer`), GaLore (`method.name=galore`:
projected Adam on the target modules' full matrices) and full fine-tuning (Adam on every
weight), on the same model, data and Poisson batches, beside each method's floor (forward +
backward of the same micro-batches, nothing else).

Per variant it reports examples/s (wall and CPU time), the DP step's time as a multiple of the
same method's step with Adam, and the memory the optimiser holds after a local step (every
tensor of its state: Adam's two moments, LoRA-Pro's and LoRA-RITE's per-layer state, GaLore's
projectors and projected moments), next to the trained parameters' size. Repeats rotate the
order; ratios are medians of per-repeat ratios (see `throughput.py`).

    PYTHONPATH=src python benchmarks/optimizers.py [key=value ...] [--repeats 3] [--steps 1]
        [--threads 0] [--variants ffa:adam ffa:lora_pro ...] [--json FILE]
"""

from __future__ import annotations

import dataclasses
import sys

import common  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
import torch
from torch import Tensor

from fedlora.config import load_config
from fedlora.experiment import build_client, build_experiment, build_trainer
from fedlora.methods import get_method
from throughput import _base, _fedlora, _floor, measure, rates_and_ratios

VARIANTS = ["ffa:adam", "ffa:lora_pro", "ffa:lora_rite", "lora:adam", "lora:lora_pro",
            "lora:lora_rite", "galore:adam", "full:adam"]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor an optimiser keeps between steps (its `state`, a LoRA
    optimiser's per-layer state and the Adam it runs for the head)."""
    seen: dict[int, int] = {}

    def walk(value) -> None:
        if isinstance(value, Tensor):
            seen[value.data_ptr()] = value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(list(optimizer.state.values()))
    walk(getattr(optimizer, "_layer_state", []))
    rest = getattr(optimizer, "rest", None)
    if rest is not None:
        walk(list(rest.state.values()))
    return sum(seen.values())


def _variant(config, name: str):
    method, optimizer = name.split(":")
    return dataclasses.replace(config, method=dataclasses.replace(config.method, name=method),
                               train=dataclasses.replace(config.train, optimizer=optimizer))


def setup(overrides: list[str], threads: int, variants: list[str], steps: int):
    config = load_config(None, [f"threads={threads}", "device=cpu", *overrides])
    exp = build_experiment(config)
    nodp = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, epsilon=float("inf")))
    plain = [build_client(nodp, c.cid, c.token_ids, c.labels) for c in exp.clients]
    for p, c in zip(plain, exp.clients):
        p.randomness = c.randomness
    contenders, memory, floors = {}, {}, {}
    for name in variants:
        cfg = _variant(config, name)
        method = get_method(cfg.method)
        trainer = build_trainer(cfg, dataclasses.replace(_base(exp), method=method))
        trainer.local_steps = steps
        memory[name] = _watch_optimizer(trainer)
        contenders[f"fedlora {name}, DP"] = _fedlora(trainer, exp.clients)
        method_name = name.split(":")[0]
        if method_name not in floors:
            floors[method_name] = contenders[f"floor {method_name}"] = _floor(trainer, plain)
    info = {"clients": [c.num_examples for c in exp.clients], "model": config.model.path,
            "batch_size": config.train.batch_size, "micro_batch_size": exp.trainer.micro_batch}
    return contenders, memory, info


def _watch_optimizer(trainer) -> dict:
    """Record, for each optimiser the trainer builds, its state's and its parameters' bytes
    after the round (the state is built lazily, at the first step)."""
    seen: dict = {}
    build, train = trainer._optimizer, trainer.train

    def building(keys, round):
        seen["optimizer"] = optimizer = build(keys, round)
        seen["parameter_bytes"] = sum(p.numel() * p.element_size()
                                      for g in optimizer.param_groups for p in g["params"])
        return optimizer

    def training(*args, **kwargs):
        out = train(*args, **kwargs)
        seen["state_bytes"] = state_bytes(seen.pop("optimizer"))
        return out

    trainer._optimizer, trainer.train = building, training
    return seen


def summarise(runs, variants: list[str], memory: dict) -> dict:
    out: dict = {}
    for clock in ("wall", "cpu"):
        rate = {n: [r[n].examples / getattr(r[n], clock) for r in runs] for n in runs[0]}
        ratios = {}
        for name in variants:
            method, optimizer = name.split(":")
            dp = rate[f"fedlora {name}, DP"]
            ratios[f"{name}: floor time ÷ DP time"] = common.median(
                [a / b for a, b in zip(dp, rate[f"floor {method}"])])
            if optimizer != "adam" and f"{method}:adam" in variants:
                ratios[f"{name}: DP time ÷ {method}:adam DP time"] = common.median(
                    [b / a for a, b in zip(dp, rate[f"fedlora {method}:adam, DP"])])
        out[clock] = {"examples_per_second": {n: common.median(v) for n, v in rate.items()},
                      "ratios": ratios}
    out["memory_mb"] = {n: {"optimizer_state": round(m["state_bytes"] / 2**20, 3),
                            "trained_parameters": round(m["parameter_bytes"] / 2**20, 3)}
                        for n, m in memory.items()}
    out["runs"] = [{n: {"wall": round(m.wall, 3), "cpu": round(m.cpu, 3), "examples": m.examples}
                    for n, m in r.items()} for r in runs]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common.side_by_side_parser(__doc__, [])
    parser.add_argument("--variants", nargs="+", default=VARIANTS,
                        help="method:optimizer pairs, e.g. ffa:lora_pro galore:adam")
    args = parser.parse_args(argv)
    bad = [v for v in args.variants if v.count(":") != 1]
    if bad:
        parser.error(f"--variants {bad}: expected METHOD:OPTIMIZER, e.g. ffa:lora_pro")
    contenders, memory, info = setup(args.overrides, args.threads, args.variants, args.steps)
    print(f"clients {info['clients']}, {torch.get_num_threads()} threads", flush=True)
    runs = measure(contenders, args.repeats)
    result = {**summarise(runs, args.variants, memory), "setup": info, "repeats": args.repeats,
              "steps": args.steps, "overrides": args.overrides, "machine": common.machine()}
    print(rates_and_ratios(result))
    print("\n" + common.table(["variant", "optimizer state, MB", "trained parameters, MB"],
                              [(n, m["optimizer_state"], m["trained_parameters"])
                               for n, m in result["memory_mb"].items()]))
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
