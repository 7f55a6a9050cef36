"""`fedlora flower ...`: the commands of a deployment (see deploy.py and the README).

    fedlora flower certs DIR                    throwaway CA + SuperLink certificate
    fedlora flower node-key PATH                a SuperNode's key pair (PATH, PATH.pub)
    fedlora flower superlink [--port 8000] [--tls DIR] [--auth]
    fedlora flower supernode --superlink H:P --port P (--partition K/N | --data-path F --client-id K)
                             [--state-dir DIR]
    fedlora flower app DIR [--config F] [--out RUN] [section.key=value ...]
    fedlora flower connection NAME --superlink H:P [--root-certificates ca.crt]
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from fedlora.errors import ConfigError


def add_parser(sub) -> None:
    flower = sub.add_parser("flower", help="run on a real Flower deployment (SuperLink + SuperNodes)")
    cmds = flower.add_subparsers(dest="flower_command", required=True)

    c = cmds.add_parser("certs", help="write a throwaway CA and SuperLink certificate (for trying TLS)")
    c.add_argument("dir")
    c.add_argument("--host", action="append", help="host name or IP the SuperLink is reached at "
                   "(repeatable; default 127.0.0.1 and localhost)")

    k = cmds.add_parser("node-key", help="write a SuperNode key pair for SuperNode authentication")
    k.add_argument("path")

    link = cmds.add_parser("superlink", help="start a SuperLink (never installs app dependencies)")
    link.add_argument("--host", default="127.0.0.1")
    link.add_argument("--port", type=int, default=8000, help="its one HTTP port (Flower's default)")
    link.add_argument("--tls", metavar="DIR", help="folder with ca.crt, server.pem, server.key "
                      "(from `fedlora flower certs`); without it the SuperLink runs insecure")
    link.add_argument("--auth", action="store_true", help="accept only registered SuperNodes")

    node = cmds.add_parser("supernode", help="start a SuperNode for one site")
    node.add_argument("--superlink", required=True, help="SuperLink address host:port")
    node.add_argument("--port", type=int, required=True,
                      help="this node's local ClientApp API port (one per SuperNode on a machine)")
    node.add_argument("--partition", metavar="K/N", help="demo: part K of N of the run's data set")
    node.add_argument("--data-path", help="the site's own labelled .csv/.tsv/.jsonl file")
    node.add_argument("--client-id", type=int, help="the site's client number (with --data-path)")
    node.add_argument("--text-column")
    node.add_argument("--label-column")
    node.add_argument("--state-dir", help="where the site keeps its privacy ledger and personal "
                      "tensors between rounds and restarts (default: ./fedlora-state/client-K)")
    node.add_argument("--epsilon", type=float, help="the most this site spends on its data, over "
                      "every run (a run asking for more is refused; docs/privacy.md)")
    node.add_argument("--delta", type=float, help="the largest δ this site accepts")
    node.add_argument("--clip", type=float, help="the only per-example clip this site trains with")
    node.add_argument("--allow-seeded-noise", action="store_true", help="accept runs with "
                      "privacy.noise=seeded (noise the server can regenerate: research only)")
    node.add_argument("--share-evaluation", action="store_true", help="send personalised "
                      "evaluation scores to the server (not DP-protected)")
    node.add_argument("--root-certificates", help="CA certificate that signed the SuperLink's")
    node.add_argument("--auth-key", help="private key from `fedlora flower node-key`")

    app = cmds.add_parser("app", help="write the app folder that `flwr run` takes")
    app.add_argument("dir")
    app.add_argument("--config", help="TOML config file, as for `fedlora run`")
    app.add_argument("--out", help="run folder the ServerApp writes (on the server's machine)")
    app.add_argument("--test-path", default="", help="the server's own held-out labelled file "
                     "(default: the test split of data.path, for demos)")
    app.add_argument("--round-timeout", type=float, default=600.0)
    app.add_argument("--connect-timeout", type=float, default=120.0)
    app.add_argument("overrides", nargs="*", metavar="section.key=value")

    conn = cmds.add_parser("connection", help="add a SuperLink connection to $FLWR_HOME/config.toml")
    conn.add_argument("name")
    conn.add_argument("--superlink", required=True)
    conn.add_argument("--root-certificates")


def dispatch(args: argparse.Namespace) -> int:
    from fedlora.federation.flower import certs, deploy

    cmd = args.flower_command
    if cmd == "certs":
        folder = certs.make_tls(args.dir, tuple(args.host or ("127.0.0.1", "localhost")))
        print(f"wrote {folder}/ca.crt, ca.key, server.pem, server.key")
        return 0
    if cmd == "node-key":
        key, pub = certs.make_node_key(args.path)
        print(f"wrote {key} (private: give it to the SuperNode) and {pub} (register it)")
        return 0
    if cmd == "app":
        from fedlora.config import load_config
        from fedlora.outputs import default_out_dir

        config = load_config(args.config, args.overrides)
        out = args.out or default_out_dir(config.method.name, config.privacy.epsilon)
        folder = deploy.write_app(args.dir, config, out, test_path=args.test_path,
                                  round_timeout=args.round_timeout,
                                  connect_timeout=args.connect_timeout)
        print(f"wrote {folder / 'pyproject.toml'}; start it with: flwr run {folder} <connection> --stream")
        return 0
    if cmd == "connection":
        home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
        path = deploy.write_connection(home, args.name, args.superlink,
                                       root_certificates=args.root_certificates)
        print(f"added connection '{args.name}' to {path}")
        return 0
    if cmd == "superlink":
        command = deploy.superlink_command(port=args.port, host=args.host, tls_dir=args.tls,
                                           auth=args.auth)
    else:
        command = deploy.supernode_command(superlink=args.superlink, port=args.port,
                                           node_config=_node_config(args),
                                           root_certificates=args.root_certificates,
                                           auth_key=args.auth_key)
    print(" ".join(command), flush=True)
    return subprocess.call(command, env=deploy.flower_env())


def _node_config(args: argparse.Namespace) -> dict:
    values = _site(args)
    cid = values.get("partition-id", values.get("client-id"))
    # the site's ledger must outlive the SuperNode: a folder of the site's own, made absolute
    # because the ClientApp process does not share this shell's working directory
    state = Path(args.state_dir) if args.state_dir else Path("fedlora-state") / f"client-{cid}"
    values["state-dir"] = str(state.absolute())
    for key in ("epsilon", "delta", "clip"):  # the site's own privacy terms (terms.py)
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    for key in ("allow_seeded_noise", "share_evaluation"):
        if getattr(args, key, False):
            values[key.replace("_", "-")] = True
    return values


def _site(args: argparse.Namespace) -> dict:
    if bool(args.partition) == bool(args.data_path):
        raise ConfigError("supernode: give either --partition K/N (demo) or --data-path FILE "
                          "--client-id K (the site's own data)")
    if args.partition:
        k, sep, n = args.partition.partition("/")
        if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
            raise ConfigError(f"--partition {args.partition!r} must look like K/N with 0 ≤ K < N, e.g. 0/3")
        return {"partition-id": int(k), "num-partitions": int(n)}
    if args.client_id is None:
        raise ConfigError("supernode: --data-path needs --client-id K (the site's client number)")
    values = {"data-path": str(Path(args.data_path).absolute()), "client-id": args.client_id}
    if args.text_column:
        values["text-column"] = args.text_column
    if args.label_column:
        values["label-column"] = args.label_column
    return values
