"""Where one federated round's time goes: local training, serialisation, aggregation,
evaluation, and everything else, on the real simulation path (run folder, checkpoint every
round, per-client privacy ledgers, update validation), default job unless overridden.

The round loop, the transport and the trainer time their own phases when given a `timings`
dict (`fedlora.federation.timing`; nothing is timed in normal runs). Figures are seconds per
round, averaged over the rounds of one run; `--repeats` runs the job again and reports the
median of each part. The issue's target: everything outside local training ≤ 10% of a round. One evaluation's
seconds are also given apart for the fixed subset (rounds before the last, with
`federation.eval_examples`) and for the whole test set (the last round).

    PYTHONPATH=src python benchmarks/round_breakdown.py [key=value ...] [--rounds 2]
        [--repeats 1] [--threads 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import common

from fedlora.config import load_config

TARGET_OUTSIDE_TRAINING = 0.10


def breakdown(overrides: list[str], threads: int, rounds: int | None) -> dict:
    extra = [f"federation.rounds={rounds}"] if rounds else []
    config = load_config(None, [f"threads={threads}", *overrides, *extra])
    with tempfile.TemporaryDirectory(prefix="fedlora-breakdown-") as d:
        run = common.timed_run(config, Path(d))
    t = run["timings"]
    parts = common.split_round(t)
    # seconds of one evaluation: on the fixed subset (rounds before the last, with
    # federation.eval_examples) and on the whole test set (the last round)
    each = {kind: t[f"evaluate: {kind}"] / t[f"evaluations: {kind}"]
            for kind in ("subset", "whole set") if t.get(f"evaluations: {kind}")}
    return {"seconds_per_round": parts, "rounds": int(t["rounds"]),
            "seconds_per_evaluation": each,
            "centring_query_seconds": sum(v for k, v in t.items() if k.startswith("centring query")),
            "test_accuracy": run["summary"]["test_accuracy"],
            "eval_every": config.federation.eval_every,
            "eval_examples": config.federation.eval_examples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--rounds", type=int, default=2,
                        help="federation.rounds for the measurement (0 = the config's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    runs = []
    for i in range(args.repeats):
        runs.append(breakdown(args.overrides, args.threads, args.rounds))
        print(f"  run {i + 1}: {runs[-1]['seconds_per_round']['round']:.1f} s per round", flush=True)
    parts = {k: common.median([r["seconds_per_round"][k] for r in runs])
             for k in runs[0]["seconds_per_round"]}
    total = parts["round"]
    outside = (total - parts["local training"]) / total
    rows = [(k, v, f"{100 * v / total:.1f}%") for k, v in parts.items() if k != "round"]
    print(common.table(["part of a round", "seconds", "share"], rows + [("round", total, "100%")]))
    print(f"\noutside local training: {100 * outside:.1f}% of a round "
          f"(target ≤ {100 * TARGET_OUTSIDE_TRAINING:.0f}%), eval_every={runs[0]['eval_every']}, "
          f"eval_examples={runs[0]['eval_examples']}, "
          f"{runs[0]['rounds']} rounds per run, median of {len(runs)} run(s)")
    for kind, seconds in runs[0]["seconds_per_evaluation"].items():
        print(f"one evaluation on the {kind}: {seconds:.2f} s "
              f"({100 * seconds / parts['local training']:.1f}% of a round's local training)")
    common.write_json(args.json, {"seconds_per_round": parts, "outside_training_share": outside,
                                  "target": TARGET_OUTSIDE_TRAINING, "runs": runs,
                                  "overrides": args.overrides, "rounds": args.rounds,
                                  "machine": common.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
