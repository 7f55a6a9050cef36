"""The causal-LM task on a tiny random Llama: answer-only loss, per-example DP gradients of
sequence losses, micro-batching, gradient checkpointing, generation and exact match."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedlora.causal.loss import answer_token_losses, causal_lm_loss
from fedlora.causal.prompts import PromptFormat, encode_pairs
from fedlora.config import load_config
from fedlora.privacy.dpsgd import per_sample_gradients


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return tiny_overrides + ["privacy.noise=seeded"]


@pytest.fixture(scope="module")
def causal_overrides(causal_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return causal_overrides + ["privacy.noise=seeded"]


PROMPTS = ["3+4", "12+30", "7+0", "5+5", "41+18"]
ANSWERS = ["7", "42", "7", "10", "59"]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from fedlora.model import load_tokenizer

    return load_tokenizer(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def pairs(tokenizer):
    fmt = PromptFormat.of(tokenizer, use_chat_template=True)
    ids, starts = encode_pairs(fmt, PROMPTS, ANSWERS, max_length=64)
    return fmt, ids, starts


def _lora_llama(model_dir, freeze_a: bool, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM", lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero; make it non-zero so lora_A gets gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_B" in name or ("lora_A" in name and not freeze_a))
    return model.train()


# ------------------------------------------------------------------------- prompts and loss


def test_pairs_are_chat_prompt_then_answer_then_eos(pairs, tokenizer):
    fmt, ids, starts = pairs
    assert fmt.chat
    for seq, start, prompt, answer in zip(ids, starts, PROMPTS, ANSWERS):
        assert tokenizer.decode(seq[:start]) == (f"<|im_start|>user\n{prompt}<|im_end|>\n"
                                                 "<|im_start|>assistant\n")
        assert seq[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(seq[start:-1]) == answer


def test_plain_prompts_without_a_chat_template(tokenizer):
    fmt = PromptFormat.of(tokenizer, use_chat_template=False)
    ids, starts = encode_pairs(fmt, ["3+4"], ["7"], max_length=64)
    assert tokenizer.decode(ids[0][:starts[0]]) == "3+4\nAnswer:"
    assert tokenizer.decode(ids[0][starts[0]:]) == " 7<|im_end|>"


def test_too_long_pairs_are_refused_with_the_length_to_set(pairs):
    from fedlora.errors import DataError

    fmt = pairs[0]
    with pytest.raises(DataError, match=r"model.max_length=8: 5 of 5 .* set model.max_length=\d+"):
        encode_pairs(fmt, PROMPTS, ANSWERS, max_length=8)


def test_loss_is_the_mean_over_answer_tokens_only():
    g = torch.Generator().manual_seed(0)
    n, width, vocab = 3, 9, 11
    logits = torch.randn(n, width, vocab, generator=g)
    ids = torch.randint(0, vocab, (n, width), generator=g)
    starts, lengths = torch.tensor([2, 5, 8]), torch.tensor([6, 9, 9])
    got = answer_token_losses(logits, ids, starts, lengths)
    for i in range(n):  # slow reference: token t is predicted from position t − 1
        terms = [-F.log_softmax(logits[i, t - 1], -1)[ids[i, t]] for t in range(starts[i], lengths[i])]
        assert got[i].item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    # logits at prompt or padding positions do not matter at all
    changed = logits.clone()
    changed[0, :1] += 100.0  # predicts prompt token 1
    changed[0, 6:] -= 50.0  # after the pair's end (padding)
    assert torch.equal(answer_token_losses(changed, ids, starts, lengths)[0], got[0])
    # only the positions that predict answer tokens (1 … 7 here) need logits at all
    torch.testing.assert_close(answer_token_losses(logits[:, 1:8], ids, starts, lengths, first=1), got)


def _slow_loss(model, seq, start):
    """One pair alone, unpadded, every position's logits, a Python loop over answer tokens."""
    logits = model(input_ids=torch.tensor([seq])).logits[0]
    return torch.stack([-F.log_softmax(logits[t - 1], -1)[seq[t]] for t in range(start, len(seq))]).mean()


