"""The `device` option: validation, the missing-GPU error, CPU runs unchanged, and (on a machine
with CUDA) a GPU run that matches the CPU run — same batches, same noise, same ε.

CI has no GPU: the CUDA tests are skipped there and run on a GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import fedlora
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.device import resolve_device
from fedlora.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return tiny_overrides + ["privacy.noise=seeded"]


@pytest.fixture(scope="module")
def causal_overrides(causal_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return causal_overrides + ["privacy.noise=seeded"]


CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run on a GPU machine)")

# Reference from the code before the `device` option (commit c78cc4d, CPU, one thread): the
# final adapter of the tiny DP FFA-LoRA run below, per tensor, Σ of its values. (On the machine
# it was made on, the new code's adapter file is bit-identical to the old one's: the same
# SHA-256.) A change in how batches or noise are drawn moves these at the first digit; another
# CPU's float arithmetic, in the last bits only.
BEFORE = {  # key (after base_model.model.) → Σ values
    "bert.encoder.layer.0.attention.self.query.lora_A.weight": 0.12223373291999451,
    "bert.encoder.layer.0.attention.self.query.lora_B.weight": 0.31207540608011186,
    "bert.encoder.layer.0.attention.self.value.lora_A.weight": 1.0470387532841414,
    "bert.encoder.layer.0.attention.self.value.lora_B.weight": 0.04614439804572612,
    "bert.encoder.layer.1.attention.self.query.lora_A.weight": 0.8559400818776339,
    "bert.encoder.layer.1.attention.self.query.lora_B.weight": -0.15924696996808052,
    "bert.encoder.layer.1.attention.self.value.lora_A.weight": -2.039486833557021,
    "bert.encoder.layer.1.attention.self.value.lora_B.weight": -0.575900630094111,
    "classifier.bias": 0.033222030848264694,
    "classifier.weight": -1.950772820506245,
}


@pytest.fixture()
def no_cuda(monkeypatch):
    """This machine, as one without a GPU (whatever it has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def _small(overrides: list[str]) -> list[str]:
    return overrides + ["federation.clients=2", "data.partition=iid"]


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "mps", ""])
def test_unknown_device_is_refused_naming_the_key_and_the_choices(value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f'device="{value}"'])
    message = str(info.value)
    assert "device" in message and repr(value) in message
    assert all(choice in message for choice in ("auto", "cpu", "cuda", "cuda:N"))


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_known_devices_pass_validation_without_looking_for_a_gpu(value, no_cuda):
    assert load_config(None, [f"device={value}"]).device == value


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert load_config(None, []).device == "auto"


def test_cuda_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"device='cuda:2'.*2 CUDA device.*cuda:0"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_clear_line_and_writes_nothing(value, no_cuda, tiny_overrides,
                                                               tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--out", "out", *tiny_overrides, f"device={value}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fedlora: error: ") and err.count("\n") == 1, err
    assert "no CUDA device" in err and "set device=cpu" in err
    assert os.listdir(tmp_path) == []


def test_node_config_may_pick_the_site_device(no_cuda):
    pytest.importorskip("flwr")
    from fedlora.federation.flower.site import site_config

    config = load_config(None, [])
    assert site_config(config, {"partition-id": 0}) is config
    assert site_config(config, {"device": "cpu"}).device == "cpu"
    with pytest.raises(ConfigError, match="node config: device='gpu0'"):
        site_config(config, {"device": "gpu0"})


# ------------------------------------------------------------------------------ CPU unchanged


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory, tiny_overrides):
    """The tiny DP FFA-LoRA run with device=cpu and without the key (CUDA hidden)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.cuda, "is_available", lambda: False)
    root = tmp_path_factory.mktemp("device-runs")
    lines: list[str] = []
    try:
        cpu = fedlora.run(None, root / "cpu", overrides=_small(tiny_overrides) + ["device=cpu"],
                          progress=lines.append)
        auto = fedlora.run(None, root / "auto", overrides=_small(tiny_overrides), progress=None)
    finally:
        mp.undo()
    return root, cpu, auto, lines


def test_cpu_run_equals_the_run_without_the_option(cpu_runs):
    root, cpu, auto, _ = cpu_runs
    a, b = _adapter(root / "cpu"), _adapter(root / "auto")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda s: {k: v for k, v in s.items() if k not in ("wall_seconds", "out")}  # noqa: E731
    assert strip(cpu) == strip(auto)


def test_cpu_run_matches_the_code_before_the_option(cpu_runs):
    root, _, _, _ = cpu_runs
    adapter = _adapter(root / "cpu")
    sums = {k.removeprefix("base_model.model."): float(v.double().sum()) for k, v in adapter.items()}
    assert sums.keys() == BEFORE.keys()
    for key, want in BEFORE.items():
        assert sums[key] == pytest.approx(want, rel=1e-5, abs=1e-7), key


def test_header_and_summary_name_the_device(cpu_runs):
    root, cpu, _, lines = cpu_runs
    assert lines[0].endswith("· device cpu"), lines[0]
    assert cpu["device"] == "cpu"
    assert json.loads((root / "cpu" / "summary.json").read_text())["device"] == "cpu"


def test_adapter_state_leaves_on_the_cpu(tiny_overrides):
    from fedlora.experiment import build_experiment

    exp = build_experiment(load_config(None, _small(tiny_overrides) + ["device=cpu"]))
    reply = exp.trainer.train(exp.clients[0], exp.method.download(
        exp.method.init_global(exp.initial), 0), 0)
    assert all(v.device.type == "cpu" for v in reply.upload.values())
    assert all(v.device.type == "cpu" for v in exp.trainer.handle.state().values())


def test_resume_may_change_the_device(tmp_path, tiny_overrides, interrupt_in_round, no_cuda):
    """A run started with device=cpu resumes with device=auto (here the CPU too): `device`, like
    `threads`, says how a run computes, not what."""
    overrides = _small(tiny_overrides) + ["device=cpu", "federation.rounds=2"]
    interrupt_in_round(tmp_path / "run", overrides)
    resumed = fedlora.run(resume=tmp_path / "run", overrides=["device=auto"], progress=None)
    whole = fedlora.run(None, tmp_path / "whole", overrides=overrides, progress=None)
    assert resumed["rounds"] == 2 and resumed["epsilon"] == whole["epsilon"]
    a, b = _adapter(tmp_path / "run"), _adapter(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ CUDA vs CPU


@pytest.fixture(scope="module")
def no_dropout_model_dir(tiny_st_model_dir, tmp_path_factory) -> Path:
    """The tiny sentence-transformers BERT (mean pooling, unit norm: the run centres its
    features, so the centring query runs too) without dropout: dropout masks come from each
    device's own generator, everything else random is drawn on the CPU."""
    out = tmp_path_factory.mktemp("tiny-st-no-dropout")
    shutil.copytree(tiny_st_model_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _both(tmp_path: Path, overrides: list[str]) -> tuple[dict, dict]:
    cpu = fedlora.run(None, tmp_path / "cpu", overrides=overrides + ["device=cpu"], progress=None)
    cuda = fedlora.run(None, tmp_path / "cuda", overrides=overrides + ["device=cuda"],
                       progress=None)
    return cpu, cuda


def _assert_close_adapters(tmp_path: Path) -> None:
    a, b = _adapter(tmp_path / "cpu"), _adapter(tmp_path / "cuda")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].device.type == "cpu"
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)


