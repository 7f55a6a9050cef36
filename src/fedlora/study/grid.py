"""A sweep grid: a config file whose keys may hold lists, expanded into one config per run.

    # fedlora sweep --config grid.toml
    seed = [0, 1, 2]                      # a list: one run per value
    [privacy]
    epsilon = [inf, 6, 3, 1]
    [method]
    name = ["lora", "ffa"]
    [sweep]
    out = "runs/privacy"                  # one run folder per setting inside it

The runs are the Cartesian product of the lists. Keys whose own type is a list
(`method.target_modules`, `method.client_ranks`) are swept with a list of lists.
`[[cases]]` tables (each `section.key = value or list`) are alternatives: the runs are the union
over cases of the product of (the file's keys, overridden by the case's keys). Cases say what a
plain product cannot, e.g. "IID, or Dirichlet with α ∈ {1, 0.1}", or a learning-rate grid of
its own for each method. Several groups, `[[cases.split]]` and `[[cases.method]]`, are crossed:
each run takes one case from every group. `[select]` chooses a key on the validation split (see select.py).

Every run's config is built and validated before anything is written; a bad grid stops with one
`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedlora.config import Config, apply_override, config_from_dict, flat_config, identity_text
from fedlora.errors import ConfigError

META = ("sweep", "select", "cases")
SWEEP_KEYS = ("out",)
SELECT_KEYS = ("metric", "over", "per", "grid", "out")
ALIASES = {"method.name": "method"}  # in run names: "name=lora" would say little
METRICS = ("validation_accuracy", "validation_loss")  # never a test metric: that would be tuning on test


@functools.cache
def schema() -> dict[str, Any]:
    """Every config key as `section.key` (or a top-level key such as `seed`) → its type."""
    out: dict[str, Any] = {}
    for name, typ in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(typ):
            out.update({f"{name}.{k}": t for k, t in typing.get_type_hints(typ).items()})
        else:
            out[name] = typ
    return out


@dataclass
class Selection:
    """Choose `over` (e.g. train.lr) separately for each value of `per` (e.g. method.name) by
    the mean of `metric` over the selection runs (all other varied keys, e.g. seeds, averaged)."""

    metric: str
    over: list[str]
    per: list[str]
    grid: dict[str, Any] = field(default_factory=dict)  # replaces keys in the selection runs
    out: str | None = None  # folder of the selection runs, relative to OUT (default "select");
    #                         studies may share one ("../select"): identical runs are made once

    @property
    def maximise(self) -> bool:
        return not self.metric.endswith("_loss")


@dataclass
class Run:
    """One run of the sweep: its folder name, its config, and the keys the grid set for it."""

    name: str
    config: Config
    setting: dict[str, Any]


@dataclass
class Grid:
    base: dict[str, Any]
    cases: list[dict[str, Any]]
    select: Selection | None
    out: str | None
    source: str = "grid"
    notes: list[str] = field(default_factory=list)  # said before the sweep starts
    only: dict[str, list[Any]] = field(default_factory=dict)  # --only: key → values to make

    def settings(self, replace: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Each case's keys over the file's, `replace` over both; products of the lists."""
        out = []
        for case in self.cases or [{}]:
            merged = {**self.base, **case, **(replace or {})}
            axes = [(k, v) for k, v in merged.items() if _is_axis(k, v)]
            for combo in itertools.product(*(v for _, v in axes)):
                out.append({**merged, **dict(zip((k for k, _ in axes), combo))})
        # seed by seed: an interrupted sweep has already run every setting once
        return sorted(out, key=_seed)

    def runs(self, replace: dict[str, Any] | None = None) -> list[Run]:
        """The distinct runs (two settings that resolve to the same config are one run)."""
        return self.runs_of(self.settings(replace))

    def selection_runs(self) -> list[Run]:
        """The runs that choose `select.over`: the grid with `[select.grid]` replacing keys."""
        return self.runs(self.select.grid if self.select else None)

    def final_runs(self, chosen: Callable[[Config], dict[str, Any]]) -> list[Run]:
        """The grid's runs with the selected keys set to `chosen(config)` (their group's choice).
        Runs `--only` drops keep their candidates (their group may not have been chosen on)
        and are dropped by `kept`; the chosen keys are always in the names, so a run's name
        does not depend on what the other groups chose, or on --only."""
        settings = []
        for s in self.settings():
            config = build_config(s, self.source)
            settings.append({**s, **chosen(config)} if self._keeps(config) else s)
        return self.runs_of(settings, always=self.select.over if self.select else [])

    def kept(self, runs: list[Run], selection: bool = False) -> list[Run]:
        """The runs `--only` keeps (all without it). Names are the whole grid's, so a subset
        made now is found complete by the whole sweep later. Selection runs are filtered on
        the `[select] per` keys alone: a choice averages over every other key (seeds, …), and
        must not change because fewer final runs are made now."""
        return [r for r in runs if self._keeps(r.config, selection)]

    def _keeps(self, config: Config, selection: bool = False) -> bool:
        only = {k: v for k, v in self.only.items()
                if not selection or (self.select and k in self.select.per)}
        flat = flat_config(config)
        return all(_matches(flat[k], v) for k, v in only.items())

    def runs_of(self, settings: list[dict[str, Any]], always: list[str] = ()) -> list[Run]:
        """Distinct runs, each named by the keys that tell it apart from the others."""
        runs, seen = [], set()
        for setting in settings:
            config = build_config(setting, f"{self.source}, run {run_name(setting, list(setting))}")
            ident = identity(config)
            if ident not in seen:
                seen.add(ident)
                runs.append(Run("", config, setting))
        keys = name_keys([r.setting for r in runs], always)
        names = [run_name(r.setting, keys) for r in runs]
        for run, name in zip(runs, names):  # same name, different config: keep them apart
            run.name = name if names.count(name) == 1 else f"{name}-{_digest(identity(run.config))}"
        return runs


