"""What secret DP noise costs per DP-SGD step, against the seeded noise it replaced.

For a config's trainable parameters (default: the default job, FFA-LoRA's B and the head;
`--method full`: every weight of the model), one step's Gaussian noise is drawn from

* seeded: a torch generator seeded from the run's seed (what fedlora drew before the secret
  mode existed; `privacy.noise = "seeded"`), and
* secret: the client's ChaCha20 stream, four Box–Muller draws per coordinate
  (`fedlora.privacy.randomness`; the default),

side by side, alternating, `--repeats` times each; the table gives the median seconds per
step, and, for scale, the median seconds of one whole DP-SGD step of client 0 (seeded noise)
on the same config — so the last column is the secret noise's extra cost as a share of a step.

    PYTHONPATH=src python benchmarks/noise_cost.py [--method ffa full] [--repeats 5]
        [--threads 0] [--json FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import math
import time

import common
import torch

from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.privacy.dpsgd import gaussian_noise
from fedlora.privacy.randomness import SecretRandomness, SeededRandomness


def trainable_shapes(exp) -> dict[str, tuple[int, ...]]:
    handle, method = exp.trainer.handle, exp.method
    keys = handle.set_trainable(lambda k: method.trainable(k, 0))
    shapes = {exp.trainer.names[k]: tuple(handle.param(k).shape) for k in keys}
    handle.set_trainable(lambda k: False)
    return shapes


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_step(exp) -> float:
    """One whole DP-SGD step of client 0 from the initial adapter (seeded noise)."""
    trainer, client = exp.trainer, exp.clients[0]
    batch = trainer.poisson_batches(client, 0)[0]
    handle, method = trainer.handle, exp.method
    keys = handle.set_trainable(lambda k: method.trainable(k, 0))
    noise = SeededRandomness(0, 0).stream("noise", 0)
    took = seconds(lambda: trainer._step(client, batch, keys, noise))
    for k in keys:
        handle.param(k).grad = None
    handle.set_trainable(lambda k: False)
    return took


def measure(method: str, overrides: list[str], repeats: int) -> dict:
    config = load_config(None, [f"method.name={method}", "privacy.noise=seeded", *overrides])
    exp = build_experiment(config)
    shapes = trainable_shapes(exp)
    std = exp.clients[0].privacy.noise_multiplier * config.privacy.clip
    seeded, secret, steps = [], [], []
    for r in range(repeats):
        seeded.append(seconds(lambda: gaussian_noise(shapes, std, SeededRandomness(0, 0).stream("noise", r))))
        secret.append(seconds(lambda: gaussian_noise(shapes, std, SecretRandomness.fresh().stream("noise", r))))
    for _ in range(max(1, min(repeats, 3))):
        steps.append(one_step(exp))
    step = common.median(steps)
    extra = common.median(secret) - common.median(seeded)
    return {"method": method, "coordinates": sum(math.prod(s) for s in shapes.values()),
            "seeded_s": common.median(seeded), "secret_s": common.median(secret),
            "step_s": step, "extra_share_of_step": extra / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", nargs="+", default=["ffa", "full"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(m, args.overrides, args.repeats) for m in args.method]
    print(common.table(
        ["method", "noised coordinates", "seeded noise s/step", "secret noise s/step",
         "whole DP step s", "secret's extra, share of a step"],
        [[r["method"], r["coordinates"], r["seeded_s"], r["secret_s"], r["step_s"],
          f"{100 * r['extra_share_of_step']:.1f}%"] for r in rows]))
    common.write_json(args.json, {"threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
