"""The analysis report: tables and figures from any number of scores files, in one folder.

    analyze(["scalar.npz", "quantile.npz"], "report/")   (what tools/analyze.py runs)

writes into the folder:

    report.md                  a summary (which model separates chosen from rejected more, per workload,
                               and whether the paired difference is larger than its interval), then
                               everything below, with one-line captions; open it first
    table1.md, table1.json     the paper's Table 1: rows workloads, columns models, cells the
                               histogram KL(chosen || rejected): plug-in -> bias-corrected [interval]
    measures.md                the other measures, a row per workload x model
    summaries.json             every number, per scores file (minqr.study.analysis.summarize's dicts)
    fig2_histograms_*.png      chosen vs rejected rewards with KDE curves, per model (paper Fig. 2)
    fig3_quantiles_*.png       the same for quantile 0 and quantile N-1 (paper Fig. 3)
    kl_vs_bins.png, reliability.png, accuracy_by_quantile.png, coverage.png (with a truth file)
    personal.md                with the truth of the synthetic task with annotator pools: personal
                               accuracy against its oracles (minqr/study/personal_accuracy.py)

Every figure's title names its workloads and the labels of the models it draws.

The folder is written as a whole (minqr.atomic.atomic_dir): a reader sees the previous report or
the new one, never a mix. An existing folder is replaced only if minqr made it and nothing was
added since (minqr.atomic.check_replaceable): an earlier report, not a folder of the user's.
In the JSON, null marks a measure that does not apply (a scalar head has no quantiles) or a
value that is not finite; a measure the scores cannot give (a model whose rewards are all equal
has no density) is n/a in the tables, with its reason under them and in report.md.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

from minqr import __version__
from minqr.atomic import atomic_dir, atomic_file, check_output_file, check_replaceable
from minqr.errors import MinqrError, MinqrUsageError
from minqr.lock import holds_output
from minqr.options import check_options, option, seed_option
from minqr.reading import loads
from minqr.study.analysis import paired_accuracy_difference, paired_kl_difference, summarize
from minqr.study.bootstrap import CONFIDENCE, DEFAULT_RESAMPLES
from minqr.study.divergences import DEFAULT_BINS, DEFAULT_EPS, VIEWS_HELP
from minqr.study.figures import draw_figures
from minqr.study.personal_accuracy import personal_markdown
from minqr.study.scores_file import Scores, load_scores
from minqr.study.tables import (COVERAGE_UNITS, MEASURE_COLUMNS, json_ready, measures_markdown, number,
                                objective_of, objectives_table, paired_differences, probe_markdown, table1,
                                table1_markdown, with_interval)

REPORT_KIND = "an analysis report"  # what its .minqr-made marker says it is (minqr/atomic.py)


@dataclass
class AnalyzeConfig:
    """The options of an analysis (`minqr analyze`, `analyze`)."""

    scores: tuple[str, ...] = option(help="scores files (.npz or .jsonl) written by score", argument=True)
    out: str = option(help="report folder: created, or, with --overwrite, replaced if it holds an earlier report")
    view: str = option("mean", f"which reward of a response the divergences compare: {VIEWS_HELP} (the N "
                       "quantiles pooled)")
    bins: int = option(DEFAULT_BINS, "equal-width bins over the pooled range for the histogram KL and JS", low=1)
    eps: float = option(DEFAULT_EPS, "added to every bin's count before normalising (keeps log 0 away)", low=0)
    n_resamples: int = option(DEFAULT_RESAMPLES, "bootstrap resamples of the pairs for the bias corrections and "
                              "intervals (0: plug-in values only)", low=0, flag="--bootstrap")
    confidence: float = option(CONFIDENCE, "confidence level of every interval", low=0, high=1, low_open=True,
                               high_open=True)
    seed: int = seed_option("seed of the bootstrap resamples")
    truth: str | None = option(None, "a synthetic task's test_truth.npz for every scores file: adds quantile "
                               "coverage [default: the truth named in each file's metadata, if any]")
    no_truth: bool = option(False, "no coverage, even where a file's metadata names a truth file")
    overwrite: bool = option(False, "replace --out if it holds an earlier report (only a folder minqr wrote, with "
                             "nothing added since)", in_file=False)

    def __post_init__(self):
        check_options(self)  # every range and choice the fields declare
        if self.truth and self.no_truth:
            raise MinqrUsageError("--truth and --no-truth contradict each other; give one")


@holds_output("out_dir")  # one job at a time writes a report folder (minqr/lock.py)
def analyze(paths, out_dir, **options) -> Path:
    """Read the scores files, measure each, write the report into `out_dir`; returns report.md's
    path. `options` are AnalyzeConfig's other fields: `truth` (a synthetic task's test_truth.npz)
    applies to every file; without it each file uses the truth its metadata names, if any, and
    `no_truth=True` measures no coverage.
    """
    options = AnalyzeConfig(scores=tuple(paths), out=out_dir, **options)
    if not paths:
        raise MinqrError("no scores files given; pass one or more .npz/.jsonl files written by tools/score.py")
    # before the measuring, which takes a while
    check_replaceable(out_dir, "--out", overwrite=options.overwrite, kind=REPORT_KIND)
    all_scores = [load_scores(path) for path in paths]
    _check_cells_unique(all_scores)
    truth = False if options.no_truth else options.truth
    summaries = [summarize(s, view=options.view, bins=options.bins, eps=options.eps, n_resamples=options.n_resamples,
                           confidence=options.confidence, seed=options.seed, truth=truth) for s in all_scores]
    return write_report(out_dir, all_scores, summaries, overwrite=options.overwrite)


@dataclass
class TableConfig:
    """The options of the objectives table (`minqr objectives-table`)."""

    summaries: tuple[str, ...] = option(help="summaries.json files written by analyze", argument=True)
    out: str = option(help="markdown file to write (a new one, or with --overwrite)")
    overwrite: bool = option(False, "replace --out if it exists", in_file=False)


def write_objectives_table(paths, out, overwrite: bool = False) -> Path:
    """Write `objectives_table` of the rows of every summaries.json in `paths` into the markdown
    file `out` (atomically; an existing one only with `overwrite`)."""
    check_output_file(out, overwrite=overwrite, what="the markdown table",
                      inputs=tuple(("a summaries file", path) for path in paths))
    rows = []
    for path in paths:
        try:
            summaries = loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MinqrError(f"{path} is not a summaries.json written by minqr analyze ({error})") from None
        if not isinstance(summaries, list):
            raise MinqrError(f"{path} is not a summaries.json written by minqr analyze (a list of summaries, one "
                             f"a scores file; this holds a {type(summaries).__name__})")
        for index, summary in enumerate(summaries):
            try:  # the row alone: what it lacks is named here, not deep in the table
                objectives_table([summary])
            except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as error:
                what = (f"it has no {error.args[0]!r}" if isinstance(error, KeyError) else
                        "it is no object" if not isinstance(summary, dict) else
                        "a number too large for a float" if isinstance(error, OverflowError) else
                        "a field holds another kind of value")
                raise MinqrError(f"{path}: summary {index} is not one that minqr analyze writes ({what}); analyze the "
                                 "scores again") from None
        rows += [(path, summary) for summary in summaries]
    # a scores file counted twice would count its seed twice, silently (analyze refuses the same)
    seen = {}
    for path, summary in rows:
        source = summary.get("source")
        if source is not None and source in seen:
            raise MinqrError(f"the scores file {source} is summarised twice (in {seen[source]} and {path}): each "
                             "would count as a seed of its own; give each summary once")
        seen[source] = path
    rows = [summary for _, summary in rows]
    with atomic_file(Path(out)) as tmp:
        tmp.write_text(objectives_table(rows) + "\n")
    return Path(out)


def _check_cells_unique(all_scores: list[Scores]) -> None:
    seen = {}
    for scores in all_scores:
        cell = (scores.workload, scores.label)
        if cell in seen:
            raise MinqrError(f"{seen[cell]} and {scores.source} fill the same table cell (workload "
                             f"{cell[0]!r}, model {cell[1]!r}); analyse them separately, or score one again with another "
                             "--label (or --workload)")
        seen[cell] = scores.source


def write_report(out_dir, all_scores: list[Scores], summaries: list[dict], overwrite: bool = False) -> Path:
    """Write tables, figures and report.md for the already summarised scores into `out_dir` (one
    that holds an earlier report only with `overwrite`)."""
    out = Path(out_dir)
    workloads = list(dict.fromkeys(s["workload"] for s in summaries))
    models = list(dict.fromkeys(s["label"] for s in summaries))
    table = table1(summaries, workloads, models)
    options = {k: summaries[0][k] for k in ("view", "bins", "eps", "n_resamples", "confidence", "seed")}
    table["differences"] = paired_differences(all_scores, summaries, workloads,
                                              lambda a, b: paired_kl_difference(a, b, **options))
    accuracy_differences = paired_differences(all_scores, summaries, workloads,
                                              lambda a, b: paired_accuracy_difference(a, b, options["confidence"]))
    with atomic_dir(out, "--out", overwrite=overwrite, kind=REPORT_KIND) as tmp:
        (tmp / "table1.json").write_text(json.dumps(json_ready(table), indent=2) + "\n")
        (tmp / "table1.md").write_text(table1_markdown(table) + "\n")
        (tmp / "measures.md").write_text(measures_markdown(summaries) + "\n")
        (tmp / "summaries.json").write_text(json.dumps(json_ready(summaries), indent=2) + "\n")
        figures = draw_figures(tmp, all_scores, summaries, workloads)
        (tmp / "report.md").write_text(_report_markdown(summaries, table, accuracy_differences, figures))
        personal = personal_markdown(summaries)
        if personal:
            (tmp / "personal.md").write_text(personal)
    return out / "report.md"


# --- report.md --------------------------------------------------------------------------------

def summary_markdown(summaries: list[dict], kl_differences: list[dict], accuracy_differences: list[dict]) -> list[str]:
    """The lines that open report.md, a bullet per comparison: on each workload, each model against the
    first on the same pairs (paired_differences), which separates chosen from rejected more by pair
    accuracy and by the paper's histogram KL, and whether the difference is larger than its interval;
    a model compared with none (alone on its workload, or on other pairs), its accuracy."""
    first = summaries[0]
    kl_measure = "histogram KL (bias-corrected)" if first["n_resamples"] else "histogram KL"
    lines = ["## Summary", ""]
    if accuracy_differences:
        lines += [f"Where models scored the same pairs, each against the first: which separates chosen from rejected "
                  f"more, by pair accuracy and by the paper's {kl_measure}, and whether the paired difference is "
                  f"larger than its {first['confidence']:.0%} interval (the interval excludes 0; for accuracy the "
                  "normal interval of the mean of the per-pair differences, for the KL the paired bootstrap of "
                  "Table 1).", ""]
    kl_differences = {(d["workload"], d["model"]): d for d in kl_differences}
    for workload in dict.fromkeys(s["workload"] for s in summaries):
        runs = {s["label"]: s for s in summaries if s["workload"] == workload}
        reference = next(iter(runs))
        compared = [d for d in accuracy_differences if d["workload"] == workload]
        for accuracy in compared:
            model = runs[accuracy["model"]]
            lines.append(f"- {workload}, {model['label']} against {reference} ({model['num_pairs']:,} pairs): "
                         + _comparison("pair accuracy", accuracy, model["accuracy"], runs[reference]["accuracy"])
                         + " " + _comparison(kl_measure, kl_differences[(workload, model["label"])],
                                             model["histogram_kl"], runs[reference]["histogram_kl"]))
        paired = {reference, *(d["model"] for d in compared)} if compared else set()
        lines += [_accuracy_line(summary, reference) for label, summary in runs.items() if label not in paired]
    return lines + [""]


def _comparison(measure: str, difference: dict, model: dict, reference: dict) -> str:
    """One sentence: which of two models separates chosen from rejected more by `measure` (the sign of
    their paired difference), their values, and whether the difference's interval excludes 0."""
    estimate = _point(difference)
    if estimate is None or not math.isfinite(estimate):  # e.g. an infinite KL (--eps 0 and an empty bin)
        return (f"By {measure}, {difference['model']} and {difference['reference']} cannot be compared: their "
                f"paired difference is {number(estimate)} (see the tables).")
    ordered = [(difference["model"], number(_point(model))), (difference["reference"], number(_point(reference)))]
    (first, first_value), (second, second_value) = ordered if estimate >= 0 else ordered[::-1]
    values = f"({first_value} vs {second_value})"
    if estimate == 0:
        lead = f"By {measure}, {first} and {second} separate chosen from rejected equally {values}"
    else:
        lead = f"By {measure}, {first} separates chosen from rejected more than {second} {values}"
    change = f"{difference['model']} − {difference['reference']} = {number(estimate)}"
    if difference["ci_low"] is None:
        return f"{lead}; the paired difference {change} has no interval to judge it by."
    change += f" [{number(difference['ci_low'])}, {number(difference['ci_high'])}]"
    if difference["ci_low"] > 0 or difference["ci_high"] < 0:
        return f"{lead}, and the paired difference {change} is larger than its uncertainty (the interval excludes 0)."
    return (f"{lead}, but the paired difference {change} is not larger than its uncertainty (the interval holds 0): "
            "these pairs cannot tell the two apart.")


