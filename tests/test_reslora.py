"""ResLoRA's block shortcut (`method.name = "reslora"`): the training-time model is the paper's
formula, its per-example DP gradients are exact, its export is a plain PEFT LoRA computing the
same outputs, it runs federated under DP with LoRA's ε, and what cannot work is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import fedlora
from fedlora.config import MethodConfig, load_config
from fedlora.errors import ConfigError
from fedlora.methods import get_method, residual
from fedlora.model import AdapterHandle, attach_lora, load_classifier
from fedlora.privacy.dpsgd import per_sample_gradients

A, B = ".lora_A.weight", ".lora_B.weight"


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory, tiny_model_dir):
    """A 4-layer, 32-wide BERT (with the tiny model's tokenizer): chains long enough for m = 2
    to have layers with 0, 1 and 2 predecessors."""
    out = tmp_path_factory.mktemp("deep-bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        initializer_range=0.2)
    torch.manual_seed(99)
    BertForSequenceClassification(config).save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, out / f.name)
    return out


def _reslora_model(path, blocks, rank=4, alpha=2.0, seed=0):
    """The live training-time model, with random A *and B* (B = 0 would hide every shortcut)."""
    config = MethodConfig(name="reslora", rank=rank, alpha=alpha, reslora_blocks=blocks)
    model = attach_lora(load_classifier(str(path), 2, seed, "cls"), config, seed)
    get_method(config).extend_model(model, None)
    handle = AdapterHandle.of(model)
    gen = torch.Generator().manual_seed(seed + 1)
    handle.install({k: torch.randn(p.shape, generator=gen) * 0.3 for k, p in handle.params.items()})
    return model.eval(), handle


def _batch(n=4, length=9, seed=5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 6:] = 0  # padding: example 1 is shorter
    return {"input_ids": ids, "attention_mask": mask}


def _layer_index(key):
    return int(key.split(".layer.")[1].split(".")[0])


@pytest.mark.parametrize("blocks", [1, 2])
def test_training_time_model_is_the_block_shortcut_formula(deep_dir, blocks):
    """Logits of the live model = a plain BERT whose layer n is W_n + s·Σ_{k=0..min(n,m)}
    B_{n−k}·A_{n−k} (the paper's block shortcut, written out here by hand)."""
    model, handle = _reslora_model(deep_dir, blocks)
    state, s = handle.state(), 2.0 / 4
    plain = load_classifier(str(deep_dir), 2, 0, "cls").eval()
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for key in state:
            if key.endswith(A):
                name, n = key.removesuffix(A), _layer_index(key)
                delta = sum(state[name.replace(f".layer.{n}.", f".layer.{n - k}.") + B]
                            @ state[name.replace(f".layer.{n}.", f".layer.{n - k}.") + A]
                            for k in range(0, min(n, blocks) + 1))
                params[name.removeprefix("base_model.model.") + ".weight"].add_(s * delta)
            elif ".classifier." in key:
                params[key.removeprefix("base_model.model.")].copy_(state[key])
        batch = _batch()
        assert torch.allclose(model(**batch).logits, plain(**batch).logits, atol=1e-5)
        # and the shortcut matters: the layers' own LoRA alone computes something else
        for key in state:
            if key.endswith(A) and _layer_index(key) > 0:
                name, n = key.removesuffix(A), _layer_index(key)
                prev = name.replace(f".layer.{n}.", f".layer.{n - 1}.")
                params[name.removeprefix("base_model.model.") + ".weight"].sub_(
                    s * state[prev + B] @ state[prev + A])
        assert not torch.allclose(model(**batch).logits, plain(**batch).logits, atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_per_example_gradients_equal_one_backward_per_example(deep_dir, checkpointing):
    """Layer n−k's factors run again inside layer n: their per-example gradients (every
    trainable tensor's) equal the gradient of each example's own loss, one backward each —
    also with gradient checkpointing, which re-runs the shortcuts in the backward pass."""
    model, handle = _reslora_model(deep_dir, blocks=2)
    if checkpointing:
        from fedlora.model import enable_gradient_checkpointing

        enable_gradient_checkpointing(model.get_base_model())
        for m in model.modules():  # checkpointing acts in training mode; no dropout to compare
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.train()
    handle.set_trainable(lambda key: key in handle.params)  # LoRA and the head, as lora trains
    batch, labels = _batch(), torch.tensor([0, 1, 1, 0])
    names = handle.param_names()

    def losses():
        logits = model(**batch).logits
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    fast = per_sample_gradients(model, losses)
    assert set(fast) == {names[k] for k in handle.params}
    per_example = losses()
    for i in range(len(labels)):
        grads = torch.autograd.grad(per_example[i], list(handle.params.values()), retain_graph=True)
        for key, g in zip(handle.params, grads):
            assert torch.allclose(fast[names[key]][i], g, atol=1e-6, rtol=1e-4), (key, i)
    # the shortcut's second call counts: layer 0's B gets a gradient through layers 1 and 2 too
    b0 = next(k for k in handle.params if k.endswith(B) and _layer_index(k) == 0)
    assert fast[names[b0]].abs().sum() > 0


def test_merge_is_exact_and_plain_lora_loads_it(deep_dir, tmp_path):
    """The exported adapter (rank (m+1)·r, α' = (m+1)·α) is plain LoRA: PEFT loads it on a
    fresh base and computes the training-time model's logits; the layers' own factors alone
    (what save_pretrained wrote before the merge) do not."""
    from peft import PeftModel

    blocks = 2
    model, handle = _reslora_model(deep_dir, blocks)
    model.save_pretrained(str(tmp_path / "raw"))
    shutil.copytree(tmp_path / "raw", tmp_path / "merged")
    get_method(MethodConfig(name="reslora", rank=4, alpha=2.0, reslora_blocks=blocks)) \
        .finish_export(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["lora_alpha"] == pytest.approx(6.0)
    batch = _batch()
    with torch.no_grad():
        want = model(**batch).logits
        for folder, same in (("merged", True), ("raw", False)):
            loaded = PeftModel.from_pretrained(load_classifier(str(deep_dir), 2, 0, "cls"),
                                               str(tmp_path / folder)).eval()
            assert torch.allclose(loaded(**batch).logits, want, atol=1e-5) == same, folder


def test_merged_factors_by_hand():
    """A'_n stacks A_n, A_{n−1}, …; B'_n B_n, B_{n−1}, …; zero blocks before the first layer."""
    a = {n: torch.full((2, 3), float(n + 1)) for n in range(3)}
    b = {n: torch.full((4, 2), 10.0 * (n + 1)) for n in range(3)}
    state = {**{f"m.layer.{n}.q{A}": a[n] for n in a}, **{f"m.layer.{n}.q{B}": b[n] for n in b},
             "m.classifier.weight": torch.ones(2)}
    out = residual.merged_factors(state, blocks=1)
    assert torch.equal(out[f"m.layer.0.q{A}"], torch.cat([a[0], torch.zeros(2, 3)]))
    assert torch.equal(out[f"m.layer.2.q{A}"], torch.cat([a[2], a[1]]))
    assert torch.equal(out[f"m.layer.2.q{B}"], torch.cat([b[2], b[1]], dim=1))
    assert torch.equal(out[f"m.layer.2.q{B}"] @ out[f"m.layer.2.q{A}"], b[2] @ a[2] + b[1] @ a[1])
    assert torch.equal(out["m.classifier.weight"], state["m.classifier.weight"])


@pytest.fixture(scope="module")
def overrides(tiny_model_dir, toy_csv):
    return [f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "federation.rounds=2",
            "federation.local_steps=2", "train.batch_size=16", "threads=1",
            "federation.eval_examples=0", "privacy.noise=seeded"]


def test_dp_run_accounts_like_lora_and_its_export_predicts_what_it_trained(overrides, tmp_path,
                                                                         predicted_test_loss):
    """2 rounds under DP: ε is LoRA's (same σ, q, steps), the wire carries LoRA's payloads, and
    `fedlora predict` with the exported adapter reproduces the run's test loss (which the
    training-time model, shortcuts and all, computed)."""
    run = tmp_path / "reslora"
    ours = fedlora.run(None, run, overrides=overrides + ["method.name=reslora"], progress=None)
    lora = fedlora.run(None, tmp_path / "lora", overrides=overrides + ["method.name=lora"],
                       progress=None)
    assert ours["rounds"] == 2 and ours["rejected"] == {}
    assert 0 < ours["epsilon"] <= 3.0
    assert ours["epsilon_per_client"] == lora["epsilon_per_client"]
    assert ours["noise_multiplier"] == lora["noise_multiplier"]
    assert ours["bytes_uploaded"] == lora["bytes_uploaded"]
    assert ours["test_loss"] != lora["test_loss"]  # the shortcuts changed what was trained
    assert predicted_test_loss(run) == pytest.approx(ours["test_loss"], abs=1e-5)


@pytest.mark.parametrize("bad, why", [
    (["method.chain_every=2"], "cannot be chained"),
    (["method.client_ranks=[2, 4, 8]"], "same rank on every client"),
    (["train.optimizer=lora_pro"], "reslora_blocks.*train.optimizer=adam"),
    (["method.reslora_blocks=0"], "reslora_blocks must be ≥ 1"),
])
def test_inapplicable_combinations_are_refused(overrides, bad, why):
    with pytest.raises(ConfigError, match=why):
        load_config(None, overrides + ["method.name=reslora"] + bad)


def test_causal_task_is_refused(tiny_llama_dir):
    with pytest.raises(ConfigError, match="reslora.*task.kind=classification"):
        load_config(None, ["method.name=reslora", "task.kind=causal", f"model.path={tiny_llama_dir}",
                           "data.partition=iid", "method.target_modules=['q_proj']"])
