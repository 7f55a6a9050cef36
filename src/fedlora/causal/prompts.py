"""Prompt/answer pairs → token ids, with the position where the answer starts.

A pair becomes `prompt_ids + answer_ids + [eos]`:

- chat (the tokenizer has a chat template and `task.chat_template` is on): the prompt is the
  template applied to one user turn with the assistant's header appended
  (`add_generation_prompt=True`); the template brings its own special tokens;
- plain: `"{prompt}\\nAnswer:"` with the tokenizer's usual special tokens, then `" {answer}"`.

The end-of-sequence token closes every answer, so the model learns where to stop. Prompt and
answer are tokenised separately and concatenated, so the answer's first token is exactly where
the prompt's ids end: `answer_start = len(prompt_ids)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.errors import DataError, ModelError


@dataclass(frozen=True)
class PromptFormat:
    tokenizer: object
    chat: bool
    eos_id: int

    @classmethod
    def of(cls, tokenizer, use_chat_template: bool) -> "PromptFormat":
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = getattr(tokenizer, "sep_token_id", None)
        if eos is None:
            raise ModelError("model.path: the tokenizer has no end-of-sequence token, so a "
                             "generated answer could never end — use a causal LM's tokenizer")
        chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        return cls(tokenizer, chat, int(eos))

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        if self.chat:
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in prompts]
            return _ids(tok(texts, add_special_tokens=False))
        ids = _ids(tok([f"{p}\nAnswer:" for p in prompts], add_special_tokens=True))
        # a tokenizer that closes every text (BERT's [SEP], some EOS-appending ones) would end
        # the prompt before the answer: drop that closing token
        return [s[:-1] if s and s[-1] == self.eos_id else s for s in ids]

    def answer_ids(self, answers: list[str]) -> list[list[int]]:
        texts = answers if self.chat else [f" {a}" for a in answers]
        return [s + [self.eos_id] for s in _ids(self.tokenizer(texts, add_special_tokens=False))]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _ids(encoding) -> list[list[int]]:
    return [list(s) for s in encoding["input_ids"]]


def encode_pairs(fmt: PromptFormat, prompts: list[str], answers: list[str],
                 max_length: int) -> tuple[list[list[int]], list[int]]:
    """(token ids of prompt + answer + eos, answer start) per pair; every pair must fit in
    `max_length` tokens (an answer is never cut, and a cut prompt would change the question)."""
    if not prompts:
        return [], []
    p_ids, a_ids = fmt.prompt_ids(prompts), fmt.answer_ids(answers)
    lengths = [len(p) + len(a) for p, a in zip(p_ids, a_ids)]
    too_long = [n for n in lengths if n > max_length]
    if too_long:
        raise DataError(f"model.max_length={max_length}: {len(too_long)} of {len(lengths)} "
                        f"prompt/answer pairs are longer (the longest has {max(too_long)} tokens) — "
                        f"set model.max_length={max(lengths)} or shorten those pairs")
    return [p + a for p, a in zip(p_ids, a_ids)], [len(p) for p in p_ids]
