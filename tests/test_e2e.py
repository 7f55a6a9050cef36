"""The real shipped model (all-MiniLM-L6-v2) and data through the CLI, a few steps only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_cli_runs_the_shipped_model_and_data(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedlora", "run", "--out", str(out),
           "data.max_examples=600", "federation.rounds=2", "federation.local_steps=1",
           "train.batch_size=32", "threads=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round   2/2" in done.stdout and "test accuracy" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "ffa" and summary["rounds"] == 2
    assert 0 < summary["epsilon"] <= 3.0
    assert summary["trainable_parameters"] == 6 * 2 * 384 * 8 + 384 * 2 + 2  # B of q,v + head
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