def test_a_pairs_loss_is_its_own_whatever_the_batch(tiny_llama_dir, pairs):
    fmt, ids, starts = pairs
    model = _lora_llama(tiny_llama_dir, freeze_a=False).eval()
    with torch.no_grad():
        batch = causal_lm_loss(model, ids, starts, list(range(len(ids))), pad_id=0)
        alone = torch.stack([_slow_loss(model, s, n) for s, n in zip(ids, starts)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- per-example gradients


def _reference(model, ids, starts):
    """Per-example gradients the slow way: each pair alone, unpadded, loss.backward()."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(len(ids)):
        model.zero_grad(set_to_none=True)
        _slow_loss(model, ids[i], starts[i]).backward()
        for n, p in params.items():
            out[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in out.items()}


@pytest.mark.parametrize("freeze_a", [True, False], ids=["ffa", "lora"])
def test_per_sample_gradients_of_sequence_losses_match_batch_size_one(tiny_llama_dir, pairs, freeze_a):
    fmt, ids, starts = pairs
    model = _lora_llama(tiny_llama_dir, freeze_a)
    idx = list(range(len(ids)))
    got = per_sample_gradients(model, lambda: causal_lm_loss(model, ids, starts, idx, pad_id=0))
    want = _reference(model, ids, starts)
    assert set(got) == set(want) and len(got) == (8 if not freeze_a else 4)
    for name in want:
        assert got[name].shape == (len(ids), *want[name].shape[1:])
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
        assert want[name].abs().sum() > 0  # not vacuous


def test_gradient_checkpointing_keeps_per_sample_gradients_exact(tiny_llama_dir, pairs):
    fmt, ids, starts = pairs
    idx = list(range(len(ids)))
    plain = _lora_llama(tiny_llama_dir, freeze_a=False)
    ckpt = _lora_llama(tiny_llama_dir, freeze_a=False, checkpointing=True)
    assert ckpt.get_base_model().model.gradient_checkpointing
    calls = []
    inner = ckpt.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    hook = inner.register_forward_hook(lambda *a: calls.append(1))
    got = per_sample_gradients(ckpt, lambda: causal_lm_loss(ckpt, ids, starts, idx, pad_id=0))
    hook.remove()
    assert len(calls) == 2  # the layer really was recomputed in the backward pass (hooks ran twice)
    want = per_sample_gradients(plain, lambda: causal_lm_loss(plain, ids, starts, idx, pad_id=0))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- one client round


def _experiment(overrides, extra):
    from fedlora.experiment import build_experiment

    return build_experiment(load_config(None, overrides + extra))


def test_micro_batches_give_the_same_clipped_noised_update(causal_overrides):
    """One logical DP batch, in micro-batches of 1 or all at once: the same update (clipping is
    per example, the noise is drawn once per logical batch from the same seed)."""
    uploads = []
    for micro in (1, 64):
        exp = _experiment(causal_overrides, [f"train.micro_batch_size={micro}", "privacy.epsilon=3",
                                             "method.name=lora", "privacy.clip=0.01"])
        client = exp.clients[0]
        reply = exp.trainer.train(client, exp.method.download(
            exp.method.init_global(exp.initial), client.cid), 0)
        uploads.append(reply.upload)
    assert uploads[0].keys() == uploads[1].keys() and uploads[0]
    for key in uploads[0]:
        torch.testing.assert_close(uploads[0][key], uploads[1][key], rtol=1e-4, atol=1e-6)
    start = _experiment(causal_overrides, ["method.name=lora"]).initial
    assert any(not torch.equal(uploads[0][k], start[k]) for k in uploads[0])  # it did train


# ------------------------------------------------------------------------- generation and scoring


def _slow_greedy(model, prompt, eos, steps):
    """Argmax one token at a time, no cache, no padding, no `generate`."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_greedy_generation_and_exact_match_on_a_toy_example(tiny_llama_dir, pairs):
    from fedlora.causal.evaluate import GenerationEvaluator
    from fedlora.causal.generate import exact_match
    from fedlora.methods.base import GlobalState
    from fedlora.model import AdapterHandle

    fmt, ids, starts = pairs
    model = _lora_llama(tiny_llama_dir, freeze_a=False).eval()
    handle = AdapterHandle.of(model)
    want_ids = [_slow_greedy(model, s[:n], fmt.eos_id, 6) for s, n in zip(ids, starts)]
    assert len({tuple(w) for w in want_ids}) > 1  # the toy prompts really get different answers
    want = [fmt.decode(w) for w in want_ids]
    # half the answers are what the model says, the others cannot be: exact match = 2/5
    answers = [w if i in (0, 3) else w + "#" for i, w in enumerate(want)]
    evaluator = GenerationEvaluator(handle, handle.state(), ids, starts, answers, fmt, pad_id=0,
                                    batch_size=3, max_new_tokens=6, scorer=exact_match)
    scores = evaluator(GlobalState(adapter={}))
    assert evaluator.generated_ids == want_ids  # batched, left-padded generate == the slow loop
    assert evaluator.generations == want
    assert scores["test_accuracy"] == pytest.approx(2 / 5)
    with torch.no_grad():
        loss = torch.stack([_slow_loss(model, s, n) for s, n in zip(ids, starts)]).mean().item()
    assert scores["test_loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("generated, answer, numeric, exact", [
    ("42", "42", True, True),
    ("17 + 25 = 42", "42", True, False),
    ("The answer is 1,234.", "1234", True, False),
    ("-4", "-4", True, True),
    ("4", "-4", False, False),
    ("42.0", "42", True, False),
    ("43", "42", False, False),
    ("", "42", False, False),
    (" yes ", "yes", True, True),  # a non-numeric answer is compared exactly
])
def test_scorers(generated, answer, numeric, exact):
    from fedlora.causal.generate import exact_match, numeric_match

    assert numeric_match(generated, answer) is numeric
    assert exact_match(generated, answer) is exact


def test_gsm_scorer_is_reasoning_gyms():
    from fedlora.causal.generate import get_scorer

    score = get_scorer("gsm")
    assert score("28080", "28080") and score("He earns 28080 a year", "28080")
    assert not score("In 12 months he earns 28080", "28080")  # reasoning-gym reads the first number
    assert not score("no idea", "28080")


# ------------------------------------------------------------------------- whole runs and export


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, causal_overrides):
    import fedlora

    out = tmp_path_factory.mktemp("causal") / "run"
    summary = fedlora.run(None, out, overrides=causal_overrides + [
        "federation.evaluate_initial=true", "method.name=lora", "train.lr=0.05"], progress=None)
    return out, summary


