"""Use a finished run's classifier: `fedlora predict RUN --input texts.csv --out predictions.csv`.

The model is rebuilt the way PEFT users load it, from what the run folder holds: the base model
the run named (`config.toml`), any base-weight change (`base_delta.safetensors`), then the
exported adapter (`adapter/`, with the feature centre folded into the head's bias). Class k of
the head is `summary.json`'s `label_names[k]`. Personalised runs have one model per site:
`--client K` picks site K's (`clients/K/adapter`).

Each row of the output is p(class | text) = softmax(logits), computed in float64 from the
model's logits; `label` is the most probable class (the first one on a tie, as argmax).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.config import Config, load_config
from fedlora.data.batching import collate, encode, eval_batches
from fedlora.data.sources import load_texts
from fedlora.device import resolve_device, to_device
from fedlora.errors import ConfigError, DataError
from fedlora.experiment import pad_id_of
from fedlora.fsutil import atomic_write_bytes
from fedlora.mixture import MIXTURE_FILE


@dataclass
class TrainedClassifier:
    """A run's final classifier, ready to predict: model (eval mode, on its device),
    tokenizer, class names in the head's order, and the run's config."""

    model: Any
    tokenizer: Any
    label_names: list[str]
    config: Config


def load_trained(run: str | Path, client: int | None = None, device: str = "auto") -> TrainedClassifier:
    """The classifier a finished classification run exported (site `client`'s own model for
    a personalised run); see the module docstring for how it is assembled."""
    from peft import PeftModel

    from fedlora.model import apply_base_delta, load_classifier, load_tokenizer, resolve_model_path

    folder = Path(run)
    summary, config = _read_run(folder)
    if config.task.kind != "classification":
        raise ConfigError(f"'{folder}' is a {config.task.kind} run, not a classifier — "
                          "fedlora predict generates answers with it; fedlora evaluate and merge "
                          "take classification runs (a causal run's merged/ is its merged model)")
    adapter = _adapter_folder(folder, summary, config, client)
    names = summary.get("label_names")
    if not names:
        raise ConfigError(f"{folder}/summary.json names no classes (label_names): the run was "
                          "written by an older fedlora — run it again to predict with it")
    path = resolve_model_path(config.model.path)
    base = load_classifier(path, len(names), config.seed, config.model.pooling)
    if (adapter / MIXTURE_FILE).exists():
        model = _load_mixture(base, adapter / MIXTURE_FILE, config)
        return TrainedClassifier(model.eval().to(resolve_device(device)), load_tokenizer(path),
                                 list(names), config)
    if (folder / "base_delta.safetensors").exists():
        apply_base_delta(base, folder / "base_delta.safetensors")
    model = PeftModel.from_pretrained(base, str(adapter)).eval().to(resolve_device(device))
    return TrainedClassifier(model, load_tokenizer(path), list(names), config)


def _load_mixture(base, file: Path, config: Config):
    """A mixture of experts (mole): the run's model rebuilt as training built it (LoRA, then the
    method's experts and gates), then every exported tensor installed by its state key."""
    from safetensors.torch import load_file

    from fedlora.methods import get_method
    from fedlora.model import AdapterHandle, attach_lora

    model = attach_lora(base, config.method, config.seed)
    get_method(config.method).extend_model(model, config)
    handle = AdapterHandle.of(model)
    state = load_file(str(file))
    unknown = sorted(set(state) - set(handle.shapes()))
    if unknown:
        raise ConfigError(f"{file}: {unknown[:2]} are not tensors of the model its config.toml "
                          "builds — the run folder's files do not belong together")
    handle.install(state)
    return model


def _read_run(folder: Path) -> tuple[dict, Config]:
    if not folder.is_dir():
        raise ConfigError(f"run folder '{folder}' not found — give the folder `fedlora run` "
                          "wrote (its first line says where, e.g. runs/ffa-eps3-…)")
    if not (folder / "summary.json").exists():
        raise ConfigError(f"'{folder}' is not a finished run (no summary.json) — finish it with "
                          f"fedlora run --resume {folder}, or give a finished run's folder")
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}/summary.json is unreadable ({err}) — give an intact run folder") from None
    return summary, load_config(folder / "config.toml")


def _adapter_folder(folder: Path, summary: dict, config: Config, client: int | None) -> Path:
    from fedlora.methods import method_class

    personalised = config.method.head == "local" or method_class(config.method.name).always_personalised
    if personalised and client is None:
        raise ConfigError(f"'{folder}' is personalised ({config.method.name}, head "
                          f"{config.method.head}): each site has its own model — add --client K "
                          f"(0 … {config.federation.clients - 1}) to use site K's")
    if not personalised and client is not None:
        raise ConfigError(f"'{folder}' trained one shared model — drop --client")
    adapter = folder / "adapter" if client is None else folder / "clients" / str(client) / "adapter"
    if not (adapter / "adapter_config.json").exists() and not (adapter / MIXTURE_FILE).exists():
        where = "its sites keep their own adapters (Flower)" if client is not None else "incomplete"
        raise ConfigError(f"'{adapter}' holds no adapter ({where}) — give a run folder with it")
    return adapter


