"""tools/analyze.py end to end: a report whose files are valid and whose numbers are the library's,
and a clear message with a non-zero exit for every kind of bad input."""
import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import binomtest, norm

from factories import load_tool
from minqr.errors import MinqrError
from minqr.study import analysis, figures
from minqr.study.bootstrap import resample_indices
from minqr.study.divergences import histogram_kl
from minqr.study.report import analyze
from minqr.study.scores_file import load_scores, save_scores
from minqr.synthetic.folder import make_synthetic_task
from minqr.synthetic.truth import load_truth

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESAMPLES = 20


def metadata(head, n, workload, **extra):
    taus = ((2 * np.arange(n) + 1) / (2 * n)).tolist() if head == "quantile" else None
    return {"model": f"runs/{head}", "head": head, "data": "task/test.jsonl", "split": "test",
            "workload": workload, "taus": taus, **extra}


@pytest.fixture
def study(tmp_path):
    """A synthetic study: truth for 150 pairs, a quantile model that knows it (in its own units, with
    noise) and a scalar model, on one workload; plus a second workload without truth."""
    rng = np.random.default_rng(0)
    num_pairs, n = 150, 6
    taus = (2 * np.arange(n) + 1) / (2 * n)
    centre = rng.normal(size=(2, num_pairs, 1)) + np.array([1.0, 0.0])[:, None, None]
    width = rng.uniform(0.3, 2.0, size=(2, num_pairs, 1))
    truth = centre + width * rng.normal(size=(2, num_pairs, 64))
    np.savez(tmp_path / "test_truth.npz", chosen_samples=truth[0], rejected_samples=truth[1])
    quantiles = 0.5 * np.quantile(truth, taus, axis=2).transpose(1, 2, 0) + 3 + rng.normal(0, 0.1, (2, num_pairs, 1))
    scalar = 2 * centre + rng.normal(0, 0.5, size=(2, num_pairs, 1))
    files = [
        save_scores(tmp_path / "scalar.jsonl", *scalar, metadata("scalar", 1, "synthetic test", truth="test_truth.npz")),
        save_scores(tmp_path / "quantile.npz", *quantiles, metadata("quantile", n, "synthetic test", truth="test_truth.npz")),
        save_scores(tmp_path / "other.npz", *(quantiles[:, :40] * 3), metadata("quantile", n, "other data")),
    ]
    return tmp_path, files


def run(args):
    return CliRunner().invoke(load_tool("analyze"), [str(a) for a in args])


def test_report_files_and_numbers(study):
    folder, files = study
    out = folder / "report"
    result = run([*files, "--out", out, "--bootstrap", RESAMPLES, "--bins", 30, "--seed", 4])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "report.md")

    summaries = [analysis.summarize(load_scores(f), bins=30, n_resamples=RESAMPLES, seed=4) for f in files]
    table = json.loads((out / "table1.json").read_text())
    assert table["workloads"] == ["synthetic test", "other data"]
    assert table["models"] == ["scalar", "quantile N=6"]
    for s in summaries:
        cell = table["cells"][s["workload"]][s["label"]]
        assert cell == {k: s["histogram_kl"][k] for k in ("value", "corrected", "ci_low", "ci_high")}
    assert "scalar" not in table["cells"]["other data"]
    # the quantile model against the scalar one (first column) on the same pairs; "other data" has one model
    difference = analysis.paired_kl_difference(load_scores(files[1]), load_scores(files[0]), bins=30,
                                               n_resamples=RESAMPLES, seed=4)
    assert table["differences"] == [{"workload": "synthetic test", "model": "quantile N=6", "reference": "scalar",
                                     **difference}]
    assert json.loads((out / "summaries.json").read_text()) == json.loads(json.dumps(summaries))

    table_md = (out / "table1.md").read_text()
    kl = summaries[1]["histogram_kl"]
    assert f"| synthetic test | {summaries[0]['histogram_kl']['value']:.3f} → " in table_md
    assert f"{kl['value']:.3f} → {kl['corrected']:.3f} [{kl['ci_low']:.3f}, {kl['ci_high']:.3f}]" in table_md
    assert "| other data | – |" in table_md
    assert f"| synthetic test | quantile N=6 − scalar | {difference['value']:.3f} → {difference['corrected']:.3f} [" \
        in table_md
    measures = (out / "measures.md").read_text()
    accuracy = summaries[1]["accuracy"]
    assert f"{accuracy['value']:.3f} [{accuracy['ci_low']:.3f}, {accuracy['ci_high']:.3f}]" in measures
    assert f"{summaries[1]['coverage']['mean_abs_error']:.3f}" in measures
    assert summaries[1]["coverage"]["mean_abs_error"] < 0.05  # the quantile model knows the truth
    assert summaries[2]["coverage"] is None

    report = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["fig2_histograms_1_synthetic-test.png", "fig2_histograms_2_other-data.png",
                           "fig3_quantiles_1_synthetic-test.png", "fig3_quantiles_2_other-data.png",
                           "kl_vs_bins.png", "reliability.png", "accuracy_by_quantile.png", "coverage.png"])
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0.01  # something was drawn
        assert f"![{name}]({name})" in report
    assert table_md.strip() in report
    assert [p.name for p in folder.glob(".*")] == []  # no temporary folder left beside it

    # a second run replaces the report as a whole with --overwrite only; a folder that holds
    # something else is refused, with --overwrite too
    refused = run([files[1], "--out", out, "--bootstrap", 0, "--no-truth"])
    assert refused.exit_code == 1 and f"--out {out} exists and holds " in refused.output
    assert (out / "coverage.png").exists()
    assert run([files[1], "--out", out, "--bootstrap", 0, "--no-truth", "--overwrite"]).exit_code == 0
    assert not (out / "coverage.png").exists() and not (out / "fig2_histograms_2_other-data.png").exists()
    result = run([files[1], "--out", folder, "--bootstrap", 0, "--overwrite"])
    assert result.exit_code == 1 and f"--out {folder} is not a folder that minqr wrote as a whole" in result.output
    assert (folder / "quantile.npz").exists()
    # nor is a report the user has added to
    (out / "notes.txt").write_text("mine")
    result = run([files[1], "--out", out, "--bootstrap", 0, "--no-truth", "--overwrite"])
    assert result.exit_code == 1 and f"--out {out} holds files added since minqr wrote it (notes.txt)" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    # nor a folder that minqr made as something else: a synthetic task stays a task
    task = folder / "task"
    make_synthetic_task(task, num_train=20, num_test=10)
    held = sorted(p.name for p in task.iterdir())
    result = run([files[1], "--out", task, "--bootstrap", 0, "--no-truth", "--overwrite"])
    assert result.exit_code == 1 and result.output == (
        f"Error: --out {task} is a synthetic task that minqr wrote, not an analysis report: --overwrite replaces "
        "only an analysis report, so that one kind of output never replaces another; choose another path\n")
    assert sorted(p.name for p in task.iterdir()) == held


def test_view_and_bootstrap_options_reach_the_measures(study):
    folder, files = study
    out = folder / "report_q0"
    result = run([files[1], "--out", out, "--view", "q0", "--bootstrap", 10, "--confidence", 0.8, "--eps", 0.5])
    assert result.exit_code == 0, result.output
    expected = analysis.summarize(load_scores(files[1]), view="q0", eps=0.5, n_resamples=10, confidence=0.8)
    assert json.loads((out / "summaries.json").read_text()) == json.loads(json.dumps([expected]))
    assert "View `q0`" in (out / "report.md").read_text()


def test_truth_option_overrides_the_metadata(study):
    folder, files = study
    np.savez(folder / "shifted_truth.npz", **{f"{side}_samples": s + 1.0 for side, s in
                                              zip(("chosen", "rejected"), load_truth(folder / "test_truth.npz", 150))})
    summary_path = analyze([files[1]], folder / "r", n_resamples=0, truth=folder / "shifted_truth.npz").parent
    coverage = json.loads((summary_path / "summaries.json").read_text())[0]["coverage"]
    assert coverage["truth"] == str(folder / "shifted_truth.npz")
    assert coverage["intercept"] == pytest.approx(
        analysis.summarize(load_scores(files[1]), n_resamples=0)["coverage"]["intercept"] - coverage["slope"], rel=1e-6)


