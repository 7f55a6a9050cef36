"""Simulating many clients on one machine: time per round and peak memory for 3, 100 and
1,000 clients with 10 sampled per round, on the default model and data.

Each client count runs in a fresh process (peak memory is per process), on the real
simulation path (`common.timed_run`: run folder, checkpoint every round, a privacy ledger per
client, update validation, evaluation every round). The data is the default job's, split IID
(a Dirichlet(0.5) split cannot give 1,000 clients an example each); every client holds its
token ids and labels, its DP plan and accountant, its ledger and its personal tensors (none
for FFA-LoRA with a shared head) — never a model: all clients share the one in the process.
The issue's target: 1,000 clients, 10 per round, peak memory under 2 GiB.

    PYTHONPATH=src python benchmarks/scaling.py [key=value ...] [--clients 3 100 1000]
        [--per-round 10] [--rounds 2] [--threads 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common

TARGET_PEAK_MB = 2048


def child(clients: int, per_round: int, rounds: int, threads: int, overrides: list[str]) -> dict:
    """One client count, in this process: what `main` runs in a subprocess."""
    from fedlora.config import load_config
    from fedlora.federation.wire import payload_bytes

    sampled = per_round if per_round < clients else 0  # 0 = all clients
    config = load_config(None, [f"threads={threads}", "data.partition=iid", *overrides,
                                f"federation.clients={clients}",
                                f"federation.clients_per_round={sampled}",
                                f"federation.rounds={rounds}"])
    marks: dict[str, float] = {"start_mb": common.rss_mb()}

    def after_setup() -> None:
        marks["after_setup_mb"] = common.rss_mb()

    with tempfile.TemporaryDirectory(prefix="fedlora-scaling-") as d:
        run = common.timed_run(config, Path(d), after_setup)
    parts = common.split_round(run["timings"])
    summary = run["summary"]
    return {"clients": clients, "sampled_per_round": sampled or clients, "rounds": rounds,
            "setup_seconds": run["setup_seconds"], "seconds_per_round": parts,
            "rss_start_mb": marks["start_mb"], "rss_after_setup_mb": marks["after_setup_mb"],
            "rss_end_mb": common.rss_mb(), "peak_rss_mb": common.peak_rss_mb(),
            "upload_bytes_per_client": summary["bytes_uploaded"] // max(1, rounds * (sampled or clients)),
            "test_accuracy": summary["test_accuracy"]}


def run_child(clients: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(clients), "--per-round", str(args.per_round),
           "--rounds", str(args.rounds), "--threads", str(args.threads), *args.overrides]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 100, 1000])
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.per_round, args.rounds, args.threads, args.overrides)))
        return 0
    rows = []
    for n in args.clients:
        rows.append(run_child(n, args))
        r = rows[-1]
        print(f"  {n} clients: {r['seconds_per_round']['round']:.1f} s per round, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB", flush=True)
    print(common.table(
        ["clients", "sampled/round", "s/round", "training", "evaluation", "other", "setup s",
         "RSS after setup MB", "peak RSS MB"],
        [(str(r["clients"]), r["sampled_per_round"], r["seconds_per_round"]["round"],
          r["seconds_per_round"]["local training"], r["seconds_per_round"]["evaluation"],
          r["seconds_per_round"]["other"] + r["seconds_per_round"]["serialisation"]
          + r["seconds_per_round"]["aggregation"], r["setup_seconds"],
          r["rss_after_setup_mb"], r["peak_rss_mb"]) for r in rows]))
    growth = None
    if len(rows) >= 2 and rows[-1]["clients"] > rows[0]["clients"]:
        lo, hi = rows[0], rows[-1]
        growth = (hi["rss_after_setup_mb"] - lo["rss_after_setup_mb"]) * 2**20 / (hi["clients"] - lo["clients"])
        print(f"\nmemory per extra client: {growth / 1024:,.1f} KiB (RSS after setup, "
              f"{lo['clients']} → {hi['clients']} clients); one client's upload: "
              f"{hi['upload_bytes_per_client'] / 1024:,.1f} KiB; peak at {hi['clients']} clients "
              f"{hi['peak_rss_mb']:.0f} MB (target < {TARGET_PEAK_MB} MB)")
    common.write_json(args.json, {"rows": rows, "bytes_per_extra_client": growth,
                                  "target_peak_mb": TARGET_PEAK_MB, "overrides": args.overrides,
                                  "machine": common.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