@needs_cuda
def test_cuda_matches_cpu(tmp_path, tiny_overrides, no_dropout_model_dir):
    """A tiny DP FFA-LoRA run (2 clients, 2 rounds, feature centring) on the CPU and on CUDA:
    the same Poisson batches and DP noise (drawn on the CPU), so the adapters agree to float
    rounding and ε is the same."""
    overrides = _small(tiny_overrides) + [f"model.path={no_dropout_model_dir}", "method.name=ffa",
                                          "privacy.epsilon=3"]
    cpu, cuda = _both(tmp_path, overrides)
    assert cuda["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert cpu["feature_center"] is not None
    assert cuda["epsilon"] == cpu["epsilon"] and cuda["epsilon_per_client"] == cpu["epsilon_per_client"]
    assert cuda["noise_multiplier"] == cpu["noise_multiplier"] and cuda["steps"] == cpu["steps"]
    # μ itself is folded into the exported head's bias (compared below with the adapters)
    assert cuda["feature_center"]["clients"] == cpu["feature_center"]["clients"] == 2
    assert cuda["feature_center"]["norm"] == pytest.approx(cpu["feature_center"]["norm"], abs=1e-5)
    _assert_close_adapters(tmp_path)


@needs_cuda
def test_cuda_causal_matches_cpu(tmp_path, causal_overrides):
    """The causal task's loss, evaluation and merged export on CUDA, against the CPU."""
    overrides = causal_overrides + ["federation.clients=2", "privacy.epsilon=3"]
    cpu, cuda = _both(tmp_path, overrides)
    assert cuda["epsilon"] == cpu["epsilon"]
    assert cuda["test_loss"] == pytest.approx(cpu["test_loss"], abs=1e-4)
    _assert_close_adapters(tmp_path)
    from safetensors.torch import load_file

    merged_cpu = load_file(tmp_path / "cpu" / "merged" / "model.safetensors")
    merged_cuda = load_file(tmp_path / "cuda" / "merged" / "model.safetensors")
    for k in merged_cpu:
        torch.testing.assert_close(merged_cuda[k], merged_cpu[k], rtol=0, atol=1e-4, msg=k)


# --------------------------------------------------------------------------- micro-batches per device


def test_micro_batch_size_zero_is_chosen_per_device_and_a_number_overrides_it():
    from fedlora.data.batching import PASS_COST_TOKENS, micro_batching

    assert micro_batching(0, "cpu") == (64, PASS_COST_TOKENS)
    assert micro_batching(0, "cuda") == (256, 4096)
    assert micro_batching(7, "cuda") == (7, 4096)  # a set size is kept; the pass cost is the GPU's
    assert micro_batching(0, "mps") == (64, PASS_COST_TOKENS)  # no entry: a CPU's choices


def test_on_a_gpu_a_batch_takes_fewer_larger_passes():
    """The default job's lengths (5–64 tokens): a CPU's cost model cuts 200 texts into passes of
    at most 64 grouped by length; a GPU's takes them in one padded pass."""
    from fedlora.data.batching import length_groups, micro_batching

    lengths = [5 + (37 * i) % 60 for i in range(200)]
    cpu = length_groups(lengths, *micro_batching(0, "cpu"))
    gpu = length_groups(lengths, *micro_batching(0, "cuda"))
    assert len(cpu) >= 4 and max(len(g) for g in cpu) <= 64
    assert len(gpu) == 1 and sorted(gpu[0]) == list(range(200))


def test_the_trainer_on_the_cpu_uses_the_cpu_size(tiny_overrides):
    from fedlora.experiment import build_experiment

    exp = build_experiment(load_config(None, tiny_overrides + ["train.micro_batch_size=0", "device=cpu"]))
    assert (exp.trainer.micro_batch, exp.trainer.pass_cost) == (64, 32)
    with pytest.raises(ConfigError, match="train.micro_batch_size must be ≥ 0"):
        load_config(None, tiny_overrides + ["train.micro_batch_size=-1"])
