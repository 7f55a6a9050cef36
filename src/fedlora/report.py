"""What a person reads in the terminal: the setup, one line per round, a closing table."""

from __future__ import annotations

import math
from typing import Any

from fedlora.config import Config


def _eps(x: float) -> str:
    return "∞" if x is None or math.isinf(x) else f"{x:.2f}"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def banner(config: Config) -> str:
    privacy = (f"DP-SGD ε={_eps(config.privacy.epsilon)}, δ={config.privacy.delta:g}, "
               f"clip={config.privacy.clip:g} per client" if config.private else "no DP (ε=∞)")
    m, f = config.method, config.federation
    from fedlora.device import describe_device

    if config.private and config.privacy.noise == "seeded":
        privacy += (" · seeded noise (privacy.noise=seeded): ε holds only against parties who do "
                    "not know the seed")
    return (f"fedlora: {m.name} r={m.rank} α={m.alpha:g} on {','.join(m.target_modules)} · "
            f"{f.clients} clients × {f.rounds} rounds × {f.local_steps} local steps · {privacy} · "
            f"device {describe_device(config.device)}")


def describe_setup(exp) -> str:
    labels = (f", labels {exp.dataset.label_names}" if exp.task.kind == "classification"
              else f", {exp.task.kind} task")
    lines = [f"model {exp.config.model.path} · data {exp.config.data.path}: "
             f"{len(exp.dataset)} examples{labels}, test {len(exp.split.test)}"
             + (f", validation {len(exp.split.validation)}" if exp.split.validation else "")]
    for c in exp.clients:
        dp = (f"q={c.privacy.sample_rate:.3f} σ={c.privacy.noise_multiplier:.3f}"
              if c.privacy.enabled else "no DP")
        lines.append(f"  client {c.cid}: {exp.task.describe_client(c, exp.dataset)} · {dp}")
    return "\n".join(lines)


def initial_line(scores: dict[str, Any], config: Config) -> str:
    metric = "acc" if config.task.kind == "classification" else "exact match"
    return (f"round   0 (starting model) · test {metric} "
            f"{scores.get('test_accuracy', math.nan):.3f} loss {scores.get('test_loss', math.nan):.3f}")


def round_line(record: dict[str, Any], config: Config) -> str:
    acc = record.get("test_accuracy")
    metric = "acc" if config.task.kind == "classification" else "exact match"
    # a score on the fixed subset (federation.eval_examples) reads "≈" with its size, so it is
    # never taken for the whole held-out set's (the last round's, the summary's)
    sub, n = _subset(record, "test")
    scores = (f"test {metric}{sub}{acc:.3f} loss{sub}{record['test_loss']:.3f}{n}" if acc is not None
              else "(not evaluated)")
    if record.get("validation_accuracy") is not None:
        sub, n = _subset(record, "validation")
        scores += f" · val acc{sub}{record['validation_accuracy']:.3f}{n}"
    eps = f"ε {_eps(record['epsilon'])}/{_eps(config.privacy.epsilon)}" if config.private else "ε ∞"
    refused = f" · refused: {sorted(record['refused'])}" if record.get("refused") else ""
    if record.get("failed"):
        refused += f" · no answer from: {sorted(record['failed'])}"
    if record.get("rejected"):  # named with the reason: an operator must see who sent what
        refused += " · rejected " + "; ".join(
            f"client {c}: {why}" for c, why in sorted(record["rejected"].items(), key=lambda x: int(x[0])))
    return (f"round {record['round']:3d}/{config.federation.rounds} · {scores} · {eps} · "
            f"up {_bytes(record['bytes_uploaded'])} · {record['seconds']:.1f} s{refused}")


def _subset(record: dict[str, Any], prefix: str) -> tuple[str, str]:
    """(" ", "") for a whole-set score, ("≈", " (N examples)") for one on a subset of N."""
    n = record.get(f"{prefix}_examples")
    return (" ", "") if n is None else ("≈", f" ({n} examples)")


def center_line(info: dict[str, Any], config: Config) -> str:
    """The feature-centring query's outcome (`fedlora.federation.centering`)."""
    noise = f"σ_m={config.privacy.center_noise:g}" if config.private else "no noise"
    if not info.get("clients"):
        head = "feature centre: no usable answer, the classifier reads uncentred features"
    else:
        head = (f"feature centre μ from {info['clients']} clients (≈{info['examples']:.0f} "
                f"examples, {noise}): ‖μ‖ = {info['norm']:.3f}")
    problems = {**info.get("rejected", {}), **info.get("refused", {}), **info.get("failed", {})}
    extra = "".join(f" · client {c}: {why}" for c, why in sorted(problems.items()))
    return f"{head} · up {_bytes(info['bytes_uploaded'])} · {info['seconds']:.1f} s{extra}"


def summary_table(s: dict[str, Any]) -> str:
    rows = [
        ("method", s["method"]),
        (f"test {s.get('metric', 'accuracy')}",
         f"{s['test_accuracy']:.4f}" if s["test_accuracy"] is not None else "-"),
        *([("  before round 1", f"{s['initial']['test_accuracy']:.4f} (loss "
                                f"{s['initial']['test_loss']:.4f})")] if s.get("initial") else []),
        ("test loss", f"{s['test_loss']:.4f}" if s.get("test_loss") is not None else "-"),
        ("majority-class accuracy",
         f"{s['majority_accuracy']:.4f}" if s.get("majority_accuracy") is not None else "-"),
        ("ε spent (max over clients)", f"{_eps(s['epsilon'])} (target {_eps(s['epsilon_target'])}, "
                                        f"δ={s['delta']:g}, {s['accountant']})"),
        ("ε per client", ", ".join(_eps(e) for e in s["epsilon_per_client"])),
        ("noise multiplier σ", ", ".join("-" if x is None else f"{x:.3f}" for x in s["noise_multiplier"])),
        ("rounds", f"{s['rounds']}/{s['rounds_planned']}"),
        ("steps per client", ", ".join("-" if x is None else str(x) for x in s["steps"])),
        ("trainable parameters", f"{s['trainable_parameters']:,}"),
        ("bytes uploaded / downloaded", f"{_bytes(s['bytes_uploaded'])} / {_bytes(s['bytes_downloaded'])}"),
        ("wall time", f"{s['wall_seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "─" * (width + 40)
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line, *_learnt_nothing(s)])


# a test accuracy this close to the majority class's (or below it) is a model that answers
# (almost) always the same: seen at a too-large rate or α (docs/study.md, study 2)
MAJORITY_MARGIN = 0.005


def _learnt_nothing(s: dict[str, Any]) -> list[str]:
    """A warning when the final test accuracy is no better than always answering the majority."""
    acc, majority = s.get("test_accuracy"), s.get("majority_accuracy")
    if acc is None or majority is None or acc > majority + MAJORITY_MARGIN:
        return []
    return [f"warning: test accuracy {acc:.4f} is no better than always answering the majority "
            f"class ({majority:.4f}) — the model learnt nothing usable; try a smaller train.lr "
            "or method.alpha (docs/tuning.md)"]
