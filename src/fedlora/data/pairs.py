"""Prompt/answer pairs for causal-LM fine-tuning: from a CSV / TSV / JSONL file or a generator.

- `PairDataset` — prompts, answers (strings), optional group names.
- `load_pairs(path, prompt_column, answer_column, group_column, size, seed)` — a file (read with
  the same parser and messages as labelled sets, `fedlora.data.sources`), or the name of a
  generator in `fedlora.data.generators` (`size` pairs from `seed`).

A pair set has no labels; `labels` is all zeros so that the hold-out split and the `iid` /
`group` partitions, written for labelled sets, apply unchanged (one class: a plain random split).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlora.data import sources
from fedlora.errors import DataError


@dataclass(frozen=True)
class PairDataset:
    """`prompts[i]` is answered by `answers[i]`; `groups[i]` (if any) is its template/difficulty."""

    prompts: list[str]
    answers: list[str]
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.answers) != len(self.prompts):
            raise ValueError(f"PairDataset: {len(self.prompts)} prompts but {len(self.answers)} answers")
        if self.groups is not None and len(self.groups) != len(self.prompts):
            raise ValueError(f"PairDataset: {len(self.prompts)} prompts but {len(self.groups)} groups")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def labels(self) -> list[int]:
        return [0] * len(self.prompts)

    @property
    def label_names(self) -> list[str]:
        return ["pair"]

    @property
    def num_labels(self) -> int:
        return 1

    def subset(self, indices: Sequence[int]) -> PairDataset:
        idx = [int(i) for i in indices]
        return PairDataset([self.prompts[i] for i in idx], [self.answers[i] for i in idx],
                           None if self.groups is None else [self.groups[i] for i in idx])


def load_pairs(path: str, prompt_column: str, answer_column: str, group_column: str | None,
               size: int = 0, seed: int = 0) -> PairDataset:
    """Pairs from a generator name (`size` of them, from `seed`) or from a data file."""
    from fedlora.data.generators import GENERATORS, generate

    if path in GENERATORS and not Path(path).exists():
        if size <= 0:
            raise DataError(f"data.path='{path}' generates pairs: set data.max_examples to how many "
                            "(e.g. data.max_examples=600)")
        records = generate(path, size, seed)
        return _from_records([(i + 1, i + 1, r) for i, r in enumerate(records)], path,
                             prompt_column, answer_column, group_column)
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.path: '{path}' is not a file — give a .jsonl/.csv/.tsv file of "
                        f"prompt/answer pairs, or a generator ({', '.join(GENERATORS)}; make a "
                        "file with `fedlora data NAME --out FILE.jsonl`)")
    fmt, compression = sources._detect_format(os.fspath(file))
    text = sources._decode(sources._decompress(file.read_bytes(), compression, path), path)
    wanted = [c for c in (prompt_column, answer_column, group_column) if c is not None]
    if fmt == "jsonl":
        columns, records = sources._read_jsonl(text, path, wanted)
    else:
        columns, records = sources._read_delimited(text, "\t" if fmt == "tsv" else ",", path, wanted)
    if not records:
        raise DataError(f"data.path: '{path}' has no prompt/answer pairs — add some")
    for key, column in (("text_column", prompt_column), ("label_column", answer_column),
                        ("group_column", group_column)):
        if column is not None and column not in columns:
            raise DataError(f"data.{key}: column '{column}' not found in '{path}' (columns: "
                            f"{', '.join(map(repr, columns))}) — for task.kind=causal, "
                            "data.text_column names the prompt and data.label_column the answer")
    return _from_records(records, path, prompt_column, answer_column, group_column)


def _from_records(records, path: str, prompt_column: str, answer_column: str,
                  group_column: str | None) -> PairDataset:
    prompts = sources._texts(records, prompt_column, path)
    answers = []
    for row, line, rec in records:
        value = rec.get(answer_column)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a JSON number is an answer too
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"data.label_column: row {row} (line {line}) of '{path}' has no answer "
                            f"in column '{answer_column}' — every prompt needs a non-empty answer")
        answers.append(value.strip())
    groups = None if group_column is None else sources._groups(records, group_column, path)
    return PairDataset(prompts, answers, groups)
