"""Predicates on PEFT state-dict names: which tensor is a LoRA A, a LoRA B, the task head."""


def is_lora_a(key: str) -> bool:
    return ".lora_A." in key


def is_lora_b(key: str) -> bool:
    return ".lora_B." in key


def is_head(key: str) -> bool:
    """The task head (PEFT's `modules_to_save`, e.g. BERT's `classifier`)."""
    return not is_lora_a(key) and not is_lora_b(key)
