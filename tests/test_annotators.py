"""Annotator ids in the data: read from every format (JSON lines, Parquet, Arrow, `datasets`
splits, `hf:` names), mapped from another column, carried through tokenising and batching; bad ids
named by file and line (or row), skippable with skip_bad."""
import json

import pytest
import torch
from factories import write_tiny_tokenizer
from test_pairs import write_lines, write_records
from test_peer_formats import LAYOUTS, WRITERS, datasets_cache, write_dataset_repository, write_parquet  # noqa: F401

from minqr.data.batching import tokenize_pairs
from minqr.data.pairs import SKIP_HINT, Pair, load_pairs, read_pairs_file
from minqr.errors import MinqrError
from minqr.models.tokenizer import load_tokenizer

BASE = LAYOUTS["standard explicit"]  # three records


def labelled(ids, field="annotator"):
    """BASE's records, labelled by `ids` (one a record; the first record labelled twice by the last two)."""
    records = [{**record, field: annotator} for record, annotator in zip(BASE + BASE[:1], ids)]
    return records


@pytest.mark.parametrize("ids", [["ann-1", "ann-2", "ann-1", "ann-3"], [7, 0, 7, 12345678901]])
@pytest.mark.parametrize("writer", ["jsonl", *WRITERS])
def test_every_format_reads_the_ids(tmp_path, ids, writer):
    records = labelled(ids)
    path = (write_records(tmp_path / "pairs.jsonl", records) if writer == "jsonl"
            else WRITERS[writer](tmp_path / "pairs", records))
    pairs, stats = read_pairs_file(path)
    assert [pair.annotator for pair in pairs] == ids and stats.pairs == 4
    assert (pairs[0].chosen, pairs[0].rejected) == (pairs[3].chosen, pairs[3].rejected)  # one pair, two labels


def test_another_column_is_mapped(tmp_path):
    path = write_parquet(tmp_path / "prism.parquet", labelled(["u1", "u2", "u3", "u4"], field="user_id"))
    assert [p.annotator for p in read_pairs_file(path, annotator_field="user_id")[0]] == ["u1", "u2", "u3", "u4"]
    assert [p.annotator for p in read_pairs_file(path)[0]] == [None] * 4  # "annotator" by default, optional
    assert [p.annotator for p in read_pairs_file(path, annotator_field="rater")[0]] == [None] * 4  # no such field
    with pytest.raises(MinqrError, match="must name a field of its own"):
        read_pairs_file(path, annotator_field="chosen")


@pytest.mark.usefixtures("datasets_cache")  # offline, caching into tmp_path
def test_hf_names_read_the_ids(tmp_path):
    folder = write_dataset_repository(tmp_path / "repo", {"train": labelled([3, 1, 4, 1], field="user_id")})
    pairs, _ = load_pairs(f"hf:{folder}", annotator_field="user_id")
    assert [p.annotator for p in pairs] == [3, 1, 4, 1]


BAD_IDS = [("true", "True (bool)"), ("1.5", "1.5 (float)"), ('["a"]', "['a'] (list)"), ('""', "an empty string"),
           ('{"id": 1}', "{'id': 1} (dict)")]


@pytest.mark.parametrize("written, shown", BAD_IDS)
def test_bad_id_names_file_and_line(tmp_path, written, shown):
    good = json.dumps({**BASE[0], "annotator": "a"})
    bad = json.dumps(BASE[1])[:-1] + f', "annotator": {written}}}'
    path = write_lines(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(MinqrError) as caught:
        read_pairs_file(path)
    assert str(caught.value) == (f"{path}:2: field 'annotator' must be an annotator's id, a non-empty string or an "
                                 f"integer, not {shown}. {SKIP_HINT}")
    pairs, stats = read_pairs_file(path, skip_bad=True)
    assert len(pairs) == 2 and stats.bad_fields == 1


def test_bad_id_in_a_table_names_file_and_row(tmp_path):
    path = write_parquet(tmp_path / "float.parquet", labelled([1.0, 2.0, 3.5, 1.0]))
    with pytest.raises(MinqrError) as caught:
        read_pairs_file(path)
    assert str(caught.value).startswith(f"{path}:row 0: field 'annotator' must be an annotator's id")


@pytest.mark.parametrize("ids, line, what", [
    (["a", None, "b", "c"], 2, "has no annotator id, but {path}:1 has the str id 'a'"),
    ([5, 6, None, 5], 3, "has no annotator id, but {path}:1 has the int id 5"),
    (["a", "b", 3, "a"], 3, "has the int id 3, but {path}:1 has the str id 'a'"),
])
def test_ids_missing_or_mixed_in_one_file(tmp_path, ids, line, what):
    records = labelled(ids)
    if ids[1] is None:
        del records[1]["annotator"]  # absent and null are the same: no id
    path = write_records(tmp_path / "mixed.jsonl", records)
    with pytest.raises(MinqrError) as caught:
        read_pairs_file(path)
    assert str(caught.value) == (f"{path}:{line}: field 'annotator': this pair {what.format(path=path)}; give every "
                                 f"pair an id, all strings or all integers. {SKIP_HINT}")
    pairs, stats = read_pairs_file(path, skip_bad=True)
    assert len(pairs) == 3 and stats.bad_fields == 1 and stats.first_skipped.startswith(f"{path}:{line}:")


def test_null_in_a_table_with_ids(tmp_path):
    path = write_parquet(tmp_path / "null.parquet", labelled([4, None, 4, 5]))
    with pytest.raises(MinqrError, match=f"^{path}:row 1: field 'annotator': this pair has no annotator id"):
        read_pairs_file(path)


def test_ids_travel_through_tokenising_and_batching(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tokenizer"))
    pairs, _ = read_pairs_file(write_records(tmp_path / "p.jsonl", labelled(["x", "y", "x", 9][:3] + ["z"])))
    tokenized = tokenize_pairs(pairs, tokenizer, 64)
    assert tokenized.annotator_ids == ("x", "y", "z") and tokenized.annotators == [0, 1, 0, 2]
    batch = tokenized.batch([3, 1, 0], shared_prefix=True).to("cpu")
    assert batch.annotators.dtype == torch.long and batch.annotators.tolist() == [2, 1, 0]
    assert tokenized.batch([2, 0], shared_prefix=False).annotators.tolist() == [0, 0]
    plain, _ = read_pairs_file(write_records(tmp_path / "plain.jsonl", BASE))
    plain_tokens = tokenize_pairs(plain, tokenizer, 64)
    assert plain_tokens.annotators is None and plain_tokens.batch([0]).annotators is None
    with pytest.raises(MinqrError, match="has no annotator id"):
        tokenize_pairs([Pair("a", "b", "x:1", annotator="p"), Pair("a", "c", "x:2")], tokenizer, 8)
