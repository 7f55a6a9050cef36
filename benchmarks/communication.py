"""Bytes per round of every method on a config's model (default: the default job), measured.

Builds the experiment (no training), lets every client move what it trains by a random amount,
aggregates once, then serialises the second round's downloads and uploads exactly as the
transport does (safetensors): the steady-state bytes per client per round, base changes included.

    PYTHONPATH=src python benchmarks/communication.py [key=value ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys

import common
import torch

from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.federation.wire import payload_bytes
from fedlora.methods import available_methods, lowrank, method_class
from fedlora.methods.base import Update


def measure(overrides: list[str]) -> list[tuple[str, int, int]]:
    rows = []
    for name in available_methods():
        rank = method_class(name).fixed_rank  # xgblora is defined at rank 1
        fixed = [f"method.rank={rank}"] if rank else []
        exp = build_experiment(load_config(None, ["threads=1", *overrides, f"method.name={name}", *fixed]))
        m, gen = exp.method, torch.Generator().manual_seed(0)
        glob = m.init_global(exp.initial)
        for round in range(2):
            ups = []
            for c in exp.clients:
                local = m.client_state(exp.initial, {}, m.download(glob, c.cid), c.cid)
                moved = {k: v + 0.01 * torch.randn(v.shape, generator=gen)
                         if m.client_trains(k, round, c.cid) else v for k, v in local.items()}
                ups.append(lowrank.slice_to_rank(m.upload(_with_base(exp, m, moved, round), round, c.cid),
                                                 m.client_rank(c.cid)))
            if round == 0:
                glob = m.aggregate(glob, [Update(c.cid, u, c.num_examples)
                                          for c, u in zip(exp.clients, ups)], round)
        down = payload_bytes(m.download(glob, 0))
        rows.append((name, down, payload_bytes(ups[0])))
    return rows


def _with_base(exp, m, state, round):
    """Trained base weights (full fine-tuning) as changes Δ of the same shape."""
    shapes = exp.trainer.handle.shapes()
    extra = {k: torch.zeros(s) for k, s in shapes.items() if k not in state and m.trainable(k, round)}
    return {**state, **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    rows = measure(args.overrides)
    print(common.table(["method", "download/client/round", "upload/client/round"], rows))
    common.write_json(args.json, {"bytes_per_client_per_round": {
        name: {"download": down, "upload": up} for name, down, up in rows},
        "overrides": args.overrides})
    return 0


if __name__ == "__main__":
    sys.exit(main())
