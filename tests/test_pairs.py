"""Reading preference pairs: the file layouts, the hh-rlhf folder layout, and every kind of bad data."""
import gzip
import json
import random
import string

import pytest

from minqr.data.pairs import SKIP_HINT, LoadStats, load_pairs, read_pairs_file, resolve_source
from minqr.errors import MinqrError


def random_text(rng: random.Random, length: int = 30) -> str:
    return "".join(rng.choice(string.ascii_letters + " \n’é") for _ in range(length))


def random_dialogue(rng: random.Random) -> str:
    turns = [f"\n\n{speaker}: {random_text(rng)}" for speaker in ("Human", "Assistant") * rng.randint(1, 3)]
    return "".join(turns)


def write_lines(path, lines, gzipped=False):
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


def write_records(path, records, gzipped=False):
    return write_lines(path, [json.dumps(r) for r in records], gzipped)


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("name, gzipped", [("pairs.jsonl", False), ("pairs.jsonl.gz", True),
                                           ("named-plain.jsonl.gz", False), ("named-plain.jsonl", True)])
def test_whole_dialogues_plain_and_gzip(tmp_path, name, gzipped):
    # Gzip is recognised by content, so a misnamed file reads too.
    rng = random.Random(name)
    records = [{"chosen": random_dialogue(rng), "rejected": random_dialogue(rng)} for _ in range(17)]
    path = write_records(tmp_path / name, records, gzipped)
    pairs, stats = read_pairs_file(path)
    assert [(p.chosen, p.rejected) for p in pairs] == [(r["chosen"], r["rejected"]) for r in records]
    assert [p.origin for p in pairs] == [f"{path}:{n}" for n in range(1, 18)]
    assert (stats.pairs, stats.malformed_lines, stats.bad_fields, stats.identical) == (17, 0, 0, 0)


def test_prompt_column_with_strings(tmp_path):
    rng = random.Random(1)
    records = [{"prompt": random_dialogue(rng) + "\n\nHuman: q\n\nAssistant:",
                "chosen": " " + random_text(rng), "rejected": " " + random_text(rng)} for _ in range(5)]
    pairs, _ = load_pairs(write_records(tmp_path / "p.jsonl", records))
    assert [(p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]) for r in records]