def _is_toml(text: str) -> bool:
    try:
        tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return False
    return True


def _word(text: str) -> Any:
    """One value of a comma list: a TOML number or inf if it reads as one, else a string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return value if isinstance(value, (int, float)) else text


def _matches(value: Any, allowed: list[Any]) -> bool:
    return any(value == a or (isinstance(a, (int, float)) and isinstance(value, (int, float))
                              and math.isclose(value, a)) for a in allowed)


def parse_only(grid: Grid, items: list[str]) -> None:
    """`--only key=value` or `key=[v1, v2]` (repeatable; keys AND, values OR) → grid.only,
    checked against the grid's runs: an unknown key, the key [select] chooses, or a filter
    that keeps no run is refused by name."""
    for item in items:
        key, _, text = (x.strip() for x in item.partition("="))
        if key not in schema():
            raise ConfigError(f"--only {item!r}: unknown key '{key}'"
                              f"{_suggest(key, list(schema()))} give section.key=value, "
                              "e.g. --only method.name=ffa")
        words = None
        if text.startswith("[") and text.endswith("]") and not _is_toml(text):
            words = text[1:-1].split(",")  # [lora, ffa]: a list of words, bracketed
        elif "," in text and not text.startswith("["):  # method.name=lora,ffa: a list of words
            words = text.split(",")
        if words is not None:
            value = [_word(w.strip()) for w in words if w.strip()]
        else:
            raw: dict[str, Any] = {}
            apply_override(raw, item)
            value = _flat(raw, "--only ")[key]
        if grid.select and key in grid.select.over:
            raise ConfigError(f"--only {item!r}: {key} is what [select] chooses on the validation "
                              "split, so it cannot be fixed in advance — filter on another key")
        grid.only.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    runs = grid.runs()
    for key, allowed in grid.only.items():
        values = list(dict.fromkeys(repr(flat_config(r.config)[key]) for r in runs))
        if not any(_matches(flat_config(r.config)[key], allowed) for r in runs):
            raise ConfigError(f"--only {key}={allowed!r} keeps no run: the grid's {key} takes "
                              f"{', '.join(values)} — give one of those")
    if not grid.kept(runs):
        raise ConfigError(f"--only {grid.only!r}: no run of the grid matches every filter "
                          "at once — drop one (`fedlora sweep --dry-run` lists the runs)")


def _seed(setting: dict[str, Any]) -> tuple:
    seed = setting.get("seed", 0)  # not yet validated: a bad one is reported by name later
    return (0, seed, "") if isinstance(seed, int) else (1, 0, repr(seed))


# ---------------------------------------------------------------------------- parsing


def load_grid(path: str | Path, overrides: list[str] | None = None) -> Grid:
    """Read and validate a grid file; `overrides` are `key=value` (a list value sweeps)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: grid file '{path}' not found — give the path of a TOML grid")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"--config: '{path}' is not valid UTF-8 TOML ({err}) — fix the syntax") from None
    for item in overrides or []:
        apply_override(raw, item)
    grid = parse_grid(raw, str(path))
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if any(key in case for case in grid.cases):
            raise ConfigError(f"override '{item}': {key} is also set by the [[cases]] of '{path}', "
                              "whose values win — change it in the cases instead")
        if grid.select and key in grid.select.grid:  # legitimate (seed=[0]), but say so
            grid.notes.append(f"note: the selection runs keep {key} = "
                              f"{grid.select.grid[key]!r} from [select.grid]; '{item}' applies "
                              "to the final runs")
    return grid


