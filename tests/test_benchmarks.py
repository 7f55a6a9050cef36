"""The benchmark scripts run, on the tiny model: every contender and part is measured, and the
round breakdown accounts for the whole round (no phase lost or counted twice)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield
    for name in ("throughput", "optimizers", "precision", "clipping", "pass_cost", "make_encoder", "round_breakdown", "scaling", "reference_opacus", "common"):
        sys.modules.pop(name, None)


def _tiny(tiny_overrides):
    keep = ("model.", "data.path", "data.text_column", "data.label_column")
    return [o for o in tiny_overrides if o.startswith(keep)] + [
        "data.partition=iid", "train.batch_size=16", "train.micro_batch_size=4"]


def test_throughput_measures_every_contender(bench, tiny_overrides, tmp_path):
    import throughput

    out = tmp_path / "t.json"
    assert throughput.main([*_tiny(tiny_overrides), "--threads", "1", "--repeats", "1",
                            "--reference", "ffa", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    names = {"PEFT+Opacus ffa", "floor ffa", "fedlora ffa, DP", "fedlora ffa, no DP",
             "floor lora", "fedlora lora, DP", "fedlora lora, no DP"}
    assert set(result["cpu"]["examples_per_second"]) == names
    run = result["runs"][0]
    assert run["floor ffa"]["examples"] == run["fedlora ffa, DP"]["examples"] > 0  # same batches
    assert all(v > 0 for v in result["wall"]["examples_per_second"].values())
    assert 0 < result["setup"]["padding"]["max_length"] < result["setup"]["padding"]["micro_batches"] <= 1


def test_precision_measures_fp32_and_bf16_on_the_same_batches(bench, tiny_overrides, tmp_path):
    import precision

    out = tmp_path / "p.json"
    assert precision.main([*_tiny(tiny_overrides), "--threads", "1", "--repeats", "1",
                           "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rates = result["cpu"]["examples_per_second"]
    assert set(rates) == {"floor ffa fp32", "fedlora ffa, DP, fp32", "floor ffa bf16",
                          "fedlora ffa, DP, bf16"}
    assert all(v > 0 for v in rates.values())
    assert set(result["cpu"]["ratios"]) == {"fedlora ffa, DP: bf16 ex/s ÷ fp32 ex/s",
                                            "floor ffa: bf16 ex/s ÷ fp32 ex/s"}
    assert set(result["matmul_seconds"]) == {"float32", "bfloat16"}


def test_clipping_measures_each_mode_against_one_floor(bench, tiny_overrides, tmp_path):
    import clipping

    out = tmp_path / "c.json"
    assert clipping.main([*_tiny(tiny_overrides), "--threads", "1", "--repeats", "1",
                          "--methods", "full", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rates = result["wall"]["examples_per_second"]
    assert set(rates) == {"floor full", "fedlora full, DP, off", "fedlora full, DP, on",
                          "fedlora full, DP, auto"}
    assert all(v > 0 for v in rates.values())
    assert set(result["wall"]["ratios"]) == {"fedlora full, DP: on ex/s ÷ off ex/s",
                                             "fedlora full, DP: auto ex/s ÷ off ex/s",
                                             "full: floor time ÷ DP (auto) time"}


def test_pass_cost_fits_the_line_it_was_given(bench):
    import pass_cost

    a, b = pass_cost.fit_line([100, 200, 400], [0.01 + 2e-5 * t for t in (100, 200, 400)])
    assert a == pytest.approx(0.01) and b == pytest.approx(2e-5)  # a/b = 500 tokens


def test_pass_cost_times_passes_on_the_tiny_model(bench, tiny_overrides, tmp_path):
    import pass_cost

    out = tmp_path / "p.json"
    assert pass_cost.main([*_tiny(tiny_overrides), "--threads", "1", "--repeats", "1", "--length", "4",
                           "--sizes", "2", "4", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["tokens"] for r in result["rows"]] == [8, 16, 32]
    assert all(r["seconds"] > 0 for r in result["rows"])
    assert result["planned"] == {"micro_batch": 64, "pass_cost_tokens": 32}


def test_make_encoder_writes_a_folder_fedlora_trains_and_refuses_to_overwrite(bench, tmp_path):
    import make_encoder
    from transformers import AutoModel

    out = tmp_path / "enc"
    assert make_encoder.main([str(out), "--layers", "2", "--hidden", "128"]) == 0
    model = AutoModel.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 128
    assert model.config.vocab_size == 30522 and (out / "vocab.txt").exists()
    with pytest.raises(SystemExit, match="exists"):
        make_encoder.main([str(out)])
    with pytest.raises(SystemExit, match="positive multiple of 64"):
        make_encoder.main([str(tmp_path / "other"), "--hidden", "100"])
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_script_without_a_gpu_says_what_it_needs_and_writes_nothing(tmp_path):
    import subprocess

    script = BENCHMARKS / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # it parses
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=BENCHMARKS.parent)
    assert done.returncode == 2 and "gpu.sh: needs torch with a CUDA device" in done.stderr
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_throughput_on_cuda_measures_every_contender_there(bench, tiny_overrides, tmp_path):
    import throughput

    out = tmp_path / "t.json"
    assert throughput.main([*_tiny(tiny_overrides), "--threads", "1", "--repeats", "1",
                            "--device", "cuda", "--methods", "ffa", "--reference", "ffa",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["setup"]["device"].startswith("cuda") and result["machine"]["gpu"]
    assert set(result["wall"]["examples_per_second"]) == {
        "PEFT+Opacus ffa", "floor ffa", "fedlora ffa, DP", "fedlora ffa, no DP"}
    assert all(v > 0 for v in result["wall"]["examples_per_second"].values())


def test_round_breakdown_parts_add_up_to_the_round(bench, tiny_overrides, tmp_path):
    import round_breakdown

    out = tmp_path / "b.json"
    assert round_breakdown.main([*_tiny(tiny_overrides), "--threads", "1", "--rounds", "2",
                                 "--json", str(out)]) == 0
    parts = json.loads(out.read_text())["seconds_per_round"]
    main = ("local training", "serialisation", "aggregation", "evaluation", "other")
    assert sum(parts[k] for k in main) == pytest.approx(parts["round"], rel=1e-9)
    assert parts["other"] == pytest.approx(sum(v for k, v in parts.items() if k.startswith("other:")))
    assert parts["local training"] > 0 and parts["evaluation"] > 0


def test_round_breakdown_keeps_the_centring_query_out_of_the_rounds(bench, tiny_overrides,
                                                                    tiny_st_model_dir, tmp_path):
    """With centring on (a unit-norm model) the query's client work is timed apart, so no part
    of a round comes out negative; subset and whole-set evaluations are timed apart."""
    import round_breakdown

    out = tmp_path / "b.json"
    overrides = [*_tiny(tiny_overrides), f"model.path={tiny_st_model_dir}",
                 "federation.eval_examples=8"]
    assert round_breakdown.main([*overrides, "--threads", "1", "--rounds", "2",
                                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    run, parts = result["runs"][0], result["seconds_per_round"]
    assert run["centring_query_seconds"] > 0
    assert parts["other: transport"] >= 0 and parts["other"] >= 0
    assert set(run["seconds_per_evaluation"]) == {"subset", "whole set"}
    main = ("local training", "serialisation", "aggregation", "evaluation", "other")
    assert sum(parts[k] for k in main) == pytest.approx(parts["round"], rel=1e-9)


def test_throughput_runs_opacus_in_both_modes_against_the_fastest(bench, tiny_overrides, tmp_path):
    import throughput

    out = tmp_path / "t.json"
    assert throughput.main([*_tiny(tiny_overrides), "--threads", "1", "--repeats", "2", "--methods", "ffa",
                            "--reference", "ffa", "--opacus-modes", "hooks", "ghost",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["cpu"]["examples_per_second"]) == {
        "PEFT+Opacus ffa", "PEFT+Opacus ghost ffa", "floor ffa", "fedlora ffa, DP", "fedlora ffa, no DP"}
    ratios = result["cpu"]["ratios"]
    hooks, ghost = (ratios[f"ffa: fedlora DP ex/s ÷ PEFT+Opacus{m} ex/s"] for m in ("", " ghost"))
    fastest = ratios["ffa: fedlora DP ex/s ÷ fastest PEFT+Opacus ex/s"]
    assert 0 < fastest <= max(hooks, ghost) + 1e-9  # against the faster one in each repeat
    assert result["setup"]["opacus_modes"] == ["hooks", "ghost"]


def test_throughput_on_a_causal_lm_trains_the_reference_on_answer_tokens(bench, causal_overrides, tmp_path):
    import throughput

    out = tmp_path / "t.json"
    keep = [o for o in causal_overrides if not o.startswith(("federation.", "threads"))]
    assert throughput.main([*keep, "--threads", "1", "--repeats", "1", "--methods", "ffa",
                            "--reference", "ffa", "--opacus-modes", "hooks", "ghost",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["setup"]["task"] == "causal"
    assert all(v > 0 for v in result["wall"]["examples_per_second"].values())
    assert len(result["wall"]["examples_per_second"]) == 5


def _pairs_reference(tiny_llama_dir, mode: str, clip: float, noise: float = 0.0):
    import torch
    from reference_opacus import OpacusClient
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).train()  # Opacus wraps training models
    ids = [[1, 5, 9, 7, 3, 2], [1, 4, 2], [1, 8, 8, 6, 6, 6, 2], [1, 3, 5, 2]]
    starts = [3, 1, 5, 2]  # where each pair's answer starts
    client = OpacusClient(model, lambda n: "q_proj" in n or "lm_head" in n, ids, starts, max_length=8,
                          pad_id=0, batch_size=4, physical_batch_size=4, noise_multiplier=noise,
                          clip=clip, lr=0.01, seed=0, task="causal", mode=mode)
    return client, model, ids, starts


def test_causal_reference_loss_is_fedlora_answer_token_loss(bench, tiny_llama_dir):
    import torch
    from fedlora.causal.loss import causal_lm_loss
    from reference_opacus import answer_labels, pad_to_max_length

    client, model, ids, starts = _pairs_reference(tiny_llama_dir, "hooks", clip=1.0)
    padded, mask = pad_to_max_length(ids, 8, 0)
    labels = answer_labels(padded, mask, starts)
    assert labels[0].tolist() == [-100, -100, 7, 3, 2, -100, -100]  # tokens 3.. of pair 0, then padding
    with torch.no_grad():
        logits = model(input_ids=padded, attention_mask=mask).logits
        ours = client.loss(logits, labels)
        theirs = causal_lm_loss(model, ids, starts, list(range(4)), 0).mean()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


@pytest.mark.parametrize("clip", [1e-3, 10.0])  # every example clipped / none clipped
def test_opacus_ghost_and_hooks_take_the_same_step(bench, tiny_llama_dir, clip):
    """σ = 0: both modes apply the same clipped mean gradient (what the optimiser was given)."""
    import torch

    steps = {}
    for mode in ("hooks", "ghost"):
        client, *_ = _pairs_reference(tiny_llama_dir, mode, clip=clip)
        start = {n: p.detach().clone() for n, p in client.params().items()}
        torch.manual_seed(1)  # Opacus's Poisson sampler draws from torch's global generator
        trained, seen = client.train(start, 1)
        steps[mode] = ({n: p.grad.detach().clone() for n, p in client.params().items()}, seen)
    (hooks, seen_h), (ghost, seen_g) = steps["hooks"], steps["ghost"]
    assert seen_h == seen_g > 0 and set(hooks) == set(ghost)
    norm = sum(float(g.pow(2).sum()) for g in hooks.values()) ** 0.5
    assert 0 < norm <= clip * 1.0001  # a mean of clipped gradients (4 examples, all sampled or fewer)
    for n in hooks:
        torch.testing.assert_close(ghost[n], hooks[n], rtol=1e-4, atol=1e-4 * norm)


def test_optimizers_benchmark_times_each_variant_and_counts_its_state(bench, tiny_overrides, tmp_path):
    import optimizers

    out = tmp_path / "o.json"
    variants = ["ffa:adam", "ffa:lora_pro", "galore:adam"]
    assert optimizers.main([*_tiny(tiny_overrides), "method.rank=2", "--threads", "1", "--repeats", "1",
                            "--variants", *variants, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["cpu"]["examples_per_second"]) == {
        "floor ffa", "floor galore", *(f"fedlora {v}, DP" for v in variants)}
    assert set(result["cpu"]["ratios"]) == {"ffa:adam: floor time ÷ DP time", "ffa:lora_pro: floor time ÷ DP time",
                                            "galore:adam: floor time ÷ DP time",
                                            "ffa:lora_pro: DP time ÷ ffa:adam DP time"}
    memory = result["memory_mb"]
    # GaLore keeps its moments in the rank-2 projection: less than Adam's two full-size moments
    assert 0 < memory["galore:adam"]["optimizer_state"] < 2 * memory["galore:adam"]["trained_parameters"]


def test_state_bytes_counts_adams_moments_and_steps(bench):
    import torch
    from optimizers import state_bytes

    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    adam = torch.optim.Adam(params, lr=0.1)
    assert state_bytes(adam) == 0  # nothing before the first step
    sum(p.sum() for p in params).backward()
    adam.step()
    # two fp32 moments per parameter, and torch's per-parameter step counter (one fp32 number)
    assert state_bytes(adam) == 2 * 4 * (12 + 5) + 2 * 4