def scalar_scores(folder, label, chosen, rejected, split="test"):
    """A scalar model's scores file, rewards as float32 (as score writes them)."""
    chosen, rejected = (side[:, None].astype(np.float32) for side in (chosen, rejected))
    return save_scores(folder / f"{label}.npz", chosen, rejected, metadata("scalar", 1, "w", label=label, split=split))


def expected_comparison(path_model, path_reference, seed):
    """What the summary compares, computed here the long way from two scalar scores files: each
    model's accuracy and bias-corrected histogram KL (50 bins), and the paired differences model −
    reference with 95% intervals: per-pair credits with a normal interval; for the KL the pairs
    resampled as analyze resamples them (resample_indices with its seed), the basic interval."""
    rewards = [[side.astype(np.float64)[:, 0] for side in (s.chosen, s.rejected)]
               for s in map(load_scores, (path_model, path_reference))]
    credit = [(c > r) + 0.5 * (c == r) for c, r in rewards]  # [P] each
    per_pair = credit[0] - credit[1]
    half = norm.ppf(0.975) * per_pair.std(ddof=1) / math.sqrt(len(per_pair))
    indices = resample_indices(len(per_pair), RESAMPLES, seed)
    kl = np.array([[histogram_kl(c[i], r[i], 50) for i in [slice(None), *indices]] for c, r in rewards])
    difference = kl[0] - kl[1]  # [1 + B]: the plug-in value, then every resample
    difference_corrected = 2 * difference[0] - difference[1:].mean()
    high, low = 2 * difference[0] - np.percentile(difference[1:], [2.5, 97.5])
    return {"accuracy": [c.mean() for c in credit], "accuracy_difference": per_pair.mean(),
            "accuracy_interval": (per_pair.mean() - half, per_pair.mean() + half),
            "kl": np.maximum(0, 2 * kl[:, 0] - kl[:, 1:].mean(axis=1)), "kl_difference": difference_corrected,
            "kl_interval": (min(low, difference_corrected), max(high, difference_corrected))}


def test_summary_says_which_model_separates_more_and_whether_its_interval_excludes_0(tmp_path):
    rng = np.random.default_rng(7)
    num_pairs = 300
    # one model ranks far better than the other; two others are equally good, with their own noise
    noise = rng.normal(size=(6, num_pairs))
    sharp = scalar_scores(tmp_path, "sharp", 2 + noise[0], noise[1])
    blunt = scalar_scores(tmp_path, "blunt", 0.2 + noise[2], noise[3])
    signal = rng.normal(size=num_pairs)
    twin_a = scalar_scores(tmp_path, "twin a", signal + 0.5 * noise[4], 0.5 * noise[5])
    twin_b = scalar_scores(tmp_path, "twin b", signal + 0.5 * noise[5], 0.5 * noise[4])

    for model, reference, clear in ((sharp, blunt, True), (twin_a, twin_b, False)):
        out = tmp_path / f"report-{clear}"
        assert run([reference, model, "--out", out, "--bootstrap", RESAMPLES, "--seed", 3]).exit_code == 0
        numbers = expected_comparison(model, reference, seed=3)
        intervals = numbers["accuracy_interval"], numbers["kl_interval"]
        model_name, reference_name = load_scores(model).label, load_scores(reference).label
        if clear:  # what the case is made to be, checked before the report is read
            assert numbers["accuracy_difference"] > 0 and numbers["kl_difference"] > 0
            assert all(low > 0 for low, _ in intervals)
            verdict = "and the paired difference {change} is larger than its uncertainty (the interval excludes 0)"
        else:
            assert numbers["accuracy_difference"] > 0 and numbers["kl_difference"] > 0
            assert all(low < 0 < high for low, high in intervals)
            verdict = ("but the paired difference {change} is not larger than its uncertainty (the interval holds "
                       "0): these pairs cannot tell the two apart")
        sentences = []
        for measure, key in (("pair accuracy", "accuracy"), ("histogram KL (bias-corrected)", "kl")):
            low, high = numbers[f"{key}_interval"]
            change = (f"{model_name} − {reference_name} = {numbers[f'{key}_difference']:.3f} "
                      f"[{low:.3f}, {high:.3f}]")
            values = f"({numbers[key][0]:.3f} vs {numbers[key][1]:.3f})"
            sentences.append(f"By {measure}, {model_name} separates chosen from rejected more than {reference_name} "
                             f"{values}, " + verdict.format(change=change) + ".")
        text = (out / "report.md").read_text()
        assert text.startswith("# minqr analysis report\n\n## Summary\n\n")  # before everything else
        assert f"\n- w, {model_name} against {reference_name} (300 pairs): {' '.join(sentences)}\n" in text


