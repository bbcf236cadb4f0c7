"""The formats peers keep preference data in (TRL's layouts in JSON lines, Parquet, Arrow, `datasets`
splits) read into the same Pairs, the pair margin column, and the messages for what is missing.

JSON lines are the reference format (tests/test_pairs.py); every other format must give the same
Pairs from the same records, only their origins ("FILE:row N" instead of "FILE:LINE") differ.
Tests that need pyarrow or datasets (the extra minqr[data]) skip with a reason without them.
"""
import dataclasses
import json
import math
import sys

import pytest
import torch
from factories import random_gpt2, write_tiny_tokenizer
from test_pairs import write_lines, write_records

from minqr.data.batching import collate_pairs, tokenize_pairs
from minqr.data.pairs import SKIP_HINT, Pair, load_pairs, names_one_split, read_pairs_file
from minqr.errors import MinqrError
from minqr.models.reward import RewardModel
from minqr.models.tokenizer import load_tokenizer
from minqr.objectives.loss import pair_loss
from minqr.training.config import TrainConfig
from minqr.training.loss import StepLoss

EXTRA_MESSAGE = ("needs {module}, which is not installed: install minqr's optional extra for data files, "
                 "pip install 'minqr[data]' (pyarrow and datasets)")


def message(role, content):
    return {"role": role, "content": content}


QUESTION = [message("user", "Hi"), message("assistant", "Hello."), message("user", "Sky colour?")]
# TRL's four layouts (standard or conversational, explicit or implicit prompt), three records each;
# within a layout every record has the same column types, as a table needs.
LAYOUTS = {
    "standard implicit": [
        {"chosen": f"\n\nHuman: q{k}\n\nAssistant: yes {k}", "rejected": f"\n\nHuman: q{k}\n\nAssistant: no"}
        for k in range(3)],
    "standard explicit": [
        {"prompt": f"\n\nHuman: q{k}\n\nAssistant:", "chosen": f" yes {k}", "rejected": " no"} for k in range(3)],
    "conversational explicit": [
        {"prompt": QUESTION[: 1 + 2 * (k % 2)], "chosen": [message("assistant", f"Blue {k}.")],
         "rejected": [message("assistant", "Red.")]} for k in range(3)],
    "conversational implicit": [
        {"chosen": QUESTION[: 1 + 2 * (k % 2)] + [message("assistant", f"Blue {k}.")],
         "rejected": QUESTION[: 1 + 2 * (k % 2)] + [message("assistant", "Red.")]} for k in range(3)],
}
MARGINS = [0.5, 2.0, -1.25]


def with_margins(records):
    return [{**record, "margin": margin} for record, margin in zip(records, MARGINS)]


def without_origin(pairs):
    return [dataclasses.replace(pair, origin="") for pair in pairs]


# ---------------------------------------------------------------- the same Pairs from every format


def write_parquet(path, records):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (pip install 'minqr[data]')")
    pytest.importorskip("pyarrow.parquet", reason="Parquet needs pyarrow").write_table(pa.Table.from_pylist(records),
                                                                                       path)
    return path


def write_arrow(path, records, stream: bool):
    pa = pytest.importorskip("pyarrow", reason="Arrow needs pyarrow (pip install 'minqr[data]')")
    table = pa.Table.from_pylist(records)
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):  # several batches: row numbers run across them
            writer.write_batch(batch)
    return path


def write_saved_dataset(path, records):
    """A split saved by `datasets` (save_to_disk); returns its .arrow file, an Arrow stream."""
    datasets = pytest.importorskip("datasets", reason="needs datasets (pip install 'minqr[data]')")
    datasets.Dataset.from_list(records).save_to_disk(str(path))
    (arrow_file,) = path.glob("*.arrow")
    return arrow_file


