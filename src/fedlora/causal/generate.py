"""Greedy generation for held-out prompts, and the exact-match scorers.

`greedy_generate` left-pads each batch (so every prompt's next token is at the last position)
and lets transformers' `generate` pick argmax tokens, at most `max_new_tokens` of them; the
answer is what comes before the first end-of-sequence token.

Scorers, `score(generated, answer) -> bool`:

- ``numeric`` — the generation's last number equals the answer's number ("17 + 25 = 42" and
  "42" both match "42"; thousands separators are ignored); a non-numeric answer falls back to
  ``exact``;
- ``gsm`` — reasoning-gym's own `gsm_symbolic` scorer gives 1.0 (it reads the first number);
- ``exact`` — the stripped texts are equal.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from fedlora.device import device_of
from fedlora.errors import ConfigError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], pad_id: int, eos_id: int,
                    max_new_tokens: int, batches: list[list[int]]) -> list[list[int]]:
    """The greedily generated token ids after each prompt, cut before the first eos."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_id, eos_token_id=eos_id)
    out: list[list[int]] = [[] for _ in prompts]
    device = device_of(model)  # prompts are padded on the CPU, generated on the model's device
    model.eval()
    for idx in batches:
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            ids[row, width - n:] = torch.tensor(prompts[i])
            mask[row, width - n:] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   generation_config=config)
        for row, i in enumerate(idx):
            new = generated[row, width:].tolist()
            out[i] = new[:new.index(eos_id)] if eos_id in new else new
    return out


def _number(text: str) -> float | None:
    found = NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))
    return float(found[-1]) if found else None


def numeric_match(generated: str, answer: str) -> bool:
    want = _number(answer)
    if want is None or NUMBER.fullmatch(answer.strip().replace(",", "")) is None:
        return exact_match(generated, answer)
    got = _number(generated)
    return got is not None and got == want


def exact_match(generated: str, answer: str) -> bool:
    return generated.strip() == answer.strip()


def _gsm_scorer() -> Callable[[str, str], bool]:
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError('task.scorer=gsm needs reasoning-gym — install it: pip install '
                          '"reasoning-gym==0.1.25" (or pip install -e ".[causal]")') from None
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=1, seed=0)
    return lambda generated, answer: dataset.score_answer(generated, {"answer": answer}) == 1.0


#: `task.scorer` → a function building the scorer; the names are `fedlora.config.SCORERS`
SCORER_BUILDERS: dict[str, Callable[[], Callable[[str, str], bool]]] = {
    "numeric": lambda: numeric_match,
    "exact": lambda: exact_match,
    "gsm": _gsm_scorer,  # imports reasoning-gym only when asked for
}


def get_scorer(name: str) -> Callable[[str, str], bool]:
    return SCORER_BUILDERS[name]()