def parse_grid(raw: dict[str, Any], source: str = "grid") -> Grid:
    raw = dict(raw)
    sweep = _table(raw.pop("sweep", {}), "[sweep]", SWEEP_KEYS)
    select = raw.pop("select", None)
    groups = _case_groups(raw.pop("cases", []))
    base = _flat(raw, "")
    for key, value in base.items():
        _check_value(key, value, "")
    flat_groups = []
    for group, cases in groups.items():
        flat = []
        for i, case in enumerate(cases):
            where = f"[[{group}]] #{i + 1}: "
            flat.append(_flat(case, where))
            if not flat[-1]:
                raise ConfigError(f"{where[:-2]} is empty — give it at least one section.key = value")
            for key, value in flat[-1].items():
                _check_value(key, value, where)
        flat_groups.append((group, flat))
    flat_cases = _cross(flat_groups)
    out = sweep.get("out")
    if out is not None and not (isinstance(out, str) and out):
        raise ConfigError(f"sweep.out must be a folder path (a string), got {out!r}")
    grid = Grid(base, flat_cases, None, out, source)
    if select is not None:
        grid.select = _parse_select(select, grid)
    runs = grid.runs()  # builds and validates every config now, before anything is written
    if grid.select is not None:
        _check_selectable(grid, runs)
    return grid


def _case_groups(cases: Any) -> dict[str, list[dict[str, Any]]]:
    """`[[cases]]` is one group of alternatives; `[[cases.NAME]]` tables form named groups."""
    if isinstance(cases, list):
        groups = {"cases": cases}
    elif isinstance(cases, dict) and all(isinstance(v, list) for v in cases.values()):
        groups = {f"cases.{k}": v for k, v in cases.items()}
    else:
        groups = None
    if groups is None or not all(isinstance(c, dict) for g in groups.values() for c in g):
        raise ConfigError("cases must be an array of tables: write each case as [[cases]] (or "
                          "[[cases.NAME]] for several groups) followed by section.key = value lines")
    return groups