def test_prompt_column_with_messages(tmp_path):
    record = {
        "prompt": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "Name a colour"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    mixed = {"prompt": "\n\nHuman: Name a colour", "chosen": [{"role": "assistant", "content": "Red."}],
             "rejected": "\n\nAssistant: No."}
    pairs, _ = load_pairs(write_records(tmp_path / "m.jsonl", [record, mixed]))
    dialogue = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Name a colour"
    assert (pairs[0].chosen, pairs[0].rejected) == (dialogue + "\n\nAssistant: Blue.", dialogue + "\n\nAssistant: No.")
    assert (pairs[1].chosen, pairs[1].rejected) == ("\n\nHuman: Name a colour\n\nAssistant: Red.",
                                                    "\n\nHuman: Name a colour\n\nAssistant: No.")


def test_whole_conversations_as_messages(tmp_path):
    # TRL's "implicit prompt" form: no prompt column, chosen and rejected are whole conversations.
    turn = {"role": "user", "content": "Why?"}
    record = {"chosen": [turn, {"role": "assistant", "content": "Because."}],
              "rejected": [turn, {"role": "assistant", "content": "Dunno."}]}
    (pair,), _ = load_pairs(write_records(tmp_path / "c.jsonl", [record]))
    assert (pair.chosen, pair.rejected) == ("\n\nHuman: Why?\n\nAssistant: Because.", "\n\nHuman: Why?\n\nAssistant: Dunno.")


def make_hh_folder(root, rng):
    """root/SUBSET/SPLIT.jsonl.gz as in the public hh-rlhf repository; returns the records written."""
    written = {}
    for subset in ("helpful-base", "harmless-base"):
        (root / subset).mkdir(parents=True)
        for split in ("train", "test"):
            records = [{"chosen": random_dialogue(rng), "rejected": random_dialogue(rng)}
                       for _ in range(rng.randint(2, 6))]
            write_records(root / subset / f"{split}.jsonl.gz", records, gzipped=True)
            written[subset, split] = records
    return written


def test_hh_folder_layout(tmp_path):
    written = make_hh_folder(tmp_path / "hh", random.Random(2))
    for (subset, split), records in written.items():
        pairs, stats = load_pairs(tmp_path / "hh", split=split, subset=subset)
        assert [p.chosen for p in pairs] == [r["chosen"] for r in records]
        assert stats.source == str(tmp_path / "hh" / subset / f"{split}.jsonl.gz")
        # the subset folder itself works too
        assert resolve_source(tmp_path / "hh" / subset, split=split) == tmp_path / "hh" / subset / f"{split}.jsonl.gz"


def test_hh_folder_errors(tmp_path):
    make_hh_folder(tmp_path / "hh", random.Random(3))
    with pytest.raises(MinqrError, match="subset.*harmless-base, helpful-base"):
        load_pairs(tmp_path / "hh", split="train")
    with pytest.raises(MinqrError, match="no validation.jsonl.gz or validation.jsonl in .*helpful-base"):
        load_pairs(tmp_path / "hh", split="validation", subset="helpful-base")
    with pytest.raises(MinqrError, match="no train.jsonl.gz .*red-team.*subsets with a train split there: harmless-base, helpful-base"):
        load_pairs(tmp_path / "hh", split="train", subset="red-team")
    with pytest.raises(MinqrError, match="no such data file or folder: .*nowhere"):
        load_pairs(tmp_path / "nowhere")
    with pytest.raises(MinqrError, match="subset 'helpful-base' applies to folders"):
        load_pairs(tmp_path / "hh" / "helpful-base" / "train.jsonl.gz", subset="helpful-base")


def test_hub_name_errors_need_no_network():
    with pytest.raises(MinqrError, match="needs a subset: hh-rlhf:SUBSET"):
        load_pairs("hh-rlhf")
    with pytest.raises(MinqrError, match="names subset 'helpful-base' but subset 'harmless-base'"):
        load_pairs("hh-rlhf:helpful-base", subset="harmless-base")
    with pytest.raises(MinqrError, match="unknown hh-rlhf subset 'helpful'.*helpful-base"):
        load_pairs("hh-rlhf:helpful")
    with pytest.raises(MinqrError, match="no split 'dev'"):
        load_pairs("hh-rlhf:helpful-base", split="dev")


def test_real_hh_file(hh_pairs_path):
    pairs, stats = load_pairs(hh_pairs_path)
    assert stats.pairs == len(pairs) == 2312
    assert all(p.chosen.startswith("\n\nHuman: ") and "\n\nAssistant:" in p.rejected for p in pairs)
    assert "2,312 pairs" in stats.summary()


# ---------------------------------------------------------------- bad data

GOOD = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}

