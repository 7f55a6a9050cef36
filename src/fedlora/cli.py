"""`fedlora` on the command line: parse → config → run → print. Thin on purpose."""

from __future__ import annotations

import argparse
import sys

from fedlora.errors import ConfigError, FedloraError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Private federated fine-tuning of transformers with LoRA and FFA-LoRA.")
    from fedlora import __version__

    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment (no arguments: the default job)")
    run.add_argument("--config", help="TOML config file (default: built-in defaults)")
    run.add_argument("--out", help="run folder to create (default: runs/<method>-eps<ε>-<time>)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the interrupted run of folder DIR (kept in DIR.partial/) "
                          "from its last checkpoint, with its saved config")
    run.add_argument("overrides", nargs="*", metavar="section.key=value",
                     help="config overrides, e.g. privacy.epsilon=inf method.name=lora")
    sub.add_parser("methods", help="list the federated methods")
    aud = sub.add_parser("audit", help="one training run with gradient canaries in one client's DP "
                         "sums, then a lower bound on its ε (audit.json, audit.md in the run folder)")
    aud.add_argument("--config", help="TOML config file (default: the default job)")
    aud.add_argument("--out", help="run folder to create (default: runs/audit-<method>-eps<ε>-<time>)")
    aud.add_argument("--client", type=int, default=0, metavar="K", help="the audited client (default: 0)")
    aud.add_argument("--canaries", type=int, default=1000, metavar="M",
                     help="canaries, each included with probability ½ (default: 1000)")
    aud.add_argument("--guesses", default="100,100", metavar="K_IN,K_OUT",
                     help="guess 'in' for the K_IN highest scores and 'out' for the K_OUT lowest, "
                          "fixed before training (default: 100,100)")
    aud.add_argument("--break", dest="broken", choices=["noise", "sigma/10", "clip"],
                     help="FOR TESTING THE AUDIT ONLY: audit a deliberately broken mechanism (no "
                          "noise, a tenth of it, no clipping); the run's ε is then false")
    aud.add_argument("overrides", nargs="*", metavar="section.key=value",
                     help="config overrides, e.g. method.name=lora federation.rounds=2")
    pred = _run_command(sub, "predict", "classify new texts with a finished run's model, or "
                        "answer prompts with a causal one (CSV out)", compute=True)
    pred.add_argument("--input", required=True, metavar="FILE",
                      help="CSV, TSV or JSONL file (optionally .gz/.bz2) with a column of texts")
    pred.add_argument("--text-column", default="text", help="the column holding the texts (default: text)")
    pred.add_argument("--out", required=True, metavar="FILE",
                      help="CSV to write: row, label, p_<class> for each class (never overwritten)")
    mg = _run_command(sub, "merge", "write a run's classifier as one plain model folder (LoRA folded in)")
    mg.add_argument("--out", required=True, metavar="DIR", help="folder to create (never overwritten)")
    ev = _run_command(sub, "evaluate", "score a finished run's model on a labelled file: accuracy, "
                      "per-class P/R/F1, confusion matrix, calibration (CSV, JSON, PNG)", compute=True)
    ev.add_argument("--data", required=True, metavar="FILE",
                    help="CSV, TSV or JSONL file (optionally .gz/.bz2) with texts and labels")
    ev.add_argument("--text-column", default="text", help="the column holding the texts (default: text)")
    ev.add_argument("--label-column", default="label", help="the column holding the labels (default: label)")
    ev.add_argument("--out", metavar="DIR",
                    help="folder to create (default: RUN/evaluation-<file name>; never overwritten)")
    data = sub.add_parser("data", help="write generated prompt/answer pairs (reasoning-gym) to JSONL")
    data.add_argument("generator", choices=["gsm", "arithmetic"],
                      help="gsm: GSM-Symbolic word problems; arithmetic: 2–3 terms of 1–2 digits, + and −")
    data.add_argument("--out", required=True, help="the .jsonl file to write")
    data.add_argument("--size", type=int, required=True, help="number of pairs")
    data.add_argument("--seed", type=int, default=0, help="the same seed gives the same pairs")
    show = sub.add_parser("config", help="print the resolved config as TOML; --explain: every key's "
                          "meaning, type and default")
    show.add_argument("--config")
    show.add_argument("--explain", nargs="?", const="", metavar="KEY",
                      help="explain every key, a section's (e.g. privacy) or one (privacy.epsilon)")
    show.add_argument("overrides", nargs="*", metavar="section.key=value")
    sweep = sub.add_parser("sweep", help="run every setting of a grid config (keys holding lists), "
                                         "skipping complete runs and resuming interrupted ones")
    sweep.add_argument("--config", required=True, metavar="GRID.toml",
                       help="grid: a config whose keys may hold lists, plus [sweep], [select], "
                            "[[cases]] (see configs/study/)")
    sweep.add_argument("--out", help="folder for the run folders (default: sweep.out in the grid)")
    sweep.add_argument("--shard", metavar="I/N",
                       help="make only every N-th run, starting at the I-th (1-based): N "
                            "processes or machines sharing the out folder split the sweep")
    sweep.add_argument("--only", action="append", default=[], metavar="KEY=VALUES",
                       help="make only the runs with these values, named as in the whole sweep "
                            "(which finds them complete later), e.g. --only seed=0 or "
                            "--only 'method.name=[lora, ffa]'; repeat for several keys")
    sweep.add_argument("--dry-run", action="store_true",
                       help="list the runs and which are complete; run nothing")
    sweep.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="grid overrides; a list sweeps, e.g. seed=[0,1] threads=1")
    rep = sub.add_parser("report", help="tables (CSV, Markdown) and plots (PNG) of run folders")
    rep.add_argument("dirs", nargs="+", metavar="DIR",
                     help="run folders, or folders of run folders (a sweep's out)")
    rep.add_argument("--out", help="where to write (default: DIR/report for one DIR)")
    rep.add_argument("--target", action="append", metavar="ACC[,ACC...]",
                     help="test accuracy (or accuracies, comma-separated or repeated) for the "
                          "bytes-to-target table (default: the highest every setting reaches)")
    from fedlora.federation.flower.cli import add_parser as add_flower

    add_flower(sub)
    return parser