def test_summary_of_a_model_compared_with_none(tmp_path):
    """Alone, or on other pairs than the first model: its accuracy with its interval, and the Bayes-optimal
    model's where the truth is known."""
    rng = np.random.default_rng(8)
    num_pairs = 200
    mean = rng.normal(size=(2, num_pairs))
    probability = 1 / (1 + np.exp(mean[1] - mean[0]))
    np.savez(tmp_path / "truth.npz", chosen_samples=mean[0][:, None] + rng.normal(size=(num_pairs, 16)),
             rejected_samples=mean[1][:, None] + rng.normal(size=(num_pairs, 16)), preference_probability=probability)
    chosen, rejected = mean + rng.normal(0, 0.5, size=(2, num_pairs))
    solo = scalar_scores(tmp_path, "solo", chosen, rejected)
    other = scalar_scores(tmp_path, "other", rejected, chosen, split="train")
    out = tmp_path / "report"
    assert run([solo, other, "--out", out, "--bootstrap", 0, "--truth", tmp_path / "truth.npz"]).exit_code == 0

    right = int(np.sum(chosen.astype(np.float32) > rejected.astype(np.float32)))
    interval = binomtest(right, num_pairs).proportion_ci(0.95, method="wilson")
    bayes = np.mean(probability > 0.5)
    wrong = num_pairs - right
    other_interval = binomtest(wrong, num_pairs).proportion_ci(0.95, method="wilson")
    assert (out / "report.md").read_text().startswith(
        "# minqr analysis report\n\n## Summary\n\n"
        f"- w, solo (200 pairs): pair accuracy {right / num_pairs:.3f} [{interval.low:.3f}, {interval.high:.3f}] "
        f"(95% Wilson interval), against {bayes:.3f} for the Bayes-optimal model.\n"
        f"- w, other (200 pairs): pair accuracy {wrong / num_pairs:.3f} [{other_interval.low:.3f}, "
        f"{other_interval.high:.3f}] (95% Wilson interval), against {bayes:.3f} for the Bayes-optimal model; not "
        "compared with solo, which scored other pairs.\n\n")


def test_figure_titles_name_the_workloads_and_models(study, monkeypatch):
    folder, files = study
    titles = {}
    save = figures._save

    def recording_save(fig, path, *args):
        save(fig, path, *args)
        titles[path.name] = fig.get_suptitle()

    monkeypatch.setattr(figures, "_save", recording_save)
    assert run([*files, "--out", folder / "report", "--bootstrap", 0]).exit_code == 0
    both, quantile = "synthetic test: scalar, quantile N=6", "other data: quantile N=6"
    expected = {"fig2_histograms_1_synthetic-test.png": [both], "fig2_histograms_2_other-data.png": [quantile],
                "fig3_quantiles_1_synthetic-test.png": ["synthetic test: quantile N=6"],
                "fig3_quantiles_2_other-data.png": [quantile], "kl_vs_bins.png": [both, quantile],
                "reliability.png": [both, quantile], "accuracy_by_quantile.png": [both, quantile],
                "coverage.png": [both]}  # only the first workload has a truth
    assert {name: title.splitlines()[1:] for name, title in titles.items()} == expected
    assert sorted(titles) == sorted(p.name for p in (folder / "report").glob("*.png"))


