"""Hub names offline: a cached file is found without the network, a missing one gives one message
that says what to download and where. No test here reaches the network: the hub runs in offline
mode with an empty (or hand-made) cache in a temporary folder."""
import gzip
import json
from pathlib import Path

import pytest

from minqr import hub
from minqr.data.pairs import load_pairs
from minqr.errors import MinqrError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_snapshot(cache, repo_folder: str, files: dict) -> None:
    """Lay out files in the hub cache as huggingface_hub does: snapshots/COMMIT/... and refs/main."""
    snapshot = cache / repo_folder / "snapshots" / COMMIT
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(content)
    (cache / repo_folder / "refs").mkdir(parents=True)
    (cache / repo_folder / "refs" / "main").write_text(COMMIT)


def test_hh_rlhf_offline_says_what_to_download(offline_hub):
    announced = []
    with pytest.raises(MinqrError) as caught:
        hub.fetch_hh_rlhf("helpful-base", "train", announce=announced.append)
    message = str(caught.value)
    for words in ["hh-rlhf:helpful-base", "HF_HUB_OFFLINE",
                  "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz",
                  "DIR/helpful-base/train.jsonl.gz", "--data DIR --subset helpful-base"]:
        assert words in message
    assert announced == []  # nothing is downloaded, so nothing is announced
    with pytest.raises(MinqrError, match="harmless-base/test.jsonl.gz"):
        load_pairs("hh-rlhf:harmless-base", split="test")


def test_hh_rlhf_from_the_cache(offline_hub):
    records = [{"chosen": f"\n\nHuman: {i}\n\nAssistant: yes", "rejected": f"\n\nHuman: {i}\n\nAssistant: no"}
               for i in range(5)]
    content = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    cache_snapshot(offline_hub, "datasets--Anthropic--hh-rlhf", {"helpful-base/test.jsonl.gz": content})
    pairs, stats = load_pairs("hh-rlhf:helpful-base", split="test")
    assert [p.rejected for p in pairs] == [r["rejected"] for r in records]
    assert stats.source.endswith("helpful-base/test.jsonl.gz") and str(offline_hub) in stats.source
    with pytest.raises(MinqrError, match="helpful-base/train.jsonl.gz"):  # the other split is not cached
        load_pairs("hh-rlhf:helpful-base", split="train")


def test_model_offline_says_what_to_download(offline_hub):
    with pytest.raises(MinqrError) as caught:
        hub.fetch_model("gpt2", announce=pytest.fail)
    message = str(caught.value)
    for words in ["'gpt2'", "not a local folder", "HF_HUB_OFFLINE", "hf download gpt2 config.json model.safetensors",
                  "--model DIR"]:
        assert words in message


def test_model_from_the_cache(offline_hub):
    files = {"config.json": b'{"model_type": "gpt2"}', "vocab.json": b"{}"}
    cache_snapshot(offline_hub, "models--openai-community--gpt2", files)
    folder = hub.fetch_model("openai-community/gpt2", announce=pytest.fail)
    assert folder.name == COMMIT
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_local_model_folder_is_returned_as_is(tmp_path, offline_hub):
    assert hub.fetch_model(tmp_path) == tmp_path
    assert hub.fetch_model(str(tmp_path)) == tmp_path
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(MinqrError, match="is a file; a model is a folder"):
        hub.fetch_model(tmp_path / "weights.bin")


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, offline_hub, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for typo in ["runs/quantil", "./quantile", str(tmp_path / "runs" / "quantil"), "~/no-such-minqr-run"]:
        with pytest.raises(MinqrError, match="no such model folder"):
            hub.fetch_model(typo, announce=pytest.fail)
    # an owner/name hub id whose owner is no local folder still goes to the hub (here: offline)
    with pytest.raises(MinqrError, match="not a local folder"):
        hub.fetch_model("openai-community/gpt2", announce=pytest.fail)


def test_a_typo_in_a_middle_folder_names_the_folder_that_is_missing(tmp_path, offline_hub, monkeypatch):
    """runs/dmeo/quantile has two slashes: no hub id has, so it is a path, and the error names the
    first folder on it that does not exist (it used to reach huggingface_hub's id check)."""
    (tmp_path / "runs" / "demo" / "quantile").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for typo, missing in [("runs/dmeo/quantile", "runs/dmeo"), ("runz/demo/quantile", "runz"),
                          (f"{tmp_path}/runs/dmeo/quantile", f"{tmp_path}/runs/dmeo"),
                          ("./dmeo/quantile", "dmeo"), ("runs/demo/quantile/", None), ("my model", "my model"),
                          ("-gpt2", "-gpt2"), ("a..b", "a..b"), ("runs\\demo", "runs\\demo")]:
        if missing is None:  # a trailing slash on a folder that exists is that folder
            assert hub.fetch_model(typo) == Path("runs/demo/quantile")
            continue
        with pytest.raises(MinqrError) as caught:
            hub.fetch_model(typo, announce=pytest.fail)
        assert str(caught.value).startswith(f"no such model folder: {typo!r} ({missing} does not exist;"), \
            str(caught.value)
