"""Classifiers on a pre-trained encoder: the model's own head (CLS), or mean pooling.

Sentence-transformer checkpoints such as all-MiniLM-L6-v2 were trained to be read by averaging
their token states (their `1_Pooling/config.json` says so); their CLS token and the leftover BERT
pooler carry much less. Measured here with a logistic-regression probe on frozen features of the
shipped model (6,000 training snippets, validation split): pooler output 0.58–0.67, mean of token
states 0.72–0.75. `model.pooling = "auto"` therefore follows the checkpoint's own pooling config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput



def checkpoint_pooling(path: str) -> str:
    """The sentence-transformers pipeline in `modules.json`, if any: mean pooling, optionally
    followed by L2 normalisation ('mean' / 'mean_normalized'); otherwise 'cls'."""
    folder = Path(path)
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        types = [m.get("type", "") for m in modules]
        pooling_module = next(m for m in modules if m.get("type", "").endswith("Pooling"))
        pooling = json.loads((folder / pooling_module["path"] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return "cls"
    if not pooling.get("pooling_mode_mean_tokens"):
        return "cls"
    return "mean_normalized" if any(t.endswith("Normalize") for t in types) else "mean"


def resolve_pooling(pooling: str, path: str) -> str:
    return checkpoint_pooling(path) if pooling == "auto" else pooling


class MeanPoolingClassifier(nn.Module):
    """logits = W·(e − μ) + b with e = mean_t(h_t) over the non-padding token states h_t of the
    encoder, or e = mean_t(h_t)/‖mean_t(h_t)‖ when `normalize` (as sentence-transformers'
    Normalize does), and μ = `feature_center`, a frozen vector (0 until a run sets it).

    μ is the clients' mean feature, estimated under DP before round 1
    (`fedlora.federation.centering`): the shipped model's unit-norm embeddings share a common
    component of norm ≈ 0.46, so uncentred, the head's gradient is dominated by one direction
    and a few dozen noisy DP steps cannot learn the rest. μ changes only the parameterisation:
    W·(e − μ) + b = W·e + (b − W·μ), which is how the exported head stores it.

    Unit-norm embeddings matter under DP: a head on raw states (norm ~5, with a large common
    component) turns DP noise on W into a bias shift of every prediction.

    The head is named `classifier`, as in transformers' own classifiers, so PEFT trains and
    saves it as `modules_to_save`; `PeftModel.from_pretrained(load_classifier(...), adapter)`
    reloads it.
    """

    STATISTICS = ("feature_center",)  # buffers `AdapterHandle` installs (keys.statistic_key)

    def __init__(self, encoder: nn.Module, num_labels: int, name_or_path: str,
                 normalize: bool = False):
        super().__init__()
        self.normalize = normalize
        self.encoder = encoder
        self.config = encoder.config
        self.name_or_path = name_or_path
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1) or 0.0)
        self.classifier = nn.Linear(hidden, num_labels)
        # μ: a statistic of the clients' data (their DP mean feature), not a weight — a buffer,
        # never trained, installed by `AdapterHandle` from the global state's `statistics`
        self.register_buffer("feature_center", torch.zeros(hidden), persistent=False)

    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None) -> Tensor:
        """e per example, before centring: what `feature_center` is the mean of."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None,
                **_: object) -> SequenceClassifierOutput:
        pooled = self.features(input_ids, attention_mask, token_type_ids) - self.feature_center
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
