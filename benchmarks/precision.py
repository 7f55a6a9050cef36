"""bf16 against fp32 (`train.precision`), side by side in one process: fedlora's DP step and the
floor (forward + backward of the same micro-batches), on the same model, data and batches.

Every contender trains every client for `--steps` local steps; repeats rotate the order; the
ratios are medians of the per-repeat ratios (see `throughput.py`). Whether bf16 pays depends on
the hardware: on CPUs without bf16 units (no AVX512-BF16 or AMX) PyTorch emulates it, and the
matmul line of the table says so before any training is timed.

    PYTHONPATH=src python benchmarks/precision.py [key=value ...] [--repeats 3] [--steps 1]
        [--threads 0] [--device cpu] [--methods ffa] [--json FILE]
"""

from __future__ import annotations

import dataclasses
import sys
import time

import common  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
import torch

from fedlora.config import load_config
from fedlora.device import device_of
from fedlora.experiment import build_client, build_experiment, build_trainer
from fedlora.methods import get_method
from throughput import _base, _fedlora, _floor, measure, rates_and_ratios

PRECISIONS = ("fp32", "bf16")


def matmul_seconds(dtype: torch.dtype, device: str, n: int = 512, d: int = 384, reps: int = 5) -> float:
    """Median seconds of one (n × d) @ (d × d) matmul in `dtype` (a hardware check)."""
    a = torch.randn(n, d, device=device).to(dtype)
    b = torch.randn(d, d, device=device).to(dtype)
    times = []
    for _ in range(reps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return common.median(times[1:])


def setup(overrides: list[str], threads: int, methods: list[str], steps: int, device: str,
          key: str = "precision", values: tuple[str, ...] = PRECISIONS, floor_varies: bool = True):
    """Contenders for each method and each value of `train.<key>`: fedlora's DP step, and the
    floor (for each value when `floor_varies`, else once: a key that only changes DP)."""
    config = load_config(None, [f"threads={threads}", f"device={device}", *overrides])
    exp = build_experiment(config)
    nodp = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, epsilon=float("inf")))
    plain = [build_client(nodp, c.cid, c.token_ids, c.labels) for c in exp.clients]
    for p, c in zip(plain, exp.clients):
        p.randomness = c.randomness
    contenders = {}
    for name in methods:
        for value in values:
            cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, **{key: value}))
            base = dataclasses.replace(_base(exp), method=get_method(dataclasses.replace(config.method, name=name)))
            trainer = build_trainer(cfg, base)
            trainer.local_steps = steps
            if floor_varies or value == values[0]:
                contenders[f"floor {name}" + (f" {value}" if floor_varies else "")] = _floor(trainer, plain)
            contenders[f"fedlora {name}, DP, {value}"] = _fedlora(trainer, exp.clients)
    return contenders, {"clients": [c.num_examples for c in exp.clients], "model": config.model.path,
                        "device": str(device_of(exp.model)), "batch_size": config.train.batch_size}


def summarise(runs, methods: list[str], values: tuple[str, ...] = PRECISIONS,
              floor_varies: bool = True) -> dict:
    """Median examples/s per contender, and each value's rate ÷ the first value's, per method."""
    out = {}
    first = values[0]
    for clock in ("wall", "cpu"):
        rate = {n: [r[n].examples / getattr(r[n], clock) for r in runs] for n in runs[0]}
        ratios = {}
        for m in methods:
            kinds = [f"fedlora {m}, DP, "] + ([f"floor {m} "] if floor_varies else [])
            for kind in kinds:
                for value in values[1:]:
                    ratios[f"{kind.strip(', ')}: {value} ex/s ÷ {first} ex/s"] = common.median(
                        [a / b for a, b in zip(rate[kind + value], rate[kind + first])])
        out[clock] = {"examples_per_second": {n: common.median(v) for n, v in rate.items()},
                      "ratios": ratios}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common.side_by_side_parser(__doc__, ["ffa"])
    args = parser.parse_args(argv)
    contenders, info = setup(args.overrides, args.threads, args.methods, args.steps, args.device)
    dev = info["device"]
    mm = {str(d).removeprefix("torch."): matmul_seconds(d, dev) for d in (torch.float32, torch.bfloat16)}
    print(f"clients {info['clients']}, {torch.get_num_threads()} threads, device {dev}; 512×384 @ "
          f"384×384 matmul: fp32 {mm['float32'] * 1e3:.2f} ms, bf16 {mm['bfloat16'] * 1e3:.2f} ms",
          flush=True)
    runs = measure(contenders, args.repeats)
    result = {**summarise(runs, args.methods), "matmul_seconds": mm, "setup": info,
              "repeats": args.repeats, "steps": args.steps, "overrides": args.overrides,
              "machine": common.machine()}
    print(rates_and_ratios(result))
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
