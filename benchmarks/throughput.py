"""Training throughput (examples per second), side by side in one process, on the same model
and data: fedlora (each method, DP on and off), the hand-written PEFT + Opacus + FedAvg loop
(`reference_opacus.py`, texts padded to `max_length`), and the floor.

The floor is the forward and backward pass of the same model over the same Poisson batches as
fedlora, in the same micro-batches (grouped by length, each padded only to its own longest
text: ~96% of the computed tokens are real on the default data), with the same parameters
requiring gradients: no DP, no optimizer, no federation.

Every contender trains every client of the config (default: the default job's 3 clients) for
`--steps` local steps from the initial adapter; fedlora and the floor see identical batches
(`LocalTrainer.poisson_batches`), the reference draws its own at the same rate (Opacus's
loader). A repeat runs every contender once, in a rotated order; the table gives the median
over repeats, and each ratio is the median of the per-repeat ratios (noise on a shared machine
hits neighbours alike). Both clocks are reported: wall time, and the process's CPU time, which
on a machine shared with other jobs is the steadier measure of work (with one thread it equals
wall time on an idle machine).

On a GPU (`--device cuda`) every contender computes there; the clocks wait for the GPU to
finish (`torch.cuda.synchronize`) before they are read, and CPU time then counts only the
host's share of the work.

    PYTHONPATH=src python benchmarks/throughput.py [key=value ...] [--repeats 3] [--steps 1]
        [--threads 0] [--device cpu] [--methods ffa lora] [--reference ffa lora]
        [--opacus-modes hooks ghost] [--json FILE]

Any model folder or config works (`model.path=DIR`; a causal LM with `task.kind=causal` and its
pair data): the reference then trains with the same answer-token loss.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import common  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
import torch

from fedlora.config import load_config
from fedlora.device import device_of
from fedlora.experiment import build_client, build_experiment, build_trainer
from fedlora.methods import get_method
from fedlora.privacy.accountant import PrivacyAccountant
from fedlora.seeding import derive_seed
from reference_opacus import OpacusClient, OpacusFederation

Contender = Callable[[int, bool], "Measure"]  # (round, warm-up?) → what it took


class Measure:
    """Wall-clock and CPU seconds of a contender's local training, and the examples it saw.
    CPU time (this process's, all threads) is the steadier figure on a shared machine."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.examples = 0
        self._marks = (0.0, 0.0)

    def start(self) -> None:
        common.synchronize()
        self._marks = (time.perf_counter(), time.process_time())

    def stop(self, examples: int) -> None:
        common.synchronize()  # a GPU's queued work belongs to what was timed
        self.wall += time.perf_counter() - self._marks[0]
        self.cpu += time.process_time() - self._marks[1]
        self.examples += examples

    def add(self, wall: float, cpu: float, examples: int) -> None:
        self.wall, self.cpu, self.examples = self.wall + wall, self.cpu + cpu, self.examples + examples

TARGETS = {"speedup_over_reference": 2.0, "floor_over_fedlora": 0.77, "dp_overhead": 0.15}


def reference_name(method: str, mode: str) -> str:
    """The reference contender's name: Opacus's default (hooks) mode keeps the plain name."""
    return f"PEFT+Opacus {method}" if mode == "hooks" else f"PEFT+Opacus {mode} {method}"


def setup(overrides: list[str], threads: int, methods: list[str], reference: list[str],
          steps: int, device: str = "cpu", modes: tuple[str, ...] = ("hooks",),
          ) -> tuple[dict[str, Contender], dict]:
    config = load_config(None, [f"threads={threads}", f"device={device}", *overrides])
    exp = build_experiment(config)
    if not threads:
        torch.set_num_threads(torch.get_num_threads())
    nodp = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, epsilon=float("inf")))
    plain = [build_client(nodp, c.cid, c.token_ids, c.labels) for c in exp.clients]
    for p, c in zip(plain, exp.clients):  # the same batches and dropout as the DP clients
        p.randomness = c.randomness
    contenders: dict[str, Contender] = {}
    pristine = exp.model  # the reference copies the model before fedlora has trained anything
    for name in reference:
        for mode in modes:
            contenders[reference_name(name, mode)] = _reference(
                config, exp, get_method(_named(config, name)), pristine, steps, mode)
    for name in methods:
        method = get_method(_named(config, name))
        trainer = build_trainer(config, dataclasses.replace(_base(exp), method=method))
        trainer.local_steps = steps
        contenders[f"floor {name}"] = _floor(trainer, plain)
        contenders[f"fedlora {name}, DP"] = _fedlora(trainer, exp.clients)
        contenders[f"fedlora {name}, no DP"] = _fedlora(trainer, plain)
    sizes = [c.num_examples for c in exp.clients]
    info = {"clients": sizes, "sigma": [c.privacy.noise_multiplier for c in exp.clients],
            "sample_rate": [c.privacy.sample_rate for c in exp.clients],
            "batch_size": config.train.batch_size, "micro_batch_size": exp.trainer.micro_batch,
            "max_length": config.model.max_length, "model": config.model.path,
            "task": exp.task.kind, "opacus_modes": list(modes),
            "device": str(device_of(exp.model)),
            "padding": _padding(exp, steps)}
    return contenders, info