# (the line as written, the counter it lands in with skip_bad, words the message must contain)
BAD_LINES = [
    ('{"chosen": "a", "rejected": ', "malformed_lines", ["malformed JSON (Expecting value at column 29)"]),
    ("not json at all", "malformed_lines", ["malformed JSON"]),
    (b'{"chosen": "\xff\xfe", "rejected": "b"}', "malformed_lines", ["not UTF-8"]),
    ('["chosen", "rejected"]', "malformed_lines", ["expected a JSON object", "list"]),
    ("17", "malformed_lines", ["expected a JSON object", "int"]),
    # nesting that Python's JSON parser recursed on until a RecursionError
    ('{"chosen": ' + "[" * 100_000 + "]" * 100_000 + ', "rejected": "b"}', "malformed_lines",
     ["malformed JSON (nested deeper than 100 levels at column 111)"]),
    ('{"chosen": "a", "rejected": ' + '{"x": ' * 5000 + "1" + "}" * 5000 + "}", "malformed_lines",
     ["malformed JSON (nested deeper than 100 levels at column"]),
    # an integer longer than Python reads (4,300 digits): a ValueError that is not a JSONDecodeError
    ('{"chosen": "a", "rejected": "b", "margin": ' + "9" * 5000 + "}", "malformed_lines",
     ["malformed JSON (Exceeds the limit (4300 digits) for integer string conversion"]),
    (json.dumps({"rejected": "b"}), "bad_fields", ["missing field 'chosen'"]),
    (json.dumps({"chosen": "a"}), "bad_fields", ["missing field 'rejected'"]),
    (json.dumps({"chosen": 3, "rejected": "b"}), "bad_fields", ["'chosen' must be a string", "int"]),
    (json.dumps({"chosen": "a", "rejected": None}), "bad_fields", ["'rejected' must be a string", "NoneType"]),
    (json.dumps({"chosen": {"text": "a"}, "rejected": "b"}), "bad_fields", ["'chosen' must be a string", "dict"]),
    (json.dumps({"chosen": "", "rejected": "b"}), "bad_fields", ["'chosen' is empty"]),
    (json.dumps({"chosen": "a", "rejected": " \n "}), "bad_fields", ["'rejected' is empty"]),
    (json.dumps({"chosen": [], "rejected": "b"}), "bad_fields", ["'chosen' is empty"]),
    (json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}), "bad_fields", ["'chosen' is empty"]),
    (json.dumps({"prompt": 5, "chosen": "a", "rejected": "b"}), "bad_fields", ["'prompt' must be a string"]),
    (json.dumps({"chosen": [{"role": "system", "content": "x"}], "rejected": "b"}), "bad_fields",
     ["'chosen' holds a message", "role"]),
    (json.dumps({"chosen": [{"role": "user", "content": 1}], "rejected": "b"}), "bad_fields",
     ["'chosen' holds a message", "content"]),
    (json.dumps({"chosen": ["hello"], "rejected": "b"}), "bad_fields", ["'chosen' holds a message"]),
    # valid JSON, but a lone surrogate is no text: tokenizers would fail on it with no file or line
    ('{"chosen": "a \\ud83d b", "rejected": "b"}', "bad_fields", ["'chosen' holds a lone surrogate '\\ud83d' at character 2"]),
    ('{"prompt": [{"role": "user", "content": "\\udc00"}], "chosen": "a", "rejected": "b"}', "bad_fields",
     ["'prompt' holds a lone surrogate '\\udc00' at character 9"]),
]


# What the train and score tools must say of a lone surrogate (tests in test_train.py, test_scoring.py)
SURROGATE_LINE = '{"chosen": "a \\ud83d b", "rejected": "c"}'


def surrogate_error(path, line: int) -> str:
    return (f"Error: {path}:{line}: field 'chosen' holds a lone surrogate '\\ud83d' at character 2: half of a "
            f"UTF-16 pair (an emoji cut in two?), no character, and no tokenizer takes it. {SKIP_HINT}\n")