def _accuracy_line(summary: dict, reference: str) -> str:
    """A summary bullet for a model compared with none: its accuracy, and the best possible one where known."""
    line = (f"- {summary['workload']}, {summary['label']} ({summary['num_pairs']:,} pairs): pair accuracy "
            f"{with_interval(summary['accuracy'])} ({summary['confidence']:.0%} Wilson interval)")
    if summary["bayes"]:
        line += f", against {summary['bayes']['accuracy']:.3f} for the Bayes-optimal model"
    if summary["label"] != reference:
        line += f"; not compared with {reference}, which scored other pairs"
    return line + "."


def _point(estimate: dict) -> float:
    """The estimate an interval is about: the bias-corrected one where there is one, else the value."""
    return estimate["value"] if estimate.get("corrected") is None else estimate["corrected"]


def _report_markdown(summaries: list[dict], table: dict, accuracy_differences: list[dict],
                     figures: list[tuple[str, str]]) -> str:
    first = summaries[0]
    intervals = (f"bias-corrected estimates with {first['confidence']:.0%} bootstrap intervals from "
                 f"{first['n_resamples']} resamples of the pairs (seed {first['seed']})" if first["n_resamples"]
                 else "no bootstrap (plug-in values only)")
    lines = [
        "# minqr analysis report", "",
        *summary_markdown(summaries, table["differences"], accuracy_differences),
        "## How it was measured", "",
        f"minqr {__version__}. View `{first['view']}`; histogram measures on {first['bins']} equal-width bins over "
        f"the pooled range, eps={first['eps']:g} added to every bin's count; {intervals}; accuracy with a Wilson "
        "interval.", "",
        "Scores files:", "",
        *[f"- `{s['source']}`: {s['label']} ({s['model']}{objective_of(s)}), {s['workload']}, {s['num_pairs']:,} pairs"
          for s in summaries],
        "", "## Table 1: histogram KL(chosen ‖ rejected), nats", "",
        table1_markdown(table), "",
        "The paper's measure: how far apart the model puts the rewards of chosen and rejected responses. A cell "
        "reads `plug-in → bias-corrected [interval]`. The plug-in value is the formula applied to these samples, "
        "the number the paper reports; it depends on the bins and on eps (see kl_vs_bins.png), and in finite "
        "samples it is biased upwards (count noise looks like separation). The bias-corrected estimate subtracts "
        "the bootstrap's estimate of that bias (plug-in − (mean of the resampled values − plug-in); "
        "`bootstrap_mean` in `summaries.json`). The interval is for the true value: the basic bootstrap interval, "
        "which subtracts the same bias, clipped to the measure's range (a KL is at least 0, a JS between 0 and "
        "ln 2). It holds the corrected estimate, not always the plug-in value: when the bias is large, no "
        "interval that covers the truth can. An interval that starts at 0 says these pairs cannot tell the "
        "separation from none. In simulations with a known truth the interval covered it at about its nominal "
        "rate with 2,000 pairs; with a few hundred the correction leaves part of the bias and covers less often "
        "(minqr/study/bootstrap.py, bootstrap_estimate). JS, W1, the KDE KL and the spread AUROC below read the same "
        "way. The paired differences compare each model with the first column on the same pairs (one resample "
        "of the pairs for both), which two overlapping intervals cannot do.", "",
        "## Other measures", "",
        measures_markdown(summaries), "",
        " ".join(measure.meaning for measure in MEASURE_COLUMNS) + " " + COVERAGE_UNITS, "",
        *[f"Coverage not computed for `{s['source']}`: {s['coverage']['not_computed']}\n" for s in summaries
          if "not_computed" in (s["coverage"] or {})],
        *probe_markdown(summaries),
        "## Figures", "",
    ]
    for name, caption in figures:
        lines += [f"![{name}]({name})", "", caption, ""]
    return "\n".join(lines)