def test_a_long_list_of_models_wraps_between_labels():
    labels = [f"mixture seed {seed}" for seed in range(12)]
    title = figures._figure_title("Reliability", {"demo test": labels}, width=60)
    lines = title.splitlines()
    assert lines[0] == "Reliability" and len(lines) > 3 and all(len(line) <= 60 for line in lines)
    assert " ".join(lines[1:]) == "demo test: " + ", ".join(labels)  # every label whole, in order


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d, f: [d / "missing.npz"], "does not exist"),
    (lambda d, f: [write_npz(d / "weights.npz", w=np.zeros(2))], "not a minqr scores file"),
    (lambda d, f: [write_npz(d / "bad.npz", chosen=np.zeros((3, 2)), rejected=np.zeros((3, 1)),
                             metadata=np.array(json.dumps({**metadata("quantile", 2, "w"), "format": "minqr-scores/1",
                                                           "num_quantiles": 2, "minqr_version": "0"})))],
     "differ in shape"),
    (lambda d, f: [f[1], f[1]], "same table cell"),
    # once "Aborted!" (numpy's EOFError) and numpy's advice to load with allow_pickle
    (lambda d, f: [write_bytes(d / "empty.npz", b"")], "empty.npz is empty (0 bytes), not a minqr scores file"),
    (lambda d, f: [write_bytes(d / "pickle.npz", pickle.dumps({"chosen": 1}))], "pickle.npz is not a .npz archive"),
    (lambda d, f: [write_npz(d / "objects.npz", chosen=np.zeros((3, 2)), metadata=np.array({"a": 1}, dtype=object))],
     "'metadata' is malformed or holds Python objects, which only pickle could read (minqr never unpickles"),
])
def test_bad_input_fails_clearly(study, make, message):
    folder, files = study
    result = run([*make(folder, files), "--out", folder / "out"])
    assert result.exit_code == 1
    assert message in result.output and "Error:" in result.output
    assert "Traceback" not in result.output and "Aborted!" not in result.output and "allow_pickle" not in result.output


def write_bytes(path, content: bytes):
    path.write_bytes(content)
    return path


def test_quantile_view_of_a_scalar_model(study):
    folder, files = study
    result = run([files[0], files[1], "--out", folder / "out", "--view", "q5"])
    assert result.exit_code == 1
    assert "view 'q5' needs a quantile model" in result.output and "scalar.jsonl has N=1" in result.output
    result = run([files[1], "--out", folder / "out", "--view", "q6"])
    assert result.exit_code == 1 and "out of range" in result.output


