"""The model card a run writes beside its weights: `adapter/README.md` (and `merged/README.md`).

The YAML header is what the Hugging Face Hub and PEFT read (`library_name: peft`, `base_model`,
`tags`, `pipeline_tag`); the body says how the model was trained and what its privacy guarantee
is: ε per site, δ, the accountant, where the noise came from, the neighbouring relation — the
facts a reader needs to judge the ε, all from the run's `summary.json` and `config.toml`. Only
what the server legitimately holds is written: the sites' example counts are public under the
threat model (docs/privacy.md), nothing else about their data is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedlora.config import Config

NEIGHBOURS = ("add or remove one training example of one site (example-level DP for each site, "
              "against the server, the other sites and whoever receives the model)")


def card(config: Config, summary: dict[str, Any], base_model: str, merged: bool = False,
         site: str | None = None) -> str:
    """The card's text: YAML front matter, then Markdown. `merged`: the card of a folder with
    the adapter folded into the weights (a plain transformers model, no PEFT); `site`: the card
    of one site's own adapter in a personalised run (`clients/<k>/adapter`)."""
    text = _front_matter(config, summary, base_model, merged) + _body(config, summary, base_model, merged)
    if site is None:
        return text
    title, _, rest = text.partition("\n# ")[2].partition("\n")
    own = (f"\n# {title} — site {site}'s own model\n\nThis folder is site {site}'s personalised "
           "adapter (its own tensors with the shared ones); use it with "
           f"`fedlora predict RUN --client {site}`.\n")
    return text.partition("\n# ")[0] + own + rest


def write_card(folder: Path, config: Config, summary: dict[str, Any], base_model: str,
               merged: bool = False, site: str | None = None) -> None:
    if folder.is_dir():
        (folder / "README.md").write_text(card(config, summary, base_model, merged, site),
                                          encoding="utf-8")


def _front_matter(config: Config, summary: dict, base_model: str, merged: bool) -> str:
    causal = config.task.kind == "causal"
    tags = ["fedlora", "federated-learning", "lora", f"method-{config.method.name}"]
    if _private(summary):
        tags.append("differential-privacy")
    lines = ["---", f"library_name: {'transformers' if merged else 'peft'}", f"base_model: {_yaml(base_model)}",
             f"pipeline_tag: {'text-generation' if causal else 'text-classification'}", "tags:"]
    lines += [f"- {t}" for t in tags]
    return "\n".join(lines) + "\n---\n\n"


def _body(config: Config, summary: dict, base_model: str, merged: bool) -> str:
    p, f, m = config.privacy, config.federation, config.method
    metric = summary.get("metric", "accuracy")
    score = summary.get("test_accuracy")
    lines = [
        f"# {m.name} {'model (adapter merged into' if merged else 'adapter for'} {base_model}"
        f"{')' if merged else ''}, trained by fedlora",
        "",
        f"LoRA (r = {m.max_rank}, α = {m.alpha:g}, on {', '.join(m.target_modules)}) trained across "
        f"{summary.get('clients', f.clients)} sites that never shared their data, for "
        f"{summary.get('rounds')} rounds × {f.local_steps} local steps, method `{m.name}`"
        + (f" chained every {m.chain_every} rounds" if m.chain_every else "") + ".",
        "",
        "## Privacy",
        "",
    ]
    if _private(summary):
        eps = summary.get("epsilon_per_client") or []
        lines += [
            f"- **(ε, δ) per site: ε ≤ {max(eps, default=0):.3f}** (each site: "
            + ", ".join(f"{e:.3f}" for e in eps) + f"), δ = {p.delta:g}, over every step each "
            "site took (all rounds, and the feature-centring query if any).",
            f"- Neighbouring data sets: {NEIGHBOURS}.",
            f"- Accountant: `{p.accountant}`; per-example clipping at C = {p.clip:g}; noise "
            "multipliers " + ", ".join(f"{s:.3f}" for s in summary.get("noise_multiplier") or [] if s)
            + ".",
            "- Noise: " + ("drawn from each site's secret key (the seed in the config does not "
                          "reveal it)" if p.noise == "secret" else
                          "**derived from the run's seed** (`privacy.noise = \"seeded\"`): the ε "
                          "holds only against parties who do not know the seed") + ".",
            "- Public under the threat model: each site's number of training examples "
            f"({', '.join(str(n) for n in summary.get('client_sizes') or [] if n is not None)}).",
        ]
    else:
        lines.append("**No differential privacy** (`privacy.epsilon = inf`): the model may reveal "
                     "its training data.")
    lines += ["", "## Evaluation", ""]
    if score is not None:
        what = "each site's own model on its own held-out data (mean)" \
            if summary.get("test_accuracy_per_client") else "the server's held-out test set"
        lines.append(f"- test {metric}: {score:.4f} on {what}")
    if summary.get("test_loss") is not None:
        lines.append(f"- test loss: {summary['test_loss']:.4f}")
    if summary.get("majority_accuracy") is not None:
        lines.append(f"- always predicting the majority class: {summary['majority_accuracy']:.4f}")
    if summary.get("label_names"):
        lines.append(f"- classes (the head's outputs, in order): {', '.join(summary['label_names'])}")
    personal = bool(summary.get("test_accuracy_per_client"))
    if config.task.kind != "classification":
        use = "# merged/ loads with transformers' AutoModelForCausalLM.from_pretrained"
    elif merged:
        use = ("python -c \"from fedlora.merge import load_merged; print(load_merged('DIR'))\"  "
               "# DIR: this folder")
    elif personal:
        use = "fedlora predict RUN --client K --input texts.csv --out predictions.csv  # site K's model"
    else:
        use = "fedlora predict RUN --input texts.csv --out predictions.csv   # RUN: this run's folder"
    again = ("the same run, bit for bit" if p.noise == "seeded"
             else "the same recipe; the secret noise differs")
    lines += ["", "## Use and reproduce", ""]
    if personal:
        lines += ["Personalised: this folder holds the shared part; each site's own model is "
                  "`clients/<k>/adapter` (on Flower it stays at its site).", ""]
    lines += ["```bash", use, f"fedlora run --config RUN/config.toml   # {again}", "```", ""]
    return "\n".join(lines)


def _private(summary: dict) -> bool:
    return bool(summary.get("private")) and not math.isinf(summary.get("epsilon_target", math.inf))


def _yaml(text: str) -> str:
    """A YAML scalar: quoted when it could be read as something else."""
    plain = text and all(c.isalnum() or c in "-_./" for c in text) and not text[0] in "-./"
    return text if plain else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
