"""A deployment made easy: the app folder `flwr run` takes, and the SuperLink / SuperNode commands.

    fedlora flower superlink [--port 8000] [--tls DIR | --insecure] [--auth]
    fedlora flower supernode --superlink HOST:PORT --port 9101 (--partition K/N | --data-path F
                             --client-id K) [--state-dir DIR]
                             [--root-certificates ca.pem --auth-key key | --insecure]
    fedlora flower app DIR --config job.toml --out runs/x [section.key=value ...]
    flwr run DIR <connection> --stream [--run-config resume=true]

Both commands only assemble Flower's own (`flower-superlink`, `flower-supernode`) command line
and run it: the SuperLink never installs app dependencies (`--disable-runtime-dependency-
installation`; sites are offline), and telemetry is off.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedlora.config import Config, config_to_toml
from fedlora.errors import ConfigError

SERVER_APP = "fedlora.federation.flower.server_app:app"
CLIENT_APP = "fedlora.federation.flower.client_app:app"


def flower_env(base: dict | None = None) -> dict:
    import sys

    env = dict(os.environ if base is None else base)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    # Flower's processes start each other by name (flower-superexec, flwr-serverapp, ...):
    # this Python's scripts folder comes first so they are the ones next to this fedlora.
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def write_app(folder: str | Path, config: Config, out: str | Path, *, test_path: str = "",
              round_timeout: float = 600.0, connect_timeout: float = 120.0,
              resume: bool = False) -> Path:
    """An app folder for `flwr run`: a pyproject naming fedlora's ServerApp and ClientApp, with the
    resolved fedlora config as run config. `out` is made absolute: it is on the server's machine.
    `resume = false` is written either way, so `flwr run ... --run-config resume=true` can set it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = {
        "fedlora-config": config_to_toml(config),
        "out": str(Path(out).absolute()),
        "test-path": str(Path(test_path).absolute()) if test_path else "",
        "round-timeout": float(round_timeout),
        "connect-timeout": float(connect_timeout),
        "resume": bool(resume),
    }
    lines = [
        "# A Flower app that runs fedlora: `flwr run <this folder> <connection> --stream`.",
        "# Written by `fedlora flower app`; fedlora-config is the resolved fedlora config.",
        "[project]", 'name = "fedlora-app"', 'version = "1.0.0"',
        'description = "fedlora: private federated LoRA / FFA-LoRA fine-tuning on Flower"',
        'license = "Apache-2.0"', 'dependencies = ["fedlora[flower]"]', "",
        "[tool.flwr.app]", 'publisher = "fedlora"', "",
        "[tool.flwr.app.components]", f'serverapp = "{SERVER_APP}"', f'clientapp = "{CLIENT_APP}"', "",
        "[tool.flwr.app.config]",
    ]
    # JSON strings are valid TOML basic strings (same escapes), so any text round-trips.
    lines += [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in values.items()]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_connection(flwr_home: str | Path, name: str, address: str, *,
                     root_certificates: str | None = None) -> Path:
    """Set the SuperLink connection `name` in `$FLWR_HOME/config.toml` (other entries kept; one
    of the same name replaced), for `flwr run DIR <name>`."""
    import tomllib

    import tomli_w  # installed with flwr

    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML ({err}) — fix or remove it") from None
    links = data.setdefault("superlink", {})
    links.setdefault("default", name)
    entry = {"address": address}
    if root_certificates:
        entry["root-certificates"] = str(Path(root_certificates).absolute())
    else:
        entry["insecure"] = True
    links[name] = entry
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def superlink_command(*, port: int, host: str = "127.0.0.1", tls_dir: str | None = None,
                      auth: bool = False, extra: list[str] | None = None) -> list[str]:
    """`flower-superlink`, never installing app dependencies. `tls_dir` holds ca.crt,
    server.pem, server.key (as `fedlora flower certs` writes them); None = insecure."""
    cmd = [executable("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if tls_dir:
        d = Path(tls_dir)
        cmd += ["--ssl-ca-certfile", str(d / "ca.crt"), "--ssl-certfile", str(d / "server.pem"),
                "--ssl-keyfile", str(d / "server.key")]
    else:
        cmd += ["--insecure"]
    if auth:
        cmd += ["--enable-supernode-auth"]
    return cmd + list(extra or [])


def supernode_command(*, superlink: str, port: int, node_config: dict, root_certificates: str | None = None,
                      auth_key: str | None = None, extra: list[str] | None = None) -> list[str]:
    """`flower-supernode` for one site; `port` is its local ClientApp API port (one per node)."""
    cmd = [executable("flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", node_config_text(node_config)]
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if auth_key:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd + list(extra or [])


def node_config_text(values: dict) -> str:
    """`key=value` pairs as Flower parses them: strings quoted, numbers and booleans bare."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, (str, bool)) else v}"
                    for k, v in values.items())


def executable(name: str) -> str:
    """Flower's console script next to this Python (a virtualenv's bin), else on PATH."""
    import sys

    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)
