"""The scores file format: round trips in both layouts, and a clear error for every bad file."""
import json

import numpy as np
import pytest
import torch

from minqr import __version__
from minqr.distribution.statistics import relative_outputs
from minqr.errors import MinqrError
from minqr.study.scores_file import FORMAT, Scores, load_scores, save_scores


def metadata(head="quantile", n=4, **overrides) -> dict:
    taus = ((2 * np.arange(n) + 1) / (2 * n)).tolist() if head == "quantile" else None
    return {"model": "runs/m", "head": head, "data": "data/test.jsonl", "split": "test",
            "workload": "synthetic test", "taus": taus, "options": {"max_length": 64}, **overrides}


def random_outputs(num_pairs, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.sort(rng.normal(size=(2, num_pairs, n)), axis=-1)  # [2, P, N]: chosen, rejected


def write_raw_npz(path, chosen, rejected, meta):
    """A .npz laid out like a scores file but written around save_scores' checks."""
    np.savez(path, chosen=chosen, rejected=rejected, metadata=np.array(json.dumps(meta)))


@pytest.mark.parametrize("suffix", [".npz", ".jsonl"])
@pytest.mark.parametrize("head, num_pairs, n", [("quantile", 7, 10), ("quantile", 1, 3), ("quantile", 5, 1),
                                                 ("scalar", 6, 1)])
def test_round_trip(tmp_path, suffix, head, num_pairs, n):
    chosen, rejected = random_outputs(num_pairs, n, seed=num_pairs * n)  # float64 in, float32 stored
    path = save_scores(tmp_path / f"scores{suffix}", chosen, rejected, metadata(head, n, extra={"a": [1, 2]}))
    scores = load_scores(path)
    np.testing.assert_array_equal(scores.chosen, chosen.astype(np.float32))
    np.testing.assert_array_equal(scores.rejected, rejected.astype(np.float32))
    assert scores.chosen.dtype == np.float32 and scores.chosen.shape == (num_pairs, n)
    assert scores.metadata["format"] == FORMAT and scores.metadata["minqr_version"] == __version__
    assert scores.metadata["extra"] == {"a": [1, 2]} and scores.metadata["options"] == {"max_length": 64}
    assert (scores.num_pairs, scores.num_quantiles, scores.head) == (num_pairs, n, head)
    if head == "scalar":
        assert scores.taus is None and scores.label == "scalar"
    else:
        np.testing.assert_allclose(scores.taus, (2 * np.arange(n) + 1) / (2 * n))
        assert scores.label == f"quantile N={n}"  # a file from before objectives
    assert [p.name for p in tmp_path.iterdir()] == [f"scores{suffix}"]  # no temporary left behind


@pytest.mark.parametrize("suffix", [".npz", ".jsonl"])
def test_anchor_outputs_and_readout_round_trip(tmp_path, suffix):
    chosen, rejected = random_outputs(5, 3, seed=3)
    anchor = np.random.default_rng(4).normal(size=(5, 3))
    meta = metadata(n=3, readout="sorted", objective="mixture")
    scores = load_scores(save_scores(tmp_path / f"s{suffix}", chosen, rejected, meta, anchor=anchor))
    np.testing.assert_array_equal(scores.anchor, anchor.astype(np.float32))
    assert scores.readout == "sorted" and scores.label == "mixture N=3"
    with pytest.raises(MinqrError, match=r"'anchor' \(2, 3\) and 'chosen' \(5, 3\) differ in shape"):
        save_scores(tmp_path / f"t{suffix}", chosen, rejected, meta, anchor=anchor[:2])
    with pytest.raises(MinqrError, match="readout='median'; it must be one of raw, sorted"):
        save_scores(tmp_path / f"u{suffix}", chosen, rejected, metadata(n=3, readout="median"))
    plain = load_scores(save_scores(tmp_path / f"v{suffix}", chosen, rejected, metadata(n=3)))
    assert plain.anchor is None and plain.readout == "raw"
    with pytest.raises(MinqrError, match="no anchor outputs to align on"):
        plain.quantiles("chosen", anchored=True)
    # without an anchor, N > 1 raw quantiles are read out only when asked for by name
    with pytest.raises(MinqrError, match="no reference to read the chosen quantiles relative to.*--anchor-reply"):
        plain.quantiles("chosen")
    np.testing.assert_array_equal(plain.quantiles("chosen", anchored=False), chosen.astype(np.float32))
    # with one, the default reads kind by kind relative to it, for the readout "sorted"
    want = np.sort(chosen.astype(np.float32).astype(np.float64) - anchor.astype(np.float32), axis=1)
    np.testing.assert_allclose(scores.quantiles("chosen"), want, atol=1e-12)
    # independent's outputs are draws, not kinds: the anchor's mean is subtracted, as the statistics do
    draws = load_scores(save_scores(tmp_path / f"d{suffix}", chosen, rejected,
                                    metadata(n=3, readout="sorted", objective="independent"), anchor=anchor))
    reference = anchor.astype(np.float32).astype(np.float64).mean(axis=1, keepdims=True)
    want = np.sort(chosen.astype(np.float32).astype(np.float64), axis=1) - reference
    np.testing.assert_allclose(draws.quantiles("chosen"), want, atol=1e-12)
    relative = relative_outputs(torch.tensor(chosen.astype(np.float32), dtype=torch.float64),
                                reference=torch.tensor(anchor.astype(np.float32), dtype=torch.float64),
                                objective="independent")
    np.testing.assert_allclose(draws.quantiles("chosen"), relative.numpy(), atol=1e-12)
    scalar = load_scores(save_scores(tmp_path / f"w{suffix}", chosen[:, :1], rejected[:, :1],
                                     metadata(n=1) | {"head": "scalar", "taus": None}))
    np.testing.assert_array_equal(scalar.quantiles("chosen"), chosen[:, :1].astype(np.float32))  # its reward


def test_npz_needs_no_pickle_and_overwrites(tmp_path):
    path = tmp_path / "s.npz"
    save_scores(path, *random_outputs(3, 2, seed=1), metadata(n=2))
    save_scores(path, *random_outputs(4, 2, seed=2), metadata(n=2, label="QR"))
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["chosen", "metadata", "rejected"]
        assert json.loads(str(archive["metadata"]))["label"] == "QR"
    assert load_scores(path).num_pairs == 4 and load_scores(path).label == "QR"


def test_truth_path_is_relative_to_the_scores_file(tmp_path):
    path = save_scores(tmp_path / "run" / "s.npz", *random_outputs(2, 2), metadata(n=2, truth="../task/truth.npz"))
    assert load_scores(path).truth_path == tmp_path / "run" / "../task/truth.npz"
    assert Scores(*random_outputs(2, 2), {**load_scores(path).metadata}).truth_path.as_posix() == "../task/truth.npz"


def test_missing_file(tmp_path):
    with pytest.raises(MinqrError, match="does not exist; scores files are written by minqr score"):
        load_scores(tmp_path / "nope.npz")


def test_name_must_say_the_layout(tmp_path):
    with pytest.raises(MinqrError, match=r"\.npz or \.jsonl"):
        save_scores(tmp_path / "s.csv", *random_outputs(2, 2), metadata(n=2))


def test_foreign_npz_files(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(MinqrError, match="not a minqr scores file.*weights.*no 'metadata'"):
        load_scores(other)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"definitely not a zip archive")
    with pytest.raises(MinqrError, match="is not a .npz archive .* so not a minqr scores file"):
        load_scores(garbage)
    plain_array = tmp_path / "array.npz"
    with open(plain_array, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(MinqrError, match="not a minqr scores file"):
        load_scores(plain_array)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, chosen=np.zeros((2, 1)), rejected=np.zeros((2, 1)), metadata=np.array({"a": 1}, dtype=object))
    with pytest.raises(MinqrError, match="not a minqr scores file"):
        load_scores(pickled)


def test_other_format_or_version(tmp_path):
    chosen, rejected = random_outputs(3, 2)
    not_json = tmp_path / "a.npz"
    np.savez(not_json, chosen=chosen, rejected=rejected, metadata=np.array("{oops"))
    with pytest.raises(MinqrError, match="not a minqr scores file"):
        load_scores(not_json)
    other_tool = tmp_path / "b.npz"
    write_raw_npz(other_tool, chosen, rejected, {"format": "rewardbench/2"})
    with pytest.raises(MinqrError, match="not a minqr scores file"):
        load_scores(other_tool)
    newer = tmp_path / "c.npz"
    write_raw_npz(newer, chosen, rejected, {**metadata(n=2), "format": "minqr-scores/2", "num_quantiles": 2,
                                            "minqr_version": "9"})
    with pytest.raises(MinqrError, match="minqr-scores/2.*reads 'minqr-scores/1'"):
        load_scores(newer)


@pytest.mark.parametrize("make, message", [
    (lambda c, r: (c, r[:, :1]), r"differ in shape"),
    (lambda c, r: (c[:-1], r), r"differ in shape"),
    (lambda c, r: (c.ravel(), r.ravel()), r"must be 2-D"),
    (lambda c, r: (c[:0], r[:0]), r"no scores"),
    (lambda c, r: (np.where(np.arange(3)[:, None] == 1, np.nan, c), r), r"'chosen' holds NaN or inf in 1 pairs \(first: pair 1\)"),
    (lambda c, r: (c, np.full_like(r, np.inf)), r"'rejected' holds NaN or inf in 3 pairs"),
    (lambda c, r: (c.astype(str), r), r"numeric numpy array"),
])
def test_bad_arrays(tmp_path, make, message):
    chosen, rejected = make(*random_outputs(3, 2))
    with pytest.raises(MinqrError, match=message):
        save_scores(tmp_path / "s.npz", chosen, rejected, metadata(n=2))
    meta = {**metadata(n=2), "format": FORMAT, "num_quantiles": 2, "minqr_version": __version__}
    write_raw_npz(tmp_path / "raw.npz", chosen, rejected, meta)
    with pytest.raises(MinqrError, match=message):
        load_scores(tmp_path / "raw.npz")


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("workload"), r"misses workload"),
    (lambda m: m.pop("model"), r"misses model"),
    (lambda m: m.update(head="distributional"), r"head='distributional'"),
    (lambda m: m.update(taus=[0.25, 0.75]), r"taus must list the N=3"),
    (lambda m: m.update(taus=[0.5, 0.2, 0.9]), r"taus must list the N=3 increasing"),
    (lambda m: m.update(taus=None), r"taus must list"),
    (lambda m: m.update(workload=""), r"workload must be a non-empty string"),
    (lambda m: m.update(options=[1]), r"options must be a dict"),
    (lambda m: m.update(num_quantiles=5), r"num_quantiles=5 but the arrays hold N=3"),
    (lambda m: m.update(format="minqr-scores/0"), r"save_scores writes minqr-scores/1"),
    (lambda m: m.update(options={"max_length": np.int64(64)}), r"only JSON values"),
    (lambda m: m.update(objective="foo"), r"metadata objective='foo'; it must be one of bradley_terry, mixture"),
    (lambda m: m.update(objective=["mixture"]), r"metadata objective=\['mixture'\]; it must be one of"),
    (lambda m: m.update(truth=5), r"metadata truth must be a non-empty string, got 5"),
    (lambda m: m.update(label=7), r"metadata label must be a non-empty string, got 7"),
])
def test_bad_metadata(tmp_path, change, message):
    meta = metadata(n=3)
    change(meta)
    with pytest.raises(MinqrError, match=message):
        save_scores(tmp_path / "s.npz", *random_outputs(2, 3), meta)