def test_causal_run_reports_exact_match_loss_and_privacy(causal_run):
    out, s = causal_run
    assert s["task"] == "causal" and s["metric"] == "exact match"
    assert 0.0 <= s["test_accuracy"] <= 1.0 and math.isfinite(s["test_loss"])
    assert set(s["initial"]) == {"test_accuracy", "test_loss"}
    assert s["initial"]["test_loss"] != s["test_loss"]  # it trained
    assert 0 < s["epsilon"] <= 3.0 + 1e-9 and s["majority_accuracy"] is None
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file() and (out / "initial_scores.json").is_file()


def test_merged_model_and_adapter_give_the_same_logits(causal_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = causal_run
    ids = torch.tensor([[1, 87, 85, 71, 84, 201, 21, 13, 22, 2, 201]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)  # the adapter changes something
    assert AutoTokenizer.from_pretrained(out / "merged").decode([87, 85]) == "us"


def test_checkpointed_run_equals_the_plain_run(tmp_path, causal_overrides):
    import fedlora

    runs = [fedlora.run(None, tmp_path / f"r{flag}", progress=None, overrides=causal_overrides + [
        f"train.gradient_checkpointing={flag}", "federation.rounds=1", "task.export_merged=false"])
        for flag in ("false", "true")]
    assert runs[0]["test_loss"] == pytest.approx(runs[1]["test_loss"], rel=1e-5)


def test_predict_on_a_causal_run_generates_what_its_evaluation_scored(causal_run, tmp_path):
    """`fedlora predict` on a causal run answers prompts as the run's evaluator did: scoring its
    answers to the held-out prompts with the run's scorer gives the run's exact match."""
    import csv

    from fedlora.causal.generate import get_scorer
    from fedlora.cli import main
    from fedlora.config import load_config
    from fedlora.experiment import load_data, split_data
    from fedlora.tasks import get_task

    out, summary = causal_run
    config = load_config(out / "config.toml")
    data = load_data(config, get_task(config))
    test = split_data(data, config).test
    with (tmp_path / "prompts.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question"])
        w.writerows([data.prompts[i]] for i in test)
    assert main(["predict", str(out), "--input", str(tmp_path / "prompts.csv"), "--text-column",
                 "question", "--out", str(tmp_path / "answers.csv"), "--batch-size", "5"]) == 0
    with (tmp_path / "answers.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["row"]) for r in rows] == list(range(1, len(test) + 1))
    score = get_scorer(config.task.scorer)
    hits = sum(score(r["answer"], data.answers[i]) for r, i in zip(rows, test))
    assert hits / len(test) == pytest.approx(summary["test_accuracy"], abs=1e-6)
    # the same answers from the run's own merged/ export (the live model, folded at export)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.causal.generate import greedy_generate
    from fedlora.causal.prompts import PromptFormat
    from fedlora.data.batching import eval_batches
    from fedlora.experiment import pad_id_of

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    fmt = PromptFormat.of(tok, config.task.chat_template)
    ids = fmt.prompt_ids([data.prompts[i] for i in test])
    want = greedy_generate(merged, ids, pad_id_of(tok), fmt.eos_id, config.task.max_new_tokens,
                           eval_batches([len(t) for t in ids], 64))
    assert [r["answer"] for r in rows] == [fmt.decode(g) for g in want]
    assert any(r["answer"].strip() for r in rows)  # it generated something
    assert main(["evaluate", str(out), "--data", str(tmp_path / "prompts.csv")]) == 2
