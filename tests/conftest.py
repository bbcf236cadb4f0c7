"""Shared test fixtures: where the real data lives (../shared/data beside the checkout), and an
offline hub.

Tests that need the real data skip with a reason when it is absent; nothing from there is ever
copied in.
"""
from pathlib import Path

import pytest
from huggingface_hub import constants

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_HARMLESS_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
GPT2_TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder lies beside the checkout)")
    return path


@pytest.fixture(scope="session")
def hh_pairs_path() -> Path:
    """2,312 real HH-RLHF harmless-base test pairs (gzipped JSON lines)."""
    return _require(HH_HARMLESS_TEST)


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """The real GPT-2 BPE files: vocab.json + merges.txt."""
    return _require(GPT2_TOKENIZER_DIR)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline hub with an empty cache; returns the cache folder. huggingface_hub reads its
    environment once, at import, hence the patched constants beside the environment."""
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache
