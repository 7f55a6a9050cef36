"""Ghost clipping against materialised per-example gradients (`train.ghost_clipping`), side by
side in one process: fedlora's DP step with every nn.Linear by the Gram route ("on"), with
every per-example gradient materialised ("off"), and chosen per layer ("auto", the default),
beside the floor (forward + backward of the same micro-batches, no DP), on the same model,
data and batches. The three give the same result (tests/test_ghost.py); only the cost differs,
and with it how far from the floor the DP step runs.

Every contender trains every client for `--steps` local steps; repeats rotate the order; the
ratios are medians of the per-repeat ratios (see `throughput.py`).

    PYTHONPATH=src python benchmarks/clipping.py [key=value ...] [--repeats 3] [--steps 1]
        [--threads 0] [--device cpu] [--methods ffa lora full] [--json FILE]
"""

from __future__ import annotations

import sys

import common  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
import torch

from precision import setup, summarise
from throughput import measure, rates_and_ratios

MODES = ("off", "on", "auto")  # "off" first: the ratios are against materialising


def main(argv: list[str] | None = None) -> int:
    parser = common.side_by_side_parser(__doc__, ["ffa", "lora", "full"])
    args = parser.parse_args(argv)
    contenders, info = setup(args.overrides, args.threads, args.methods, args.steps, args.device,
                             key="ghost_clipping", values=MODES, floor_varies=False)
    print(f"clients {info['clients']}, {torch.get_num_threads()} threads, device {info['device']}",
          flush=True)
    runs = measure(contenders, args.repeats)
    result = {**summarise(runs, args.methods, MODES, floor_varies=False), "setup": info,
              "repeats": args.repeats, "steps": args.steps, "overrides": args.overrides,
              "machine": common.machine()}
    for clock in ("wall", "cpu"):  # how close the default DP step runs to the floor
        for m in args.methods:
            dp, floor = f"fedlora {m}, DP, auto", f"floor {m}"
            result[clock]["ratios"][f"{m}: floor time ÷ DP (auto) time"] = common.median(
                [(r[dp].examples / getattr(r[dp], clock)) / (r[floor].examples / getattr(r[floor], clock))
                 for r in runs])
    print(rates_and_ratios(result))
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