def _named(config, name: str):
    return dataclasses.replace(config.method, name=name)


def _base(exp):
    """The pieces `build_trainer` reads, from an experiment (one model for every trainer)."""
    from fedlora.experiment import Base

    return Base(exp.model, exp.trainer.handle, exp.initial, exp.method, exp.tokenizer,
                exp.trainer.pad_id, exp.model_path, exp.task)


def _fedlora(trainer, clients) -> Contender:
    """fedlora's local round, as the transport calls it (install, DP-SGD steps, upload)."""
    method = trainer.method
    glob = method.init_global(trainer.initial)

    def run(round: int, warm: bool) -> Measure:
        m = Measure()
        for client in clients[:1] if warm else clients:
            client.privacy.accountant = PrivacyAccountant(client.privacy.accountant.kind)  # budget
            examples = sum(map(len, trainer.poisson_batches(client, round)))
            download = method.download(glob, client.cid)
            m.start()
            trainer.train(client, download, round)
            m.stop(examples)
        return m

    return run


def _floor(trainer, clients) -> Contender:
    """Forward + backward of the same micro-batches, nothing else."""
    handle, method = trainer.handle, trainer.method

    def run(round: int, warm: bool) -> Measure:
        m = Measure()
        handle.install(trainer.initial)
        params = [handle.param(k) for k in handle.set_trainable(lambda k: method.trainable(k, round))]
        trainer.model.train()
        for client in clients[:1] if warm else clients:
            torch.manual_seed(client.randomness.torch_seed("dropout", round))
            batches = trainer.poisson_batches(client, round)
            chunks = [trainer._micro_batches(client, b) for b in batches]
            m.start()
            for batch, parts in zip(batches, chunks):
                for idx in parts:
                    (trainer.per_example_loss(client, idx).sum() / len(batch)).backward()
            m.stop(sum(map(len, batches)))
            for p in params:
                p.grad = None
        trainer.model.eval()
        handle.set_trainable(lambda k: False)
        return m

    return run


def _reference(config, exp, method, model, steps: int, mode: str = "hooks") -> Contender:
    """PEFT + Opacus (in Opacus's `mode`) on the same model, data, batch size, clip and σ (per
    client), with the task's loss."""
    names = exp.trainer.handle.param_names()  # state key → parameter name
    wanted = {names[k] for k in names if method.trainable(k, 0)}
    trainable = lambda name: name in wanted  # noqa: E731
    t = config.train
    clients = [OpacusClient(model, trainable, c.token_ids, c.labels, max_length=config.model.max_length,
                            pad_id=exp.trainer.pad_id, batch_size=t.batch_size,
                            physical_batch_size=exp.trainer.micro_batch,
                            noise_multiplier=c.privacy.noise_multiplier, clip=config.privacy.clip,
                            lr=t.lr, seed=derive_seed(config.seed, "reference", c.cid),
                            device=device_of(model), task=exp.task.kind, mode=mode)
               for c in exp.clients]
    federation = OpacusFederation(clients)

    def run(round: int, warm: bool) -> Measure:
        m = Measure()
        federation.round(steps, m.add, only=1 if warm else None)
        return m

    return run


def _padding(exp, steps: int) -> dict:
    """Real tokens as a share of the tokens computed: fedlora's micro-batches vs max_length."""
    real = padded = 0
    for client in exp.clients:
        for batch in exp.trainer.poisson_batches(client, 0)[:steps]:
            for idx in exp.trainer._micro_batches(client, batch):
                lengths = [len(client.token_ids[i]) for i in idx]
                real += sum(lengths)
                padded += max(lengths) * len(lengths)
    total = len(exp.clients)
    mean_len = sum(len(t) for c in exp.clients for t in c.token_ids) / sum(c.num_examples for c in exp.clients)
    return {"micro_batches": round(real / padded, 3) if padded else None,
            "max_length": round(mean_len / exp.config.model.max_length, 3), "clients": total}


