"""Shared test fixtures: where the real data lives (../shared/data beside the checkout).

Tests that need it skip with a reason when it is absent; nothing from there is ever copied in.
"""
from pathlib import Path

import pytest

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
