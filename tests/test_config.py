"""Config loading, overrides, round trips and the shipped config files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from fedlora.config import Config, config_to_toml, flat_config, load_config
from fedlora.errors import ConfigError, DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_default_job():
    c = load_config()
    assert (c.method.name, c.method.rank, c.method.target_modules) == ("ffa", 8, ["query", "value"])
    assert (c.privacy.epsilon, c.privacy.delta) == (3.0, 1e-5)
    assert (c.federation.clients, c.data.partition, c.data.dirichlet_alpha) == (3, "dirichlet", 0.5)


def test_overrides_parse_toml_values():
    c = load_config(None, ["privacy.epsilon=inf", "method.target_modules=[\"query\"]",
                           "method.alpha=16", "seed=3", "method.name=lora"])
    assert math.isinf(c.privacy.epsilon) and not c.private
    assert c.method.target_modules == ["query"] and c.method.alpha == 16.0 and c.seed == 3


def test_toml_round_trip(tmp_path):
    c = load_config(None, ["privacy.epsilon=inf", "data.path=/tmp/x y.csv"])
    p = tmp_path / "c.toml"
    p.write_text(config_to_toml(c))
    assert load_config(p) == c


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_say_how_to_run_them(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# fedlora run --config configs/" + path.name)
    load_config(path)


def test_default_toml_equals_builtin_defaults():
    assert load_config(CONFIGS / "default.toml") == Config()


def test_file_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[privacy]\nepsilon = 6\n[method]\nname = \"lora\"\n")
    c = load_config(p, ["privacy.epsilon=1"])
    assert c.privacy.epsilon == 1.0 and c.method.name == "lora"


def test_section_given_as_value_is_an_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("privacy = 3\n")
    with pytest.raises(ConfigError, match=r"\[privacy\]"):
        load_config(p)


def test_reading_a_config_needs_no_torch():
    """`fedlora.config` (parsing, the allowed values, device names) imports no torch; only
    checking `method.name` does, through the method registry that owns the names."""
    import subprocess
    import sys

    code = ("import sys; from fedlora.config import PARTITIONS, apply_override, valid_device_name; "
            "raw = {}; apply_override(raw, 'data.partition=iid'); "
            "assert raw['data']['partition'] in PARTITIONS; "
            "assert valid_device_name('cuda:3') and not valid_device_name('gpu'); "
            "print([m for m in ('torch', 'transformers', 'opacus') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_allowed_values_each_have_exactly_one_implementation():
    """The lists of allowed values live in `fedlora.config`; the code implementing them must
    implement exactly those (so a value cannot be accepted and then fail, or exist unlisted)."""
    import numpy as np

    from fedlora import config
    from fedlora.causal.generate import SCORER_BUILDERS
    from fedlora.data.partition import partition
    from fedlora.privacy.epsilon import KINDS
    from fedlora.tasks import task_kinds

    assert set(task_kinds()) == set(config.TASKS)
    assert set(SCORER_BUILDERS) == set(config.SCORERS)
    assert set(KINDS) == set(config.ACCOUNTANTS)
    labels, groups = np.array([0, 1] * 20), [f"g{i % 5}" for i in range(40)]
    for scheme in config.PARTITIONS:
        parts = partition(labels, clients=2, scheme=scheme, seed=0, groups=groups, alpha=1.0)
        assert sorted(i for p in parts for i in p) == list(range(40))
    with pytest.raises(DataError, match="unknown"):
        partition(labels, clients=2, scheme="unlisted", seed=0, groups=groups)


def _documented_keys(page: str) -> set[str]:
    """Keys named in the first column of docs/configuration.md's settings table; a row may name
    several keys of one section: "`model.center`, `.center_examples`"."""
    keys: set[str] = set()
    for line in page.splitlines():
        if not line.startswith("| `"):
            continue
        section = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if name.startswith("."):
                keys.add(section + name)
            else:
                keys.add(name)
                section = name.rsplit(".", 1)[0] if "." in name else ""
    return keys


def test_every_config_key_is_in_the_documented_settings_table():
    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = _documented_keys(page)
    missing = sorted(set(flat_config(Config())) - documented)
    assert not missing, f"docs/configuration.md's settings table lacks {missing}"
    assert {"model.center", "model.center_examples", "seed"} <= documented  # the parser reads rows


@pytest.mark.parametrize("key, value", [("train.head_lr", "0.05"), ("train.lr_schedule", "cosine")])
def test_a_key_added_later_leaves_older_runs_identity_alone(tiny_overrides, key, value):
    """A run checkpointed before a key existed hashed its identity without it; at its neutral
    value the key must not enter the identity, or that run could never be resumed."""
    import json

    from fedlora.config import ADDED_KEYS, EXECUTION, flat_config, identity_text, run_identity

    config = load_config(None, tiny_overrides)
    flat = flat_config(config)
    assert flat[key] == ADDED_KEYS[key]  # the default is the neutral value
    older = {k: v for k, v in flat.items() if k not in EXECUTION and k not in ADDED_KEYS}
    assert identity_text(config) == json.dumps(older, sort_keys=True, default=str)
    changed = load_config(None, [*tiny_overrides, f"{key}={value}"])
    assert str(run_identity(changed)[key]) == value  # set, it is part of the run
    assert identity_text(changed) != identity_text(config)
