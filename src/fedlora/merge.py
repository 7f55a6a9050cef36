"""`fedlora merge RUN --out DIR`: a run's classifier as one plain model folder, adapter folded in.

W = W0 + Δ + (α/r)·B·A for every LoRA layer (Δ: the run's base-weight changes and merged chain
links), the trained head, and the feature centre already folded into the head's bias
(b − W·μ): the folder needs neither PEFT nor fedlora's adapter files.

* A classifier with the model's own head (`model.pooling = "cls"`) is written as transformers
  writes it, with the class names in `config.json` (`id2label`): load it with
  `AutoModelForSequenceClassification.from_pretrained(DIR)`.
* A mean-pooling classifier (the shipped sentence-transformers model) is the merged encoder
  (`AutoModel.from_pretrained(DIR)`; with the original `modules.json` and pooling folders,
  sentence-transformers loads the same embedding model), plus its head in
  `classifier.safetensors` and `fedlora_head.json` (pooling and class names):
  `fedlora.merge.load_merged(DIR)` rebuilds the classifier.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlora.errors import ConfigError
from fedlora.fsutil import whole_folder

HEAD_FILE, HEAD_META = "classifier.safetensors", "fedlora_head.json"


def merged_classifier_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain classifier's state dict: LoRA folded into the base weights, the trained head
    (PEFT's `modules_to_save` copy) under its own name."""
    from fedlora.causal.model import merged_state

    out = {}
    for key, value in merged_state(peft_model).items():
        if ".original_module." in key:
            continue
        out[key.replace(".modules_to_save.default.", ".")] = value
    return out


def merge_run(run: str | Path, out: str | Path, client: int | None = None) -> Path:
    """Write `run`'s final classifier (site `client`'s for a personalised run) to `out`,
    whole or not at all; an existing `out` is never replaced."""
    from fedlora.model import base_model_name, resolve_model_path
    from fedlora.modelcard import write_card
    from fedlora.pooling import MeanPoolingClassifier
    from fedlora.predict import load_trained

    target = Path(out)
    if target.exists():
        raise ConfigError(f"--out '{target}' exists — choose another folder, or delete it first")
    if not target.parent.is_dir():
        raise ConfigError(f"--out '{target}': folder '{target.parent}' does not exist — create it first")
    _refuse_mixture(Path(run))
    clf = load_trained(run, client, device="cpu")
    base = clf.model.get_base_model()
    state = merged_classifier_state(clf.model)
    names = dict(enumerate(clf.label_names))
    with whole_folder(target) as partial:
        if isinstance(base, MeanPoolingClassifier):
            _write_pooled(base, state, partial, resolve_model_path(clf.config.model.path), names)
        else:
            _write_plain(base, state, partial, names)
        clf.tokenizer.save_pretrained(str(partial))
        summary = json.loads((Path(run) / "summary.json").read_text(encoding="utf-8"))
        write_card(partial, clf.config, summary, base_model_name(clf.config.model.path), merged=True)
    return target


def _refuse_mixture(run: Path) -> None:
    """A mixture of experts cannot be folded into the weights: its gate weighs the experts by
    each token's own input, so no single W0 + ΔW computes it."""
    from fedlora.methods import method_class
    from fedlora.predict import _read_run

    config = _read_run(run)[1]
    if not method_class(config.method.name).peft_export:
        raise ConfigError(f"'{run}' is a mixture of LoRA experts ({config.method.name}): its gate "
                          "weighs the experts differently for every token, so no merged weight "
                          "computes it — use fedlora predict or fedlora evaluate with --client K")


def _write_plain(base, state: dict, folder: Path, names: dict[int, str]) -> None:
    from transformers import AutoModelForSequenceClassification

    config = base.config
    config.id2label, config.label2id = names, {v: k for k, v in names.items()}
    plain = AutoModelForSequenceClassification.from_config(config)
    plain.load_state_dict(state, strict=True)
    plain.save_pretrained(str(folder))


def _write_pooled(base, state: dict, folder: Path, source: str, names: dict[int, str]) -> None:
    encoder = _plain_encoder(base)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()
                             if k.startswith("encoder.")}, strict=True)
    encoder.save_pretrained(str(folder))
    save_file({k.removeprefix("classifier."): v.contiguous() for k, v in state.items()
               if k.startswith("classifier.")}, str(folder / HEAD_FILE))
    pooling = "mean_normalized" if base.normalize else "mean"
    (folder / HEAD_META).write_text(json.dumps(
        {"pooling": pooling, "label_names": [names[k] for k in sorted(names)]}, indent=2) + "\n")
    for extra in ("modules.json", "1_Pooling", "2_Normalize", "sentence_bert_config.json"):
        src = Path(source) / extra
        if src.is_dir():
            shutil.copytree(src, folder / extra)
        elif src.is_file():
            shutil.copy(src, folder / extra)


def _plain_encoder(base) -> torch.nn.Module:
    """An empty encoder of the same class and config as `base.encoder` (no pooler if it has none)."""
    encoder = base.encoder
    return type(encoder)(encoder.config, **({"add_pooling_layer": False}
                                            if getattr(encoder, "pooler", 1) is None else {}))


def load_merged(folder: str | Path) -> torch.nn.Module:
    """A folder `merge_run` wrote, as a classifier in eval mode (logits as the run's model)."""
    from transformers import AutoModelForSequenceClassification

    from fedlora.model import load_classifier

    folder = Path(folder)
    if not (folder / HEAD_META).exists():
        return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    meta = json.loads((folder / HEAD_META).read_text())
    model = load_classifier(str(folder), len(meta["label_names"]), seed=0, pooling=meta["pooling"])
    model.classifier.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return model.eval()