def test_cli_as_a_script(tmp_path):
    """The command a user types: a clear line on stderr and exit status 1, no traceback."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "analyze.py"), str(tmp_path / "none.npz"),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Error: scores file" in done.stderr and "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_truth_problems(study):
    folder, files = study
    (folder / "test_truth.npz").rename(folder / "moved_truth.npz")
    result = run([files[1], "--out", folder / "r"])
    assert result.exit_code == 1 and "names the truth file" in result.output and "--no-truth" in result.output
    assert analysis.summarize(load_scores(files[1]), n_resamples=0, truth=False)["coverage"] is None
    result = run([files[1], "--out", folder / "r", "--no-truth", "--truth", folder / "moved_truth.npz"])
    assert result.exit_code == 2 and "contradict" in result.output

    # a model whose means fall as the true means rise: the report says why it has no coverage
    flipped = load_scores(files[1])
    upside_down = save_scores(folder / "flipped.npz", -flipped.chosen[:, ::-1], -flipped.rejected[:, ::-1],
                              {**flipped.metadata, "truth": "moved_truth.npz"})
    result = run([upside_down, "--out", folder / "r", "--bootstrap", 0])
    assert result.exit_code == 0, result.output
    assert "Coverage not computed for" in (folder / "r" / "report.md").read_text()
    assert "mean rewards fall as the true means rise" in (folder / "r" / "report.md").read_text()
    assert not (folder / "r" / "coverage.png").exists()


def test_a_collapsed_model_is_reported_beside_the_others(study):
    """A model that gives every response the same reward: measured where it can be, n/a with the
    reason where not, and the other models all there."""
    folder, files = study
    collapsed = save_scores(folder / "collapsed.npz", np.zeros((150, 6)), np.zeros((150, 6)),
                            {**metadata("quantile", 6, "synthetic test"), "label": "collapsed"})
    out = folder / "report"
    result = run([files[0], files[1], collapsed, "--out", out, "--bootstrap", RESAMPLES])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "table1.json").read_text())
    assert table["models"] == ["scalar", "quantile N=6", "collapsed"]
    assert table["cells"]["synthetic test"]["collapsed"] == {"value": 0.0, "corrected": 0.0, "ci_low": 0.0,
                                                              "ci_high": 0.0}
    measures = (out / "measures.md").read_text()
    row = next(line for line in measures.splitlines() if line.startswith("| synthetic test | collapsed |"))
    assert row.split(" | ")[5] == "n/a" and row.split(" | ")[12] == "n/a"  # KDE KL, spread AUROC
    reasons = ["- collapsed, synthetic test: KDE KL not measured: the 150 chosen rewards all equal 0, and a density "
               "estimate needs rewards that differ (a model that gives every response the same reward, or too few "
               "pairs)",
               "- collapsed, synthetic test: spread AUROC not measured: the mean reward ranks 0 pairs wrongly and 0 "
               "rightly (ties left out), and the AUROC compares the spreads of both kinds"]
    assert measures.endswith("\n".join(reasons) + "\n")
    assert "\n".join(reasons) in (out / "report.md").read_text()


def summary_row(workload, objective, accuracy, coverage=None, bayes=None):
    """The parts of an analysis summary that the objectives table reads."""
    return {"workload": workload, "objective": objective, "head": "quantile", "num_quantiles": 10,
            "accuracy": {"value": accuracy}, "nll": 0.3, "bayes": bayes, "calibration": {"objective": {"ece": 0.02}},
            "coverage": coverage, "spread_auroc": {"value": 0.6}, "histogram_kl": {"value": 1.5}}


def test_objectives_table_averages_the_seeds_of_each_row(tmp_path):
    bayes = {"accuracy": 0.9, "nll": 0.25}
    rows = [summary_row("demo", "mixture", a, {"mean_abs_error": e, "spread_spearman": r}, bayes)
            for a, e, r in ((0.88, 0.02, 0.9), (0.86, 0.04, 0.8), (0.87, 0.03, 0.85))]
    rows.append(summary_row("hh", "mixture", 0.6))
    for k, row in enumerate(rows):
        row["source"] = f"scores-{k}.npz"  # each row a scores file of its own, as analyze writes them
    for index, rows_of_file in enumerate((rows[:2], rows[2:])):
        (tmp_path / f"s{index}.json").write_text(json.dumps(rows_of_file))
    out = tmp_path / "table.md"
    result = CliRunner().invoke(load_tool("objectives_table"), [str(tmp_path / "s0.json"), str(tmp_path / "s1.json"),
                                                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[2] == ("| demo | mixture | 10 | 3 | -0.030 [-0.040, -0.020] | 0.870 [0.860, 0.880] | "
                        "0.050 [0.050, 0.050] | 0.030 [0.020, 0.040] | 0.850 [0.800, 0.900] | 0.020 [0.020, 0.020] | "
                        "0.600 [0.600, 0.600] | 1.500 [1.500, 1.500] |")
    assert lines[3] == "| hh | mixture | 10 | 1 | – | 0.600 | – | – | – | 0.020 | 0.600 | 1.500 |"
    again = CliRunner().invoke(load_tool("objectives_table"), [str(tmp_path / "s0.json"), "--out", str(out)])
    assert again.exit_code == 1 and again.output == (f"Error: out {out} exists: pass --overwrite to replace it, or "
                                                     "choose another path\n")
    assert lines == out.read_text().splitlines()  # the table stays as it was
    for twice in ([tmp_path / "s0.json"] * 2, [tmp_path / "s0.json", tmp_path / "again.json"]):
        (tmp_path / "again.json").write_text((tmp_path / "s0.json").read_text())
        doubled = CliRunner().invoke(load_tool("objectives_table"), [*map(str, twice), "--out", str(tmp_path / "d.md")])
        assert doubled.exit_code == 1 and "is summarised twice (in " in doubled.output, doubled.output
        assert "each would count as a seed of its own; give each summary once" in doubled.output
    summary = tmp_path / "s0.json"
    held = summary.read_bytes()
    into_input = CliRunner().invoke(load_tool("objectives_table"), [str(summary), "--out", str(summary), "--overwrite"])
    assert into_input.exit_code == 1 and into_input.output == (
        f"Error: out {summary} is also a summaries file, which this job reads: writing there would replace it; "
        "choose another path\n")
    assert summary.read_bytes() == held
    out = tmp_path / "other.md"
    (tmp_path / "bad.json").write_text("not json")
    bad = CliRunner().invoke(load_tool("objectives_table"), [str(tmp_path / "bad.json"), "--out", str(out)])
    assert bad.exit_code == 1 and "is not a summaries.json written by minqr analyze" in bad.output
    for content, words in [({"a": 1}, "(a list of summaries, one a scores file; this holds a dict)"),
                           ([rows[0], {"head": "quantile"}], "summary 1 is not one that minqr analyze writes (it has "
                                                             "no 'workload')"),
                           ([7], "summary 0 is not one that minqr analyze writes (it is no object)"),
                           ("huge", "summary 0 is not one that minqr analyze writes (a number too large for a "
                                    "float)")]:
        text = json.dumps(content) if content != "huge" else \
            json.dumps([{**rows[0], "accuracy": {"value": "HUGE"}}]).replace('"HUGE"', "1" + "0" * 400)
        (tmp_path / "bad.json").write_text(text)
        bad = CliRunner().invoke(load_tool("objectives_table"), [str(tmp_path / "bad.json"), "--out", str(out)])
        assert bad.exit_code == 1 and words in bad.output and "Traceback" not in bad.output, bad.output


def test_the_summary_says_when_two_models_cannot_be_compared():
    """An infinite KL (--eps 0 and an empty bin) gives no sign to a difference: no winner is named."""
    from minqr.study.report import _comparison

    difference = {"model": "b", "reference": "a", "value": float("nan"), "ci_low": None, "ci_high": None}
    line = _comparison("histogram KL", difference, {"value": float("inf")}, {"value": 1.5})
    assert line == "By histogram KL, b and a cannot be compared: their paired difference is nan (see the tables)."


def test_options_of_an_analysis_called_from_python_are_checked_as_the_command_line(study):
    """`analyze --eps nan` once reported KL 0.000 and exit 0: NaN passes `eps >= 0`. The command line
    refuses it (test_cli), and so does the library."""
    folder, files = study
    for options, message in [({"eps": math.nan}, "--eps must be a finite number (got nan)"),
                             ({"confidence": 1.0}, "--confidence must be in (0, 1) (got 1.0)"),
                             ({"seed": -1}, "--seed must be in [0, 4294967295] (got -1)")]:
        with pytest.raises(MinqrError, match=re.escape(message)):
            analyze(files[:1], folder / "out", **options)


def test_a_mixture_scored_without_an_anchor_is_reported_without_its_quantiles(tmp_path):
    """HH-RLHF scores of a mixture have no anchor outputs (unless score --anchor-reply): the report is
    written, Figure 3 leaves the mixture out, and its quantile measures say why they are missing."""
    rng = np.random.default_rng(3)
    outputs = rng.normal(size=(2, 80, 4)) + np.array([5.0, -3.0, 10.0, 0.0])  # kinds with constants
    path = save_scores(tmp_path / "mixture.npz", *outputs, metadata("quantile", 4, "hh", objective="mixture",
                                                                     readout="sorted"))
    paper = save_scores(tmp_path / "paper.npz", *np.sort(outputs, axis=-1), metadata("quantile", 4, "hh",
                                                                                     objective="paper", label="paper"))
    result = run([path, paper, "--out", tmp_path / "report", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    summaries = {s["label"]: s for s in json.loads((tmp_path / "report" / "summaries.json").read_text())}
    mixture = next(s for label, s in summaries.items() if label != "paper")
    assert "no anchor outputs" in mixture["spread_auroc"]["not_measured"] and mixture["quantile_accuracy"] is None
    assert summaries["paper"]["quantile_accuracy"] is not None
    report = (tmp_path / "report" / "report.md").read_text()
    assert "a mixture scored without anchor outputs is left out" in report