def _run_command(sub, name: str, help: str, compute: bool = False) -> argparse.ArgumentParser:
    """A command that uses a finished run: RUN and --client K, and with `compute` --device and
    --batch-size."""
    cmd = sub.add_parser(name, help=help)
    cmd.add_argument("run", metavar="RUN", help="the run folder `fedlora run` wrote")
    cmd.add_argument("--client", type=int, metavar="K",
                     help="a personalised run's site K's own model (fedsa, method.head=local)")
    if compute:
        cmd.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
        cmd.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # `cmd DIR --opt X key=value`: argparse stops filling a positional list at the first option,
    # so overrides given after options arrive here; take them if they look like overrides.
    if extra and getattr(args, "overrides", None) is not None and all(
            "=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _dispatch(args)
    except FedloraError as err:
        print(f"fedlora: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        kept = _notes(err)
        print(f"fedlora: interrupted — {kept or 'nothing was written'}", file=sys.stderr)
        return 130


def _guesses(text: str) -> tuple[int, int]:
    try:
        k_in, k_out = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--guesses '{text}': give two whole numbers K_IN,K_OUT, e.g. 100,100") from None
    return k_in, k_out


def _notes(err: BaseException) -> str:
    return " ".join(getattr(err, "__notes__", []))


def _one_line(err: BaseException) -> str:
    """The message and any note (where a resumable run was kept) on one line."""
    notes = _notes(err)
    return " ".join((f"{err}; {notes}" if notes else str(err)).split())


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "methods":
        from fedlora.methods import available_methods, method_class

        for name in available_methods():
            cls = method_class(name)
            can = [label for label, flag in (("method.client_ranks", cls.supports_client_ranks),
                                             ("method.chain_every", cls.supports_chains)) if flag]
            print(f"{name:10s} {cls.__doc__.strip().splitlines()[0]}"
                  + (f" [works with {', '.join(can)}]" if can else ""))
        return 0
    if args.command == "predict":
        from fedlora.predict import predict_file

        n = predict_file(args.run, args.input, args.out, args.text_column, args.client,
                         args.device, args.batch_size, progress=sys.stderr.isatty())
        print(f"wrote {n:,} predictions to {args.out}")
        return 0
    if args.command == "merge":
        from fedlora.merge import HEAD_META, merge_run

        out = merge_run(args.run, args.out, args.client)
        how = ("fedlora.merge.load_merged(DIR)" if (out / HEAD_META).exists()
               else "AutoModelForSequenceClassification.from_pretrained(DIR)")
        print(f"wrote the merged classifier to {out}; load it with {how}")
        return 0
    if args.command == "evaluate":
        from fedlora.evaluate import evaluate_file

        m = evaluate_file(args.run, args.data, args.out, args.text_column, args.label_column,
                          args.client, args.device, args.batch_size, progress=sys.stderr.isatty())
        print(f"{m['texts']:,} texts: accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}, "
              f"ECE {m['expected_calibration_error']:.4f} — written to {m['folder']}")
        return 0
    if args.command == "data":
        from fedlora.data.generators import generate, write_jsonl

        out = write_jsonl(generate(args.generator, args.size, args.seed), args.out)
        print(f"wrote {args.size} {args.generator} pairs to {out} (seed {args.seed}); train on them "
              f"with task.kind=causal data.path={out} data.text_column=question "
              "data.label_column=answer")
        return 0
    if args.command == "audit":
        from fedlora.audit.run import AuditPlan, audit

        audit(args.config, args.out, args.overrides, AuditPlan(
            client=args.client, canaries=args.canaries, broken=args.broken,
            **dict(zip(("guesses_in", "guesses_out"), _guesses(args.guesses)))))
        return 0
    if args.command == "flower":
        from fedlora.federation.flower.cli import dispatch

        return dispatch(args)
    if args.command == "sweep":
        from fedlora.study.grid import load_grid, parse_only
        from fedlora.study.sweep import parse_shard, sweep

        shard = parse_shard(args.shard) if args.shard else None
        grid = load_grid(args.config, args.overrides)
        parse_only(grid, args.only)
        sweep(grid, args.out, dry_run=args.dry_run, shard=shard)
        return 0
    if args.command == "report":
        from fedlora.study.report import parse_targets, write_report

        write_report(args.dirs, args.out, parse_targets(args.target))
        return 0
    from fedlora.config import config_to_toml, load_config

    if args.command == "config":
        if args.explain is not None:
            from fedlora.config import explain

            for key, typ, default, meaning in explain(args.explain):
                print(f"{key} ({typ}, default {default})\n    {meaning}")
            return 0
        print(config_to_toml(load_config(args.config, args.overrides)), end="")
        return 0
    from fedlora.api import run

    if args.resume:
        if args.out:
            raise ConfigError("--resume continues a run in its own folder — drop --out")
        run(args.config, overrides=args.overrides, resume=args.resume)
        return 0
    run(load_config(args.config, args.overrides), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
