"""GPT-2's BPE: every file layout, the real GPT-2 files, and agreement with transformers."""
import gzip
import json
import shutil

import pytest
import transformers
from factories import SENTENCES, write_tiny_tokenizer
from tokenizers import models, pre_tokenizers, trainers

from minqr import MinqrError, load_tokenizer
from minqr.models.tokenizer import Tokenizer, byte_level_bpe

LAYOUTS = ["vocab.json", "encoder.json", "tokenizer.json"]
TRICKY = ["", " ", "Hello world", "  two  spaces\n\n\ttab", "naïve café 🙂 漢字", "a<|endoftext|>b", "<|endoftext|>"]


def test_every_layout_gives_the_same_tokenizer(tmp_path):
    tokenizers = [load_tokenizer(write_tiny_tokenizer(tmp_path / layout, layout)) for layout in LAYOUTS]
    texts = SENTENCES + TRICKY
    expected = tokenizers[0].encode_batch(texts)
    for tok in tokenizers:
        assert (tok.eos_id, tok.vocab_size) == (300, 301)
        assert tok.encode_batch(texts) == expected == [tok.encode(t) for t in texts]
        assert [tok.decode(ids) for ids in expected] == texts  # byte-level: every text round-trips
        assert tok.encode("x<|endoftext|>") == tok.encode("x") + [tok.eos_id]  # special, and nothing added

        for max_length in (1, 3, 10_000):  # cut from the left: the last max_length tokens of each
            assert tok.encode_batch(texts, max_length) == [tok.encode(t)[len(tok.encode(t)) - max_length:]
                                                           if len(tok.encode(t)) > max_length else tok.encode(t)
                                                           for t in texts]


def test_save_writes_a_folder_both_minqr_and_transformers_load(tmp_path):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "src"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    tok.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    again = load_tokenizer(tmp_path / "model")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    texts = SENTENCES + TRICKY
    assert again.encode_batch(texts) == tok.encode_batch(texts) == hf(texts)["input_ids"]
    assert hf.eos_token_id == hf.pad_token_id == tok.eos_id


def test_missing_files_are_explained(tmp_path):
    with pytest.raises(MinqrError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    write_tiny_tokenizer(tmp_path, "vocab.json")
    (tmp_path / "merges.txt").unlink()  # half a pair is no tokenizer
    with pytest.raises(MinqrError, match="tokenizer.json, or vocab.json \\+ merges.txt, or encoder.json \\+ vocab.bpe"):
        load_tokenizer(tmp_path)


def test_endoftext_is_added_to_a_bpe_vocabulary_and_required_in_tokenizer_json(tmp_path):
    folder = write_tiny_tokenizer(tmp_path / "bpe")
    vocab = json.loads((folder / "vocab.json").read_text())
    del vocab["<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    assert load_tokenizer(folder).eos_id == len(vocab)
    folder = write_tiny_tokenizer(tmp_path / "json", "tokenizer.json")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = []
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(MinqrError, match="no <\\|endoftext\\|> token"):
        load_tokenizer(folder)


def test_a_trained_byte_level_bpe_is_gpt2_like_with_endoftext_last(tmp_path):
    """byte_level_bpe with training (what the synthetic task's tokenizer is): EOS is the last id and
    special, every text round-trips, and saved then loaded it is the same tokenizer."""
    trainer = trainers.BpeTrainer(vocab_size=299, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(byte_level_bpe(models.BPE(), SENTENCES * 3, trainer))
    assert tok.eos_id == tok.vocab_size - 1 and tok.vocab_size <= 300
    texts = SENTENCES + TRICKY
    assert [tok.decode(tok.encode(t)) for t in texts] == texts
    assert tok.encode("x<|endoftext|>") == tok.encode("x") + [tok.eos_id]
    assert load_tokenizer(tok.save(tmp_path)).encode_batch(texts) == tok.encode_batch(texts)


def test_real_gpt2_files(gpt2_tokenizer_dir, tmp_path):
    tok = load_tokenizer(gpt2_tokenizer_dir)
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.eos_id, tok.vocab_size) == (50256, 50257)
    assert tok.encode("<|endoftext|>") == [50256]
    shutil.copy(gpt2_tokenizer_dir / "vocab.json", tmp_path / "encoder.json")
    shutil.copy(gpt2_tokenizer_dir / "merges.txt", tmp_path / "vocab.bpe")
    assert load_tokenizer(tmp_path).encode_batch(TRICKY) == tok.encode_batch(TRICKY)


def test_real_gpt2_agrees_with_transformers_on_every_hh_text(gpt2_tokenizer_dir, hh_pairs_path):
    with gzip.open(hh_pairs_path, "rt") as f:
        pairs = [json.loads(line) for line in f]
    texts = [p[side] for p in pairs for side in ("chosen", "rejected")] + TRICKY
    tok = load_tokenizer(gpt2_tokenizer_dir)
    hf = transformers.GPT2TokenizerFast(str(gpt2_tokenizer_dir / "vocab.json"), str(gpt2_tokenizer_dir / "merges.txt"))
    ours = tok.encode_batch(texts)
    assert ours == hf(texts)["input_ids"]
    assert [tok.decode(ids) for ids in ours[:200]] == texts[:200]


def test_encode_batch_cuts_from_the_left_and_refuses_a_length_of_nothing(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    full = tokenizer.encode(SENTENCES[0])
    assert tokenizer.encode_batch([SENTENCES[0]], 5) == [full[-5:]] and tokenizer.encode_batch([SENTENCES[0]]) == [full]
    with pytest.raises(MinqrError, match="max_length must be at least 1"):
        tokenizer.encode_batch([SENTENCES[0]], 0)  # ids[-0:] would keep them all


@pytest.mark.parametrize("add_prefix_space", [True, False])
@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json"])
def test_add_prefix_space_as_transformers_reads_it_in_a_gpt2_folder(tmp_path, layout, add_prefix_space):
    """tokenizer_config.json's add_prefix_space: true made transformers' GPT2Tokenizer read "Hello" as
    " Hello" in a GPT-2 model folder, while minqr read it without the space; and a saved copy keeps it."""
    folder = write_tiny_tokenizer(tmp_path / "model", layout)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**(json.loads(config.read_text()) if config.is_file() else {}),
                                  "add_prefix_space": add_prefix_space}))
    texts = SENTENCES + TRICKY
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    assert ours.encode_batch(texts) == hf(texts, add_special_tokens=False)["input_ids"]
    assert (ours.encode("Hello")[0] == ours.encode(" Hello")[0]) == add_prefix_space
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    ours.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode_batch(texts) == ours.encode_batch(texts)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "copy")(texts, add_special_tokens=False)[
        "input_ids"] == ours.encode_batch(texts)


def test_named_chat_templates_are_kept_on_save(tmp_path):
    """A tokenizer_config.json's list of named templates: minqr renders with "default", and a saved
    copy keeps the whole list (the "tool_use" one was dropped), which transformers reads as before."""
    folder = write_tiny_tokenizer(tmp_path / "src")
    config = folder / "tokenizer_config.json"
    named = [{"name": "default", "template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"},
             {"name": "tool_use", "template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}]
    config.write_text(json.dumps({**(json.loads(config.read_text()) if config.is_file() else {}),
                                  "chat_template": named}))
    ours = load_tokenizer(folder)
    assert ours.chat_template.source == named[0]["template"]
    ours.save(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())["chat_template"] == named
    assert load_tokenizer(tmp_path / "copy").chat_template.source == named[0]["template"]