WRITERS = {
    "parquet": lambda path, records: write_parquet(path.with_suffix(".parquet"), records),
    "arrow file": lambda path, records: write_arrow(path.with_suffix(".arrow"), records, stream=False),
    "arrow stream": lambda path, records: write_arrow(path.with_suffix(".arrows"), records, stream=True),
    "datasets .arrow": lambda path, records: write_saved_dataset(path, records),
}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("layout", [*LAYOUTS, "with margins"])
def test_every_format_gives_the_pairs_of_json_lines(tmp_path, layout, writer):
    records = with_margins(LAYOUTS["standard explicit"]) if layout == "with margins" else LAYOUTS[layout]
    expected, _ = read_pairs_file(write_records(tmp_path / "pairs.jsonl", records))
    path = WRITERS[writer](tmp_path / "pairs", records)
    pairs, stats = read_pairs_file(path)
    assert without_origin(pairs) == without_origin(expected)
    assert [p.origin for p in pairs] == [f"{path}:row {n}" for n in range(3)]
    assert stats.pairs == 3 and stats.source == str(path)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` offline, caching into tmp_path: a local folder loads, a hub name is not reached."""
    datasets = pytest.importorskip("datasets", reason="hf: names need datasets (pip install 'minqr[data]')")
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return datasets


def write_dataset_repository(folder, splits: dict):
    """A folder laid out as a data set repository of the hub: data/SPLIT-00000-of-00001.parquet."""
    (folder / "data").mkdir(parents=True)
    for split, records in splits.items():
        write_parquet(folder / "data" / f"{split}-00000-of-00001.parquet", records)
    return folder


def test_hf_names_load_through_datasets(tmp_path, datasets_cache):
    # The same code path as a hub name (datasets.load_dataset), offline, on a local repository.
    train = with_margins(LAYOUTS["conversational implicit"])
    test = train[::-1]  # the splits of one data set share their columns
    folder = write_dataset_repository(tmp_path / "repo", {"train": train, "test": test})
    expected_train, _ = read_pairs_file(write_records(tmp_path / "train.jsonl", train))
    expected_test, _ = read_pairs_file(write_records(tmp_path / "test.jsonl", test))

    pairs, stats = load_pairs(f"hf:{folder}")  # the split from the caller: train
    assert without_origin(pairs) == without_origin(expected_train)
    assert [p.origin for p in pairs] == [f"hf:{folder}:train:row {n}" for n in range(3)]
    assert stats.source == f"hf:{folder}:train"
    assert without_origin(load_pairs(f"hf:{folder}", split="test")[0]) == without_origin(expected_test)
    # a split in the name wins: hf:NAME:SPLIT is one split's data, like a file
    assert without_origin(load_pairs(f"hf:{folder}:test", split="train")[0]) == without_origin(expected_test)
    assert [p.pair_margin for p in load_pairs(f"hf:{folder}:train[1:]")[0]] == MARGINS[1:]
    assert names_one_split(f"hf:{folder}:test") and not names_one_split(f"hf:{folder}")

    with pytest.raises(MinqrError) as caught:
        load_pairs(f"hf:{folder}:validation")
    assert str(caught.value).startswith(f"cannot load hf:{folder}:validation: Unknown split \"validation\"")
    (folder / "data" / "test-00000-of-00001.parquet").unlink()
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", LAYOUTS["standard explicit"])
    with pytest.raises(MinqrError, match=f"^cannot load hf:{folder}:train: "):
        load_pairs(f"hf:{folder}:train", split="train")


def test_a_column_of_mixed_types_through_datasets_is_read_as_its_values(tmp_path, datasets_cache):
    """datasets stores a column of mixed types as JSON text: its strings came out with their quotes
    ('"a"') and its numbers as text ('5'), without a word. Decoded, they meet the file readers' checks."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_lines(folder / "train.jsonl", ['{"chosen": "yes", "rejected": "no"}', '{"chosen": 5, "rejected": "no"}'])
    with pytest.raises(MinqrError) as caught:
        load_pairs(f"hf:{folder}:train")
    assert str(caught.value).startswith(f"hf:{folder}:train:row 1: field 'chosen' must be a string or a list of "
                                        "{role, content} messages, not int.")
    pairs, stats = load_pairs(f"hf:{folder}:train", skip_bad=True)
    assert [(p.chosen, p.rejected) for p in pairs] == [("yes", "no")] and stats.bad_fields == 1
    # the same inside message lists: datasets marks the messages' content as JSON text
    nested = tmp_path / "nested"
    nested.mkdir()
    turn = [{"role": "user", "content": "hi"}]
    write_records(nested / "train.jsonl", [{"chosen": turn + [{"role": "assistant", "content": "yes"}],
                                            "rejected": turn + [{"role": "assistant", "content": "no"}]},
                                           {"chosen": turn + [{"role": "assistant", "content": 5}],
                                            "rejected": turn + [{"role": "assistant", "content": "no"}]}])
    with pytest.raises(MinqrError, match=f"^hf:{nested}:train:row 1: "):
        load_pairs(f"hf:{nested}:train")
    (pair,), _ = load_pairs(f"hf:{nested}:train", skip_bad=True)
    assert pair.chosen == "\n\nHuman: hi\n\nAssistant: yes"  # no quotes kept


def test_hf_name_offline_says_what_to_do(datasets_cache):
    with pytest.raises(MinqrError) as caught:
        load_pairs("hf:nobody/no-such-pairs", split="test")
    assert str(caught.value) == (
        "cannot reach the Hugging Face hub for hf:nobody/no-such-pairs:test, and the datasets cache (HF_HOME) does "
        "not hold it: run the same command once online, which fills the cache, and copy that cache here; or, "
        "online, save the split as a file (datasets.load_dataset('nobody/no-such-pairs', split='test')"
        ".to_parquet('pairs.parquet')) and pass that file as the data")


def test_hf_name_needs_a_name():
    with pytest.raises(MinqrError, match="^data 'hf:' names no data set: hf:NAME or hf:NAME:SPLIT, e.g. "
                                         "hf:trl-lib/ultrafeedback_binarized$"):
        load_pairs("hf:")


def test_missing_extra_is_one_message_naming_it(tmp_path, monkeypatch):
    # Written without pyarrow: the reader stops at the import, before it reads past the magic bytes.
    parquet = tmp_path / "pairs.parquet"
    parquet.write_bytes(b"PAR1" + bytes(16))
    stream = tmp_path / "data-00000-of-00001.arrow"
    stream.write_bytes(b"\xff\xff\xff\xff" + bytes(16))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "datasets", None)
    for path, kind in ((parquet, "Parquet"), (stream, "Arrow IPC stream")):
        with pytest.raises(MinqrError) as caught:
            read_pairs_file(path)
        assert str(caught.value) == f"reading {path} ({kind}) " + EXTRA_MESSAGE.format(module="pyarrow")
    with pytest.raises(MinqrError) as caught:
        load_pairs("hf:trl-lib/ultrafeedback_binarized")
    assert str(caught.value) == ("reading hf:trl-lib/ultrafeedback_binarized:train "
                                 + EXTRA_MESSAGE.format(module="datasets"))
    # JSON lines need neither
    assert len(read_pairs_file(write_records(tmp_path / "p.jsonl", LAYOUTS["standard explicit"]))[0]) == 3


def test_truncated_parquet_is_an_error_naming_the_file(tmp_path):
    whole = write_parquet(tmp_path / "whole.parquet", LAYOUTS["standard explicit"]).read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MinqrError, match=f"^cannot read {cut} as Parquet: "):
        read_pairs_file(cut)


def test_an_arrow_file_whose_offsets_point_outside_it_is_an_error_naming_the_file(tmp_path):
    """Arrow files are memory-mapped as they are: a string offset past the data buffer would be read
    from outside the file (a bus error that kills the process without a word) unless checked."""
    pa = pytest.importorskip("pyarrow")
    import numpy as np

    offsets = pa.py_buffer(np.array([0, 1, 2_000_000_000, 3], dtype=np.int32).tobytes())
    broken = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"abc")])  # not validated
    good = pa.array(["x", "y", "z"])
    for name, open_writer in (("f.arrow", pa.ipc.new_file), ("s.arrows", pa.ipc.new_stream)):
        path = tmp_path / name
        with pa.OSFile(str(path), "wb") as sink, open_writer(sink, pa.schema([("chosen", pa.string()),
                                                                              ("rejected", pa.string())])) as writer:
            writer.write_batch(pa.record_batch([broken, good], names=["chosen", "rejected"]))
        kind = "Arrow IPC file" if name == "f.arrow" else "Arrow IPC stream"
        with pytest.raises(MinqrError, match=f"^cannot read {path} as {kind}: .*out of bounds"):
            read_pairs_file(path)


def test_a_column_given_twice_is_an_error_naming_it(tmp_path):
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "twice.parquet"
    table = pa.table([pa.array(["a"]), pa.array(["b"]), pa.array(["c"])], names=["chosen", "rejected", "chosen"])
    parquet.write_table(table, path)
    with pytest.raises(MinqrError) as caught:
        read_pairs_file(path)
    assert str(caught.value) == (f"{path}: the column 'chosen' appears 2 times: which one holds the data is not "
                                 "clear; rename or drop the others")


# ---------------------------------------------------------------- implicit and explicit prompts


def test_explicit_and_implicit_prompts_give_the_same_pairs(tmp_path):
    implicit, _ = read_pairs_file(write_records(tmp_path / "i.jsonl", LAYOUTS["conversational implicit"]))
    explicit, _ = read_pairs_file(write_records(tmp_path / "e.jsonl", LAYOUTS["conversational explicit"]))
    assert without_origin(implicit) == without_origin(explicit)
    # by hand: record 1 is the three QUESTION messages, then "Blue 1." against "Red."
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Sky colour?"
    assert implicit[1] == Pair(prompt + "\n\nAssistant: Blue 1.", prompt + "\n\nAssistant: Red.",
                               f"{tmp_path / 'i.jsonl'}:2", prompt_length=len(prompt))
    # the response is the whole final message, even when its text holds an assistant turn of its own
    tricky = {"chosen": [message("user", "Q"), message("assistant", "A\n\nAssistant: B")],
              "rejected": [message("user", "Q"), message("assistant", "C")]}
    (pair,), _ = read_pairs_file(write_records(tmp_path / "t.jsonl", [tricky]))
    assert pair.chosen[pair.response_start("chosen"):] == "\n\nAssistant: A\n\nAssistant: B"
    # standard (string) layouts: the same texts either way
    standard_implicit, _ = read_pairs_file(write_records(tmp_path / "si.jsonl", LAYOUTS["standard implicit"]))
    standard_explicit, _ = read_pairs_file(write_records(tmp_path / "se.jsonl", LAYOUTS["standard explicit"]))
    assert [(p.chosen, p.rejected) for p in standard_implicit] == [(p.chosen, p.rejected) for p in standard_explicit]


def test_conversations_that_differ_before_their_final_message_are_whole_dialogues(tmp_path):
    record = {"chosen": [message("user", "Q"), message("assistant", "A")],
              "rejected": [message("user", "Other"), message("assistant", "B")]}
    (pair,), _ = read_pairs_file(write_records(tmp_path / "d.jsonl", [record]))
    assert pair.prompt_length is None
    assert pair.response_start("rejected") == len("\n\nHuman: Other\n\nAssistant:")


# ---------------------------------------------------------------- the margin column


def test_margins_are_read_and_batched(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tokenizer"))
    records = with_margins(LAYOUTS["standard implicit"])
    records[1]["margin"] = 3  # an integer is a number too
    pairs, _ = read_pairs_file(write_records(tmp_path / "m.jsonl", records))
    assert [p.pair_margin for p in pairs] == [0.5, 3.0, -1.25]
    tokenized = tokenize_pairs(pairs, tokenizer, 64)
    assert tokenized.pair_margins == [0.5, 3.0, -1.25]
    batch = tokenized.batch([2, 0], shared_prefix=True)
    assert batch.pair_margins.dtype == torch.float32 and batch.pair_margins.tolist() == [-1.25, 0.5]
    assert batch.to("cpu").pair_margins.tolist() == [-1.25, 0.5]
    # no margin column: nothing is carried, as before margins existed
    plain, _ = read_pairs_file(write_records(tmp_path / "p.jsonl", LAYOUTS["standard implicit"]))
    assert tokenize_pairs(plain, tokenizer, 64).batch([0, 1]).pair_margins is None


BAD_MARGINS = [
    ('"1.5"', "'1.5' (str)"),
    ("NaN", "nan (float)"),
    ("Infinity", "inf (float)"),
    ("-Infinity", "-inf (float)"),
    ("1e400", "inf (float)"),  # JSON reads it as inf
    ("true", "True (bool)"),
    ("[1]", "[1] (list)"),
]


@pytest.mark.parametrize("written, shown", BAD_MARGINS)
def test_bad_margin_names_file_and_line(tmp_path, written, shown):
    good = json.dumps({**LAYOUTS["standard implicit"][0], "margin": 1.0})
    bad = json.dumps(LAYOUTS["standard implicit"][1])[:-1] + f', "margin": {written}}}'
    path = write_lines(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(MinqrError) as caught:
        read_pairs_file(path)
    assert str(caught.value) == (f"{path}:2: field 'margin' must be a finite number (how much the chosen response "
                                 f"should beat the rejected one by), not {shown}. {SKIP_HINT}")
    pairs, stats = read_pairs_file(path, skip_bad=True)
    assert len(pairs) == 2 and stats.bad_fields == 1


def test_bad_margin_in_a_table_names_file_and_row(tmp_path):
    records = with_margins(LAYOUTS["standard explicit"])
    records[2]["margin"] = math.nan
    path = write_parquet(tmp_path / "nan.parquet", records)
    with pytest.raises(MinqrError) as caught:
        read_pairs_file(path)
    assert str(caught.value) == (f"{path}:row 2: field 'margin' must be a finite number (how much the chosen "
                                 f"response should beat the rejected one by), not nan (float). {SKIP_HINT}")


def test_margins_on_some_pairs_only_is_an_error(tmp_path):
    records = with_margins(LAYOUTS["standard implicit"])
    del records[1]["margin"]
    records[2]["margin"] = None
    path = write_records(tmp_path / "some.jsonl", records)
    with pytest.raises(MinqrError) as caught:
        read_pairs_file(path)
    assert str(caught.value) == (f"{path}: 1 of 3 pairs have a margin and 2 have none (the first: {path}:2): "
                                 "give every pair a margin (0 for none), or none")
    with pytest.raises(MinqrError, match="^the pairs to tokenise: 1 of 3 pairs have a margin"):
        tokenize_pairs([Pair("a", "b", "x:1", pair_margin=1.0), Pair("a", "c", "x:2"), Pair("a", "d", "x:3")],
                       None, 8)


@pytest.mark.parametrize("head, objective", [("scalar", None), ("quantile", "mixture"), ("quantile", "paper")])
def test_margins_reach_the_training_objective(head, objective):
    # A batch's margins go through the model's loss into the step's objective: the objective of
    # the model's outputs with those margins, summed over the pairs and divided by the step's pairs.
    config = TrainConfig(head=head, objective=objective, num_quantiles=None if head == "scalar" else 3,
                         bag_coef=0.0)
    model = RewardModel(random_gpt2(), config.head_config())
    tokens = [[5, 6, 7], [5, 6, 9, 10]], [[5, 6, 8], [5, 11]]
    margins = [1.5, -0.5]
    batch = collate_pairs(*tokens, pad_id=0, pair_margins=margins)
    loss, mu_chosen, mu_rejected = StepLoss(model, config.bag_coef, config.center_coef, config.lm_coef)(
        batch, pairs=4, lm_tokens=1.0)
    r_chosen, r_rejected = (r.float() for r in model.forward_pairs(batch))
    hyper = config.head_config().hyperparameters
    want = pair_loss(r_chosen, r_rejected, config.objective, "sum", pair_margin=torch.tensor(margins), **hyper) / 4
    without = pair_loss(r_chosen, r_rejected, config.objective, "sum", **hyper) / 4
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.item() != pytest.approx(without.item(), rel=1e-3)