def measure(contenders: dict[str, Contender], repeats: int) -> list[dict[str, Measure]]:
    names = list(contenders)
    for name in names:  # warm-up: first calls allocate and pick kernels
        contenders[name](10_000, True)
    runs = []
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        results = {}
        for name in order:
            m = results[name] = contenders[name](rep, False)
            print(f"  repeat {rep + 1}: {name:<22s} {m.examples:6d} examples  wall {m.wall:7.2f} s "
                  f"({m.examples / m.wall:6.1f} ex/s)  CPU {m.cpu:7.2f} s "
                  f"({m.examples / m.cpu:6.1f} ex/s)", flush=True)
        runs.append(results)
    return runs


def summarise(runs: list[dict[str, Measure]], methods: list[str], reference: list[str],
              modes: tuple[str, ...] = ("hooks",)) -> dict:
    """Medians over repeats of each contender's rate, and of each per-repeat ratio; with several
    Opacus modes, also against the fastest of them in each repeat."""
    names = list(runs[0])
    out: dict = {}
    for clock in ("wall", "cpu"):
        rate = {n: [r[n].examples / getattr(r[n], clock) for r in runs] for n in names}
        ratios: dict[str, float] = {}
        for m in methods:
            dp, nodp, floor = f"fedlora {m}, DP", f"fedlora {m}, no DP", f"floor {m}"
            if m in reference:
                for mode in modes:
                    ref = reference_name(m, mode)
                    ratios[f"{m}: fedlora DP ex/s ÷ {ref.removesuffix(' ' + m)} ex/s"] = common.median(
                        [a / b for a, b in zip(rate[dp], rate[ref])])
                if len(modes) > 1:
                    fastest = [max(r) for r in zip(*(rate[reference_name(m, x)] for x in modes))]
                    ratios[f"{m}: fedlora DP ex/s ÷ fastest PEFT+Opacus ex/s"] = common.median(
                        [a / b for a, b in zip(rate[dp], fastest)])
            ratios[f"{m}: floor time ÷ fedlora DP time"] = common.median(
                [a / b for a, b in zip(rate[dp], rate[floor])])  # identical batches
            ratios[f"{m}: DP overhead (no-DP ex/s ÷ DP ex/s − 1)"] = common.median(
                [a / b - 1 for a, b in zip(rate[nodp], rate[dp])])
        out[clock] = {"examples_per_second": {n: common.median(v) for n, v in rate.items()},
                      "ratios": ratios}
    out["runs"] = [{n: {"wall": round(m.wall, 3), "cpu": round(m.cpu, 3), "examples": m.examples}
                    for n, m in r.items()} for r in runs]
    return out


def rates_and_ratios(result: dict) -> str:
    """The two tables every side-by-side speed benchmark prints: each contender's examples/s
    (wall and CPU), and the ratios (medians over repeats)."""
    wall, cpu = result["wall"], result["cpu"]
    rates = common.table(["contender", "examples/s (wall)", "examples/s (CPU)"],
                         [(n, wall["examples_per_second"][n], cpu["examples_per_second"][n])
                          for n in wall["examples_per_second"]])
    ratios = common.table(["ratio (median over repeats)", "wall", "CPU"],
                          [(k, v, cpu["ratios"][k]) for k, v in wall["ratios"].items()])
    return f"{rates}\n\n{ratios}"


def main(argv: list[str] | None = None) -> int:
    parser = common.side_by_side_parser(__doc__, ["ffa", "lora"])
    parser.add_argument("--reference", nargs="*", default=["ffa"],
                        help="methods to run the PEFT + Opacus reference for")
    parser.add_argument("--opacus-modes", nargs="+", default=["hooks"], choices=["hooks", "ghost"],
                        help="Opacus's per-example gradient modes to run the reference in: hooks "
                             "(materialised, its default) and/or ghost (ghost clipping)")
    args = parser.parse_args(argv)
    modes = tuple(dict.fromkeys(args.opacus_modes))
    contenders, info = setup(args.overrides, args.threads, args.methods, args.reference, args.steps,
                             args.device, modes)
    print(f"clients {info['clients']}, batch {info['batch_size']}, σ "
          f"{[round(s, 3) for s in info['sigma']]}, {torch.get_num_threads()} threads, "
          f"device {info['device']}", flush=True)
    runs = measure(contenders, args.repeats)
    result = {**summarise(runs, args.methods, args.reference, modes), "setup": info,
              "repeats": args.repeats, "steps": args.steps, "overrides": args.overrides,
              "machine": common.machine(), "targets": TARGETS}
    print(rates_and_ratios(result))
    print(f"\nreal tokens / computed tokens: fedlora micro-batches {info['padding']['micro_batches']}, "
          f"padded to max_length {info['padding']['max_length']}")
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
