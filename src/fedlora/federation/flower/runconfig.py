"""The Flower run config of a fedlora app: the whole fedlora config travels as TOML text.

    [tool.flwr.app.config]
    fedlora-config = "<the resolved fedlora config, as `fedlora config` prints it>"
    out = "/abs/path/of/the/run/folder"      # where the ServerApp writes it (server's machine)
    test-path = ""                           # the server's own held-out file ("" = demo split)
    round-timeout = 600.0                    # seconds the server waits for a round's replies
    connect-timeout = 120.0                  # seconds it waits for the sites to connect
    resume = false                           # continue the interrupted run in `out`.partial/

`flwr run APP CONNECTION --run-config resume=true` continues a run whose ServerApp stopped
(crash, kill, lost machine) from its last checkpoint, as `fedlora run --resume` does.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

from fedlora.config import Config, config_from_dict
from fedlora.errors import ConfigError

DEFAULTS = {"out": "", "test-path": "", "round-timeout": 600.0, "connect-timeout": 120.0,
            "resume": False}


@dataclass
class FlowerRun:
    config: Config
    out: str
    test_path: str
    round_timeout: float
    connect_timeout: float
    resume: bool = False


def read_run_config(run_config: Mapping[str, Any]) -> FlowerRun:
    if "fedlora-config" not in run_config:
        raise ConfigError("run config: 'fedlora-config' is missing — make the app folder with "
                          "`fedlora flower app`")
    try:
        config = config_from_dict(tomllib.loads(str(run_config["fedlora-config"])))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"run config: fedlora-config is not valid TOML ({err})") from None
    values = {**DEFAULTS, **{k: v for k, v in run_config.items() if k in DEFAULTS}}
    for key in ("round-timeout", "connect-timeout"):
        if not isinstance(values[key], (int, float)) or not values[key] > 0:
            raise ConfigError(f"run config: {key} must be a positive number of seconds")
    if not isinstance(values["resume"], bool):
        raise ConfigError(f"run config: resume={values['resume']!r} must be true or false")
    if values["resume"] and not str(values["out"]):
        raise ConfigError("run config: resume=true needs `out`, the run folder to continue — "
                          "make the app folder with `fedlora flower app DIR --out RUN`")
    return FlowerRun(config, str(values["out"]), str(values["test-path"]),
                     float(values["round-timeout"]), float(values["connect-timeout"]),
                     values["resume"])
