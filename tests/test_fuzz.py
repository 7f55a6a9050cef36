"""Fuzzing the loaders a user feeds: whatever the input, only a `FedloraError` may escape.

Any other exception would reach the user as a traceback. Inputs are drawn both as raw noise
(random bytes, random TOML text) and as near-misses of valid input (real keys with wrong
values, real columns with odd cells), which is where the deeper checks live.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.config import Config, config_from_dict, load_config
from fedlora.data.sources import TextDataset, load_dataset
from fedlora.errors import FedloraError
from fedlora.federation.checkpoint import load_checkpoint

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

SECTIONS = {
    "model": ["path", "max_length"],
    "data": ["path", "text_column", "label_column", "group_column", "test_fraction",
             "validation_fraction", "partition", "dirichlet_alpha", "max_examples"],
    "federation": ["clients", "rounds", "local_steps", "clients_per_round", "eval_every",
                   "checkpoint_every", "on_bad_update", "max_update_norm"],
    "method": ["name", "rank", "alpha", "target_modules", "client_ranks", "head"],
    "train": ["batch_size", "lr", "optimizer", "momentum", "micro_batch_size", "eval_batch_size"],
    "privacy": ["epsilon", "delta", "clip", "accountant"],
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["ffa", "lora", "iid", "sgd", "rdp", "skip", "local"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@st.composite
def raw_configs(draw):
    raw: dict = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "seed", "threads", "bogus"]),
                                 max_size=4, unique=True)):
        if section in SECTIONS and draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from([*SECTIONS[section], "typo"]), max_size=4,
                                 unique=True))
            raw[section] = {k: draw(values) for k in keys}
        else:
            raw[section] = draw(values)
    return raw


def _only_fedlora_errors(call):
    try:
        return call()
    except FedloraError:
        return None


@FUZZ
@given(raw_configs())
def test_config_from_dict_raises_only_fedlora_errors(raw):
    result = _only_fedlora_errors(lambda: config_from_dict(raw))
    assert result is None or isinstance(result, Config)


@FUZZ
@given(st.lists(st.one_of(
    st.text(max_size=30),
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(list(SECTIONS)),
              st.sampled_from([k for ks in SECTIONS.values() for k in ks]),
              st.one_of(st.text(max_size=10), st.sampled_from(["[1, 2]", "inf", "nan", "-1", "0",
                                                               "1e400", '"x"', "[", "{a=1}"])))),
    max_size=4))
def test_overrides_raise_only_fedlora_errors(overrides):
    _only_fedlora_errors(lambda: load_config(None, overrides))


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_config_file_raises_only_fedlora_errors(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.toml"
        path.write_bytes(content)
        _only_fedlora_errors(lambda: load_config(path))


# ------------------------------------------------------------------------------------- data

cells = st.one_of(st.text(max_size=8), st.sampled_from(["", " ", "pos", "neg", "1", "2", "1.5",
                                                        "\x00", "é", '"', "\n"]))


@st.composite
def csv_files(draw):
    columns = draw(st.lists(st.sampled_from(["text", "label", "group", "", "x", "text "]),
                            min_size=1, max_size=4))
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=5), max_size=8))
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=draw(st.sampled_from([",", "\t", ";"])))
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue().encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])),
                                 errors="replace")


json_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
                        st.lists(st.integers(), max_size=2), st.just({"a": 1}))


@st.composite
def jsonl_files(draw):
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.text(max_size=10)))  # not JSON at all
        else:
            keys = draw(st.lists(st.sampled_from(["text", "label", "group", "x"]), max_size=3,
                                 unique=True))
            lines.append(json.dumps({k: draw(json_values) for k in keys}))
    return "\n".join(lines).encode("utf-8", errors="replace")


@FUZZ
@given(st.one_of(csv_files(), jsonl_files(), st.binary(max_size=200)),
       st.sampled_from([".csv", ".tsv", ".jsonl", ".csv.gz", ".jsonl.bz2", ".txt"]),
       st.booleans(), st.booleans())
def test_data_loader_raises_only_fedlora_errors(content, suffix, compress, groups):
    if compress and suffix.endswith(".gz"):
        content = gzip.compress(content)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(content)
        result = _only_fedlora_errors(lambda: load_dataset(
            path, text_column="text", label_column="label",
            group_column="group" if groups else None))
        if result is not None:
            assert isinstance(result, TextDataset) and result.num_labels >= 2
            assert all(t.strip() for t in result.texts)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 400))
def test_checkpoint_loader_raises_only_fedlora_errors(noise, cut):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint.safetensors"
        header = b'{"__metadata__": {"fedlora": "{}", "digest": "0"}}'
        path.write_bytes((len(header).to_bytes(8, "little") + header + noise)[:cut] if cut % 2
                         else noise)
        assert _only_fedlora_errors(lambda: load_checkpoint(path)) is None
