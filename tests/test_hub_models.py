"""`model.path` as a Hugging Face Hub id, resolved through the cache, offline (no network).

The cache is built in the test in huggingface_hub's own layout (models--org--name/refs/main →
snapshots/<commit>/files), as `hf download` leaves it.
"""

from __future__ import annotations

import shutil

import pytest

import fedlora
from fedlora.errors import ModelError
from fedlora.model import resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    cache = tmp_path / "hf-cache"
    repo = cache / "models--fedlora-tests--tiny-bert"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_cached_hub_id_trains_like_its_folder(hub_cache, tiny_overrides, tmp_path):
    assert resolve_model_path("fedlora-tests/tiny-bert") == str(
        hub_cache / "models--fedlora-tests--tiny-bert" / "snapshots" / COMMIT)
    by_id = [o for o in tiny_overrides if not o.startswith("model.path=")]
    common = ["privacy.noise=seeded", "federation.rounds=1"]
    a = fedlora.run(None, tmp_path / "id", overrides=by_id + common + ["model.path=fedlora-tests/tiny-bert"],
                    progress=None)
    b = fedlora.run(None, tmp_path / "folder", overrides=tiny_overrides + common, progress=None)
    assert a["test_loss"] == b["test_loss"] and a["test_accuracy"] == b["test_accuracy"]


def test_an_uncached_hub_id_offline_says_where_it_looked_and_how_to_fetch_it(hub_cache):
    with pytest.raises(ModelError) as err:
        resolve_model_path("FacebookAI/roberta-large")
    message = str(err.value)
    for needle in ("FacebookAI/roberta-large", str(hub_cache), "HF_HUB_OFFLINE=1",
                   "hf download FacebookAI/roberta-large"):
        assert needle in message
    assert "\n" not in message


def test_a_missing_path_that_is_not_a_hub_id_is_not_looked_up(hub_cache, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model_path(str(tmp_path / "no" / "such" / "folder"))
