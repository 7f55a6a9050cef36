"""How much noise each accountant asks for, on a config's clients (default: the default job).

For every client of the config's split (its size n_k, q_k = batch/n_k, the planned steps, and
the feature-centring query when the config has one) and each ε, the noise multiplier σ_k each
accountant calibrates (`rdp`, `prv`, `pld`), and the seconds the calibration took. Less σ at the
same ε is more signal per step: σ_rdp/σ is the factor by which the tighter accountant cuts the
noise's standard deviation. No model is loaded and nothing is trained.

    PYTHONPATH=src python benchmarks/accountants.py [key=value ...] [--epsilons 1,3,6] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import common

from fedlora.config import ACCOUNTANTS, load_config
from fedlora.experiment import load_data, split_data
from fedlora.privacy.plan import plan_client_privacy


def client_sizes(config) -> list[int]:
    return [len(part) for part in split_data(load_data(config), config).clients]


def measure(config, epsilons: list[float]) -> list[dict]:
    sizes, rows = client_sizes(config), []
    steps = config.federation.rounds * config.federation.local_steps
    center = config.model.center_examples if config.model.center != "off" else 0
    for eps in epsilons:
        for kind in ACCOUNTANTS:
            privacy = dataclasses.replace(config.privacy, epsilon=eps, accountant=kind)
            for k, n in enumerate(sizes):
                start = time.perf_counter()
                plan = plan_client_privacy(privacy, n, config.train.batch_size, steps, center)
                rows.append({"epsilon": eps, "accountant": kind, "client": k, "examples": n,
                             "sample_rate": plan.sample_rate, "sigma": plan.noise_multiplier,
                             "seconds": time.perf_counter() - start})
    base = {(r["epsilon"], r["client"]): r["sigma"] for r in rows if r["accountant"] == "rdp"}
    for r in rows:
        r["rdp_over_this"] = base[(r["epsilon"], r["client"])] / r["sigma"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--epsilons", default="1,3,6", help="comma-separated ε (default: 1,3,6)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    config = load_config(None, args.overrides)
    rows = measure(config, [float(e) for e in args.epsilons.split(",")])
    print(common.table(["ε", "accountant", "client", "n_k", "q_k", "σ_k", "σ_rdp / σ_k", "seconds"],
                       [[r["epsilon"], r["accountant"], r["client"], r["examples"],
                         f"{r['sample_rate']:.3f}", f"{r['sigma']:.3f}", f"{r['rdp_over_this']:.3f}",
                         f"{r['seconds']:.2f}"] for r in rows]))
    common.write_json(args.json, {"rows": rows, "overrides": args.overrides,
                                  "machine": common.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
