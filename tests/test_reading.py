"""minqr.reading: JSON of bounded depth and .npz archives read without pickle. The readers that use
them (data, scores, config files) are tested with their modules; here the two functions, against
json.loads and a depth counted by a recursive walk of what json.loads returns."""
import json
import pickle
import random

import numpy as np
import pytest

from minqr.errors import MinqrError
from minqr.reading import MAX_JSON_DEPTH, loads, read_npz


def depth(value) -> int:
    """Nesting depth of a parsed JSON value: 0 for a scalar, 1 for [] or {}."""
    if isinstance(value, list):
        return 1 + max((depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(item) for item in value.values()), default=0)
    return 0


def random_json(rng: random.Random, levels: int):
    """A random JSON value exactly `levels` deep, with strings full of brackets, quotes and escapes."""
    if levels == 0:
        return rng.choice([rng.random(), rng.randint(-9, 9), None, True, "".join(
            rng.choice('[]{}"\\ab\n') for _ in range(rng.randint(0, 12)))])
    inner = [random_json(rng, levels - 1)] + [random_json(rng, rng.randint(0, min(levels - 1, 2))) for _ in range(2)]
    rng.shuffle(inner)
    if rng.random() < 0.5:
        return inner
    return {f"k{k}]{{\"": item for k, item in enumerate(inner)}


@pytest.mark.parametrize("seed", range(6))
def test_loads_is_json_loads_up_to_the_bound_and_refuses_beyond(seed):
    rng = random.Random(seed)
    for levels in (0, 1, 7, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH):
        text = json.dumps(random_json(rng, levels), indent=rng.choice([None, 1]))
        assert depth(json.loads(text)) == levels
        assert loads(text) == json.loads(text) and loads(text.encode()) == json.loads(text)
    text = json.dumps(random_json(rng, MAX_JSON_DEPTH + 1))
    with pytest.raises(json.JSONDecodeError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        loads(text)


def test_a_hundred_thousand_brackets_are_a_decode_error_at_the_first_too_deep():
    text = '{"chosen": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(RecursionError):
        json.loads(text)  # what minqr read before: a RecursionError far from the file
    with pytest.raises(json.JSONDecodeError) as caught:
        loads(text)
    assert caught.value.pos == len('{"chosen": ') + MAX_JSON_DEPTH - 1 and caught.value.lineno == 1
    # brackets inside strings are text, not nesting
    assert loads(json.dumps({"chosen": "[" * 100_000, "rejected": '\\"{' * 1000})) == \
        {"chosen": "[" * 100_000, "rejected": '\\"{' * 1000}


def test_a_string_left_open_is_scanned_once():
    """A line of many escaped quotes in a string that never closes, with enough brackets to need the
    depth scan: the scan retried at every quote, reading the rest of the line each time (a 60 KB
    line took 20 s, a few MB hours); now one pass, and json.loads says what is wrong."""
    text = '{"chosen": "' + '\\"' * 500_000 + "[" * (MAX_JSON_DEPTH + 1)  # 1 MB
    with pytest.raises(json.JSONDecodeError, match="Unterminated string"):
        loads(text)
    with pytest.raises(json.JSONDecodeError, match="Unterminated string"):  # open, ending in a backslash
        loads('["' + "[" * (MAX_JSON_DEPTH + 1) + '\\')


def test_a_key_given_twice_is_a_decode_error():
    """json.loads keeps the last of two equal keys without a word; a pair whose chosen reply is
    given twice is no pair anyone meant."""
    text = '{"chosen": "good", "rejected": "bad", "chosen": "worse"}'
    assert json.loads(text) == {"chosen": "worse", "rejected": "bad"}
    with pytest.raises(json.JSONDecodeError) as caught:
        loads(text)
    assert caught.value.msg == "the key 'chosen' is given twice in one object"
    with pytest.raises(json.JSONDecodeError, match="the key 'a' is given twice"):
        loads('[{"b": {"a": 1, "a": 1}}]')  # nested, and equal values too
    assert loads('{"a": {"a": 1}, "b": [{"a": 2}]}') == {"a": {"a": 1}, "b": [{"a": 2}]}  # one a an object


def test_read_npz_gives_every_array(tmp_path):
    arrays = {"chosen": np.random.default_rng(0).normal(size=(3, 2)), "metadata": np.array('{"a": 1}')}
    np.savez(tmp_path / "s.npz", **arrays)
    read = read_npz(tmp_path / "s.npz", "a scores file")
    assert sorted(read) == sorted(arrays) and all(np.array_equal(read[k], arrays[k]) for k in arrays)


def test_bad_npz_files_are_named_and_pickle_is_never_suggested(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, chosen=np.zeros((40, 30)))
    cases = {
        "empty.npz": (b"", "is empty (0 bytes)"),
        "text.npz": (b"definitely not a zip archive", "is not a .npz archive"),
        "pickle.npz": (pickle.dumps({"chosen": [1.0]}), "is not a .npz archive"),
        "cut.npz": (good.read_bytes()[:200], "damaged .npz archive"),
    }
    with open(tmp_path / "array.npy", "wb") as f:
        np.save(f, np.zeros(3))
    cases["array.npz"] = ((tmp_path / "array.npy").read_bytes(), "is a .npy file")
    np.savez(tmp_path / "objects.npz", chosen=np.zeros(2), metadata=np.array({"a": 1}, dtype=object))
    cases["objects.npz"] = ((tmp_path / "objects.npz").read_bytes(), "'metadata' is malformed or holds Python objects")
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(MinqrError) as caught:
            read_npz(path, "a scores file")
        assert str(path) in str(caught.value) and message in str(caught.value), name
        assert "allow_pickle" not in str(caught.value) and "not a scores file" in str(caught.value), str(caught.value)
    with pytest.raises(MinqrError, match="cannot be read"):
        read_npz(tmp_path / "none.npz", "a scores file")


def bomb_member(shape) -> bytes:
    """A .npy member whose header declares `shape` (float32) over 8 bytes of data."""
    import io
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return header.getvalue() + b"\0" * 8  # (the header writer writes the magic too)


def test_an_array_declaring_more_than_it_holds_is_refused_before_allocating(tmp_path):
    """A 1 KB file whose header declares 10**12 rows: a MemoryError traceback (3.6 TiB) before, or
    gigabytes allocated. Arrays not asked for are not read at all."""
    import io
    import zipfile

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("junk.npy", bomb_member((10**12, 1)))
        buffer = io.BytesIO()
        np.save(buffer, np.arange(3, dtype=np.float32))
        archive.writestr("chosen.npy", buffer.getvalue())
    with pytest.raises(MinqrError) as caught:
        read_npz(path, "a test archive")
    assert str(caught.value) == (f"{path}: its array 'junk' declares float32 of shape [1000000000000, 1] "
                                 "(4,000,000,000,000 bytes) but holds 8 bytes: it is damaged, not a test archive")
    arrays = read_npz(path, "a test archive", ("chosen", "anchor"))  # junk not asked for: never read
    assert list(arrays) == ["chosen"] and arrays["chosen"].tolist() == [0.0, 1.0, 2.0]