def test_scalar_head_metadata(tmp_path):
    with pytest.raises(MinqrError, match="scalar head has one output.*N=3"):
        save_scores(tmp_path / "s.npz", *random_outputs(2, 3), metadata("scalar", 3))
    with pytest.raises(MinqrError, match="taus=.*scalar head"):
        save_scores(tmp_path / "s.npz", *random_outputs(2, 1), metadata("scalar", 1, taus=[0.5]))


def test_bad_jsonl(tmp_path):
    path = save_scores(tmp_path / "s.jsonl", *random_outputs(3, 2), metadata(n=2))
    lines = path.read_text().splitlines()
    cases = {
        "torn line": (lines[:2] + ['{"chosen": [1.0, 2.0], "rejec'], r"s\.jsonl:3: not JSON"),
        "a missing side": (lines[:2] + ['{"chosen": [1.0, 2.0]}'], r"s\.jsonl:3: 'rejected' must be a list"),
        "uneven widths": (lines[:2] + ['{"chosen": [1.0], "rejected": [1.0]}'], r"different numbers of outputs"),
        "no pairs": (lines[:1], r"no pairs after the metadata line"),
        "deep nesting": (lines[:2] + ['{"chosen": ' + "[" * 100_000], r"s\.jsonl:3: not JSON \(nested deeper than 100"),
        "deep metadata": (["[" * 100_000] + lines[1:], r"s\.jsonl:1: not a minqr scores file"),
        "no metadata": (lines[1:], r"s\.jsonl:1: not a minqr scores file"),
        "nothing": ([], r"empty, not a minqr scores file"),
        "a boolean output": (lines[:2] + ['{"chosen": [true, 2.0], "rejected": [1.0, 2.0]}'],
                             r"s\.jsonl:3: 'chosen' must be a list of finite numbers"),
        "NaN": (lines[:2] + ['{"chosen": [NaN, 2.0], "rejected": [1.0, 2.0]}'],
                r"s\.jsonl:3: 'chosen' must be a list of finite numbers"),
        "a number too large for a float": (lines[:2] + ['{"chosen": [1' + "0" * 400 + ', 2.0], "rejected": [1.0, 2.0]}'],
                                           r"s\.jsonl:3: 'chosen' must be a list of finite numbers"),
        "a personal number too large": (lines[:1] + [lines[1][:-1] + ', "personal_probability": 1' + "0" * 400 + "}"],
                                        r"s\.jsonl:2: 'personal_probability' must be a number or null"),
        "not an object": (lines[:2] + ['[1, 2]'], r"s\.jsonl:3: a pair's line is a JSON object"),
        "an anchor from line 3 on": (lines[:2] + ['{"chosen": [1.0, 2.0], "rejected": [1.0, 2.0], "anchor": [0, 0]}'],
                                     r"s\.jsonl:3: this pair has an 'anchor' but the first pair \(line 2\) has none"),
        "a personal array from line 3 on": (lines[:2] + ['{"chosen": [1.0, 2.0], "rejected": [1.0, 2.0], '
                                                         '"personal_probability": 0.5}'],
                                            r"s\.jsonl:3: this pair has 'personal_probability' but the first pair"),
    }
    for name, (content, message) in cases.items():
        path.write_text("\n".join(content) + "\n")
        with pytest.raises(MinqrError, match=message):
            load_scores(path)


@pytest.mark.parametrize("normalized", [{"mean": 1}, {"mean": "abc", "std": 1}, {"mean": 0, "std": 0},
                                        {"mean": 0, "std": -2}, {"mean": 0, "std": float("nan")}, [0, 1], "x"])
def test_a_bad_normalization_is_refused_by_name(tmp_path, normalized):
    """`normalized` is what score --normalize divided by; a damaged one would rescale every output."""
    path = save_scores(tmp_path / "s.jsonl", *random_outputs(2, 3), {**metadata(n=3), "normalized": normalized})
    with pytest.raises(MinqrError, match=r"s\.jsonl: metadata normalized must be \{\"mean\": number, \"std\": number > 0\}"):
        load_scores(path)
