"""Predicates on state keys: which tensor is a LoRA A, a LoRA B, the task head, a base-weight change.

Adapter tensors are keyed by PEFT state-dict names. A change to a frozen base weight is keyed
`base_delta:` + the weight's `named_parameters()` name in the PEFT model, e.g.
`base_delta:base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight`; its
value is Δ in W = W0 + Δ (never W itself), so it can be averaged, summed and sent like any state.
"""

BASE = "base_delta:"
STATISTIC = "statistic:"  # a statistic of the clients' data the model reads (never trained)


def is_lora_a(key: str) -> bool:
    return ".lora_A." in key


def is_lora_b(key: str) -> bool:
    return ".lora_B." in key


def is_expert_a(key: str) -> bool:
    """Expert j's A in a mixture of LoRA experts (`fedlora.mixture`, method mole)."""
    return ".lora_expert_A." in key


def is_expert_b(key: str) -> bool:
    return ".lora_expert_B." in key


def is_expert(key: str) -> bool:
    return is_expert_a(key) or is_expert_b(key)


def expert_of(key: str) -> int:
    """`….lora_expert_B.3.weight` → 3: which expert a factor belongs to."""
    part = ".lora_expert_A." if is_expert_a(key) else ".lora_expert_B."
    return int(key.split(part, 1)[1].split(".", 1)[0])


def is_gate(key: str) -> bool:
    """A mixture's gate G (`fedlora.mixture`): it reads the experts' outputs, never a head."""
    return ".lora_gate." in key


def is_base(key: str) -> bool:
    """A change Δ to a frozen pre-trained weight (W = W0 + Δ)."""
    return key.startswith(BASE)


def is_statistic(key: str) -> bool:
    """A statistic the model reads, computed from the clients' data under DP before training
    (the feature centre μ): installed with the global model, never trained, not a weight."""
    return key.startswith(STATISTIC)


def is_head(key: str) -> bool:
    """The task head (PEFT's `modules_to_save`, e.g. BERT's `classifier`)."""
    return not (is_lora_a(key) or is_lora_b(key) or is_base(key) or is_statistic(key)
                or is_expert(key) or is_gate(key))


def statistic_key(buffer_name: str) -> str:
    return STATISTIC + buffer_name


#: the classifier's feature centre μ (`fedlora.pooling.MeanPoolingClassifier.feature_center`)
CENTER = STATISTIC + "base_model.model.feature_center"


def is_center(key: str) -> bool:
    return key == CENTER


def base_key(param_name: str) -> str:
    return BASE + param_name


def lora_modules(state: dict) -> dict[str, tuple[str, str]]:
    """Module prefix → (A key, B key) for every LoRA layer with both factors in `state`."""
    out = {}
    for key in state:
        if is_lora_a(key):
            prefix = key.split(".lora_A.")[0]
            b = key.replace(".lora_A.", ".lora_B.")
            if b in state:
                out[prefix] = (key, b)
    return out


def base_of(prefix: str) -> str:
    """The base-weight key of the LoRA layer at `prefix` (PEFT keeps W0 in `base_layer`)."""
    return base_key(f"{prefix}.base_layer.weight")


def native_name(key: str) -> str:
    """`base_delta:base_model.model.bert.…query.base_layer.weight` → `bert.…query.weight`:
    the name in the plain (un-PEFTed) model's `state_dict()`."""
    name = key[len(BASE):] if is_base(key) else key
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")