@torch.no_grad()
def class_probabilities(clf: TrainedClassifier, texts: list[str], batch_size: int = 64,
                        progress: bool = False) -> torch.Tensor:
    """(len(texts), classes) float64 probabilities; batches grouped by length (little padding)."""
    ids = encode(clf.tokenizer, texts, clf.config.model.max_length)
    out = torch.empty(len(texts), len(clf.label_names), dtype=torch.float64)
    device = next(clf.model.parameters()).device
    pad = pad_id_of(clf.tokenizer)
    batches = eval_batches([len(t) for t in ids], batch_size)
    done = 0
    for idx in batches:
        logits = clf.model(**to_device(collate(ids, idx, pad), device)).logits
        out[idx] = torch.softmax(logits.double().cpu(), dim=-1)
        done += len(idx)
        if progress:
            print(f"\rpredicted {done:,} of {len(texts):,} texts", end="", file=sys.stderr, flush=True)
    if progress and batches:
        print(file=sys.stderr)
    return out


def generate_answers(run: str | Path, prompts: list[str], client: int | None = None,
                     device: str = "auto", batch_size: int = 64) -> list[str]:
    """A causal run's greedy answers to `prompts`, formatted as in training (the run's chat
    template setting), at most `task.max_new_tokens` tokens, cut at end-of-sequence — what its
    evaluation scored."""
    from peft import PeftModel

    from fedlora.causal.generate import greedy_generate
    from fedlora.causal.model import load_causal_lm
    from fedlora.causal.prompts import PromptFormat
    from fedlora.model import apply_base_delta, load_tokenizer, resolve_model_path

    folder = Path(run)
    summary, config = _read_run(folder)
    adapter = _adapter_folder(folder, summary, config, client)
    path = resolve_model_path(config.model.path)
    base = load_causal_lm(path)
    if (folder / "base_delta.safetensors").exists():
        apply_base_delta(base, folder / "base_delta.safetensors")
    model = PeftModel.from_pretrained(base, str(adapter)).eval().to(resolve_device(device))
    tokenizer = load_tokenizer(path)
    fmt = PromptFormat.of(tokenizer, config.task.chat_template)
    ids = fmt.prompt_ids(prompts)
    generated = greedy_generate(model, ids, pad_id_of(tokenizer), fmt.eos_id,
                                config.task.max_new_tokens, eval_batches([len(t) for t in ids], batch_size))
    return [fmt.decode(g) for g in generated]


def csv_bytes(header: list, rows: list[list]) -> bytes:
    """A CSV file's bytes (UTF-8, \\n line ends): `header`, then `rows`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def predictions_csv(probabilities: torch.Tensor, label_names: list[str]) -> bytes:
    """CSV: `row` (1-based, the input's data-row order), `label`, then `p_<class>` per class."""
    best = probabilities.argmax(dim=1).tolist()
    return csv_bytes(["row", "label", *(f"p_{n}" for n in label_names)],
                     [[i + 1, label_names[k], *(f"{p:.6f}" for p in row)]
                      for i, (k, row) in enumerate(zip(best, probabilities.tolist()))])


def predict_file(run: str | Path, input: str | Path, out: str | Path, text_column: str = "text",
                 client: int | None = None, device: str = "auto", batch_size: int = 64,
                 progress: bool = False) -> int:
    """Classify every text of `input`'s `text_column` with `run`'s model and write `out`
    (atomically; an existing file is never replaced). Returns the number of texts."""
    target = Path(out)
    if target.exists():
        raise ConfigError(f"--out '{target}' exists — choose another file, or delete it first")
    if not target.parent.is_dir():
        raise ConfigError(f"--out '{target}': folder '{target.parent}' does not exist — create it first")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be ≥ 1, got {batch_size}")
    texts = load_texts(input, text_column)  # bad input fails before the model loads
    if _read_run(Path(run))[1].task.kind == "causal":
        answers = generate_answers(run, texts, client, device, batch_size)
        atomic_write_bytes(target, csv_bytes(["row", "answer"], [[i + 1, a] for i, a in enumerate(answers)]))
        return len(texts)
    clf = load_trained(run, client, device)
    probabilities = class_probabilities(clf, texts, batch_size, progress)
    if not torch.isfinite(probabilities).all():
        raise DataError("the model gave non-finite scores — the run's adapter is damaged; "
                        "nothing was written")
    atomic_write_bytes(target, predictions_csv(probabilities, clf.label_names))
    return len(texts)