def _cross(groups: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One case from each group, merged: the groups are crossed, the cases of a group are
    alternatives. Two groups may not set the same key (which would win is not obvious)."""
    for (g1, c1), (g2, c2) in itertools.combinations(groups, 2):
        shared = sorted({k for c in c1 for k in c} & {k for c in c2 for k in c})
        if shared:
            raise ConfigError(f"[[{g1}]] and [[{g2}]] both set {', '.join(shared)} — set each key "
                              "in one group of cases only")
    if not groups:
        return []
    return [dict(kv for case in combo for kv in case.items())
            for combo in itertools.product(*(cases for _, cases in groups))]


def _table(value: Any, name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a table, e.g. {name} on its own line, then key = value lines")
    for key in value:
        if key not in keys:
            raise ConfigError(f"unknown key '{name[1:-1]}.{key}'{_suggest(key, list(keys))} "
                              f"Valid keys: {', '.join(keys)}")
    return value


def _flat(table: dict[str, Any], where: str) -> dict[str, Any]:
    """{"method": {"name": [..]}} (or a quoted "method.name" key) → {"method.name": [..]}."""
    known = schema()
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    for key in out:
        if key not in known:
            raise ConfigError(f"{where}unknown config key '{key}'{_suggest(key, list(known))} "
                              "(a grid holds config keys plus [sweep], [select] and [[cases]])")
    return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" — did you mean '{close[0]}'?" if close else " —"


def _is_list_type(key: str) -> bool:
    return typing.get_origin(schema()[key]) is list


def _is_axis(key: str, value: Any) -> bool:
    """A list sweeps; for a key whose type is itself a list, a list of lists does."""
    if not isinstance(value, list):
        return False
    if _is_list_type(key):
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def _check_value(key: str, value: Any, where: str) -> None:
    if key == "threads" and isinstance(value, list):
        raise ConfigError(f"{where}threads cannot be swept (it changes speed, not results) — give one value")
    if isinstance(value, list) and not value and not _is_list_type(key):
        raise ConfigError(f"{where}{key} = [] sweeps over nothing — give at least one value, "
                          f"e.g. {key} = [{_default(key)}]")


def _default(key: str) -> str:
    config = dataclasses.asdict(Config())
    section, _, name = key.rpartition(".")
    value = config[section][name] if section else config[name]
    return json.dumps(value)


def name_keys(settings: list[dict[str, Any]], always: list[str] = ()) -> list[str]:
    """The keys whose values differ between these settings (a key some settings do not set
    counts as differing) and those of `always` the settings set, the method first and the
    seed last."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    missing = object()
    varied = [k for k in keys
              if k in always or len({repr(s.get(k, missing)) for s in settings}) > 1]
    return sorted(varied, key=lambda k: (k != "method.name", k == "seed"))


def _declared_axes(grid: Grid) -> list[str]:
    """Keys that hold a list of values in the file or in a case."""
    keys = [k for k, v in grid.base.items() if _is_axis(k, v)]
    return keys + [k for case in grid.cases for k, v in case.items() if _is_axis(k, v)]


def _parse_select(raw: Any, grid: Grid) -> Selection:
    table = _table(raw, "[select]", SELECT_KEYS)
    metric = table.get("metric", "validation_accuracy")
    if metric not in METRICS:
        raise ConfigError(f"select.metric must be one of {', '.join(METRICS)} (chosen on the "
                          f"validation split, never the test set), got {metric!r}")
    if "over" not in table:
        raise ConfigError('select.over is missing — name the key to choose, e.g. over = "train.lr"')
    over = table["over"]
    over = [over] if isinstance(over, str) else over
    per = table.get("per", [])
    if not isinstance(per, list) or not all(isinstance(k, str) for k in per):
        raise ConfigError(f'select.per must be a list of keys, e.g. per = ["method.name"], got {per!r}')
    if not isinstance(over, list) or not over or not all(isinstance(k, str) for k in over):
        raise ConfigError(f'select.over must name a key (or a list of keys), e.g. over = "train.lr", '
                          f"got {table['over']!r}")
    known = schema()
    for key in over + per:
        if key not in known:
            raise ConfigError(f"select: unknown config key '{key}'{_suggest(key, list(known))}")
    for key in over:
        if key in per:
            raise ConfigError(f"select: '{key}' is in both select.over and select.per — "
                              "a key is either chosen or chosen for")
        if key not in _declared_axes(grid):
            value = grid.base.get(key, _default(key))
            raise ConfigError(f"select.over: {key} holds one value ({value}) — give its candidate "
                              f"values as a list, e.g. {key} = [0.001, 0.005, 0.02], or one list "
                              "per [[cases]]")
    replace = table.get("grid", {})
    if not isinstance(replace, dict):
        raise ConfigError("select.grid must be a table of section.key = value (or list) lines")
    replace = _flat(replace, "select.grid: ")
    for key, value in replace.items():
        _check_value(key, value, "select.grid: ")
        if key in over or key in per:
            role = "chosen" if key in over else "chosen separately for each value of"
            raise ConfigError(f"select.grid cannot set {key}: it is the key {role} — remove it "
                              "from [select.grid]")
    out = table.get("out")
    if out is not None and not (isinstance(out, str) and out):
        raise ConfigError(f"select.out must be a folder path (a string), got {out!r}")
    return Selection(metric, over, per, replace, out)


def _check_selectable(grid: Grid, runs: list[Run]) -> None:
    for run in runs + grid.runs(grid.select.grid):
        if run.config.data.validation_fraction <= 0:
            raise ConfigError("[select] chooses on the validation split, but data.validation_fraction "
                              "is 0 — set it in the grid, e.g. [data] validation_fraction = 0.1 "
                              "(the final runs keep it, so both phases train on the same data)")


# ---------------------------------------------------------------------------- configs and names


def build_config(setting: dict[str, Any], where: str = "grid") -> Config:
    """The validated config of one setting (flat keys over the defaults)."""
    raw: dict[str, Any] = {}
    for key, value in setting.items():
        section, _, name = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[name] = value
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def identity(config: Config) -> str:
    """What makes two runs the same run: `fedlora.config.run_identity` (the one definition
    resume and checkpoints use too: the config, cores and device aside)."""
    return identity_text(config)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(setting: dict[str, Any], keys: list[str]) -> str:
    """`method=lora,epsilon=3,seed=0`: the varied keys (short where unambiguous)."""
    shown = [k for k in keys if k in setting]
    if not shown:
        return "run"
    short = [ALIASES.get(k, k.rpartition(".")[2]) for k in shown]
    parts = [f"{s if short.count(s) == 1 else k}={_text(setting[k])}" for k, s in zip(shown, short)]
    name = ",".join(parts)
    return name if len(name) <= 120 else f"{name[:110]}-{_digest(name)}"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    if isinstance(value, list):
        return "+".join(_text(v) for v in value) or "none"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))
