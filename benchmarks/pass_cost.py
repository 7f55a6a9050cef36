"""What one DP-SGD pass costs beyond its tokens, in tokens, on the device at hand: the number
`train.micro_batch_size = 0` and `length_groups` plan micro-batches with
(`fedlora.data.batching.DEVICE_PASS_COST_TOKENS`).

One pass is what the client runs per micro-batch: forward, backward and the clipped sum of the
per-example gradients (`fedlora.privacy.ghost.clipped_sum`). Passes of `--sizes` examples of one
client's texts, padded to `--length` tokens, are timed (median over `--repeats`), and a line
time ≈ a + b·tokens is fitted by least squares: a/b is the pass's fixed cost in tokens. On a
CPU it is small (compute grows with the tokens); on a GPU the tokens run in parallel and a/b is
large, so fewer and larger passes pay.

    PYTHONPATH=src python benchmarks/pass_cost.py [key=value ...] [--sizes 8 16 32 64 128 256]
        [--length 32] [--repeats 3] [--threads 0] [--device cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time

import common  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
import numpy as np
import torch

from fedlora.config import load_config
from fedlora.data.batching import micro_batching
from fedlora.device import device_of
from fedlora.experiment import build_experiment
from fedlora.privacy.ghost import clipped_sum


def fit_line(tokens: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of seconds ≈ a + b·tokens."""
    b, a = np.polyfit(np.asarray(tokens, dtype=float), np.asarray(seconds, dtype=float), 1)
    return float(a), float(b)


def time_pass(exp, client, idx: list[int], repeats: int) -> float:
    trainer = exp.trainer
    method = exp.method
    trainer.handle.install(exp.initial)
    trainer.handle.set_trainable(lambda k: method.trainable(k, 0))
    trainer.model.train()
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        common.synchronize()
        t = time.perf_counter()
        clipped_sum(trainer.model, lambda: trainer.per_example_loss(client, idx), 1.0,
                    exp.config.train.ghost_clipping)
        common.synchronize()
        times.append(time.perf_counter() - t)
    trainer.model.eval()
    trainer.handle.set_trainable(lambda k: False)
    return common.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--length", type=int, default=32, help="tokens per text (texts cut to it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (config key device)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    exp = build_experiment(load_config(None, [f"threads={args.threads}", f"device={args.device}",
                                              *args.overrides]))
    client = max(exp.clients, key=lambda c: c.num_examples)
    long_enough = [i for i, t in enumerate(client.token_ids) if len(t) >= args.length]
    if len(long_enough) < max(args.sizes):
        raise SystemExit(f"only {len(long_enough)} texts of client {client.cid} have ≥ {args.length} "
                         f"tokens; lower --length or the largest of --sizes")
    client.token_ids = [t[:args.length] for t in client.token_ids]  # every text exactly --length
    rows, tokens, seconds = [], [], []
    for size in args.sizes:
        s = time_pass(exp, client, long_enough[:size], args.repeats)
        rows.append((size, size * args.length, s * 1e3, size / s))
        tokens.append(size * args.length)
        seconds.append(s)
    a, b = fit_line(tokens, seconds)
    device = device_of(exp.model)
    print(common.table(["examples", "tokens", "ms per pass", "examples/s"], rows))
    planned = micro_batching(0, device.type)
    print(f"\nfit: {a * 1e3:.2f} ms + {b * 1e6:.3f} µs per token → a pass costs {a / b:.0f} tokens "
          f"beyond its own on {device} (fedlora plans with {planned[1]:.0f}; micro-batch {planned[0]})")
    common.write_json(args.json, {
        "rows": [dict(zip(("examples", "tokens", "seconds"), (r[0], r[1], r[2] / 1e3))) for r in rows],
        "fixed_seconds": a, "seconds_per_token": b, "pass_cost_tokens": a / b,
        "planned": {"micro_batch": planned[0], "pass_cost_tokens": planned[1]},
        "device": str(device), "threads": torch.get_num_threads(), "overrides": args.overrides,
        "machine": common.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