def write_mixed(path, bad_line, bad_at: int, total: int = 6):
    """`total` good records with `bad_line` written as line `bad_at` (1-based), and a blank line
    before it so that line numbers count raw lines, not records."""
    lines = [json.dumps(GOOD).encode()] * total
    lines.insert(bad_at - 2, b"")
    lines.insert(bad_at - 1, bad_line if isinstance(bad_line, bytes) else bad_line.encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("bad_line, counter, words", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, bad_line, counter, words):
    bad_at = random.Random(str(bad_line)).randint(2, 6)
    path = write_mixed(tmp_path / "bad.jsonl", bad_line, bad_at)
    with pytest.raises(MinqrError) as caught:
        read_pairs_file(path)
    message = str(caught.value)
    for word in [f"{path}:{bad_at}:", "--skip-bad", *words]:
        assert word in message

    pairs, stats = read_pairs_file(path, skip_bad=True)
    assert len(pairs) == stats.pairs == 6
    other = {"malformed_lines", "bad_fields"} - {counter}
    assert getattr(stats, counter) == 1 and getattr(stats, other.pop()) == 0
    assert f"{path}:{bad_at}:" in stats.summary() and "skipped" in stats.summary()


def test_skip_bad_counts_and_identical_pairs(tmp_path):
    rng = random.Random(4)
    kinds = rng.choices(["good", "malformed", "field", "identical", "identical-after-prompt"], k=60)
    lines = []
    for kind in kinds:
        chosen, rejected = random_dialogue(rng), random_dialogue(rng)
        lines.append({
            "good": json.dumps({"chosen": chosen, "rejected": rejected}),
            "malformed": json.dumps({"chosen": chosen})[:-3],
            "field": json.dumps({"chosen": chosen, "rejected": 0}),
            "identical": json.dumps({"chosen": chosen, "rejected": chosen}),
            "identical-after-prompt": json.dumps({"prompt": "p", "chosen": [{"role": "assistant", "content": "x"}],
                                                  "rejected": "\n\nAssistant: x"}),
        }[kind])
    path = write_lines(tmp_path / "mixed.jsonl.gz", lines, gzipped=True)
    pairs, stats = read_pairs_file(path, skip_bad=True)
    assert stats.pairs == len(pairs) == kinds.count("good")
    assert stats.malformed_lines == kinds.count("malformed")
    assert stats.bad_fields == kinds.count("field")
    assert stats.identical == kinds.count("identical") + kinds.count("identical-after-prompt")
    assert [p.origin for p in pairs] == [f"{path}:{n + 1}" for n, k in enumerate(kinds) if k == "good"]
    summary = stats.summary()
    for count in (stats.pairs, stats.identical, stats.malformed_lines, stats.bad_fields):
        assert f"{count:,}" in summary
    # identical pairs are dropped with or without skip_bad: they are not errors
    clean = [line for line, kind in zip(lines, kinds) if kind in ("good", "identical")]
    _, strict = read_pairs_file(write_lines(tmp_path / "clean.jsonl", clean))
    assert strict.identical == kinds.count("identical")


def test_nothing_usable_is_an_error(tmp_path):
    with pytest.raises(MinqrError, match="no usable pairs .*dropped 2 identical"):
        read_pairs_file(write_records(tmp_path / "same.jsonl", [{"chosen": "x", "rejected": "x"}] * 2))
    with pytest.raises(MinqrError, match="no usable pairs"):
        read_pairs_file(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(MinqrError, match="no usable pairs .*skipped 1 malformed"):
        read_pairs_file(write_lines(tmp_path / "junk.jsonl", ["{"]), skip_bad=True)


def test_corrupt_gzip_is_an_error(tmp_path):
    whole = gzip.compress((json.dumps(GOOD) + "\n").encode() * 200)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MinqrError, match=f"cannot read {path}"):
        read_pairs_file(path)


def test_a_line_longer_than_any_record_is_an_error_before_it_is_read_whole(tmp_path, monkeypatch):
    """A gzip of 1 MB can hold one line of a gigabyte, read whole before (3 GB of memory); reading
    stops at the bound, naming the line."""
    import minqr.data.pairs as pairs_module

    monkeypatch.setattr(pairs_module, "MAX_LINE_BYTES", 1000)
    path = write_lines(tmp_path / "long.jsonl.gz", [json.dumps(GOOD), "x" * 5000, json.dumps(GOOD)], gzipped=True)
    with pytest.raises(MinqrError) as caught:
        read_pairs_file(path)
    assert str(caught.value) == (f"{path}:2: a line of more than 1,000 bytes, which no record of preference data "
                                 "needs (is it a JSON-lines file?)")
    exact = write_lines(tmp_path / "fits.jsonl", [json.dumps(GOOD)] * 3)  # lines within the bound: as before
    assert len(read_pairs_file(exact)[0]) == 3


def test_summary_reads_as_one_line():
    stats = LoadStats(source="f.jsonl", pairs=1234, malformed_lines=2, bad_fields=1, identical=3,
                      first_skipped="f.jsonl:7: malformed JSON")
    assert stats.summary() == ("1,234 pairs from f.jsonl; dropped 3 identical, skipped 2 malformed lines "
                               "and 1 with bad fields (first: f.jsonl:7: malformed JSON)")
