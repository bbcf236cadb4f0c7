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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from minqr import __version__
from minqr.atomic import atomic_dir, atomic_file, check_replaceable
from minqr.errors import MinqrError, MinqrUsageError
from minqr.lock import holds_output
from minqr.options import option, seed_option
from minqr.reading import loads
from minqr.study.analysis import (CONFIDENCE, DEFAULT_BINS, DEFAULT_EPS, DEFAULT_RESAMPLES, VIEWS_HELP, coverage_taus,
                                  paired_accuracy_difference, paired_kl_difference, response_truth, same_pairs,
                                  spreads, summarize, view_rows)
from minqr.study.scores_file import Scores, load_scores

CHOSEN_COLOR, REJECTED_COLOR = "tab:green", "tab:red"


@dataclass
class AnalyzeConfig:
    """The options of an analysis (`minqr analyze`, `analyze`)."""

    scores: tuple[str, ...] = option(help="scores files (.npz or .jsonl) written by score", argument=True)
    out: str = option(help="report folder: created, or replaced if it holds an earlier report")
    view: str = option("mean", f"which reward of a response the divergences compare: {VIEWS_HELP} (the N "
                       "quantiles pooled)")
    bins: int = option(DEFAULT_BINS, "equal-width bins over the pooled range for the histogram KL and JS", low=1)
    eps: float = option(DEFAULT_EPS, "added to every bin's count before normalising (keeps log 0 away)", low=0)
    n_resamples: int = option(DEFAULT_RESAMPLES, "bootstrap resamples of the pairs for the bias corrections and "
                              "intervals (0: plug-in values only)", low=0, flag="--bootstrap")
    confidence: float = option(CONFIDENCE, "confidence level of every interval", low=0, high=1, open_range=True)
    seed: int = seed_option("seed of the bootstrap resamples")
    truth: str | None = option(None, "a synthetic task's test_truth.npz for every scores file: adds quantile "
                               "coverage [default: the truth named in each file's metadata, if any]")
    no_truth: bool = option(False, "no coverage, even where a file's metadata names a truth file")

    def __post_init__(self):
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
    check_replaceable(out_dir, "--out")  # before the measuring, which takes a while
    all_scores = [load_scores(path) for path in paths]
    _check_cells_unique(all_scores)
    truth = False if options.no_truth else options.truth
    summaries = [summarize(s, view=options.view, bins=options.bins, eps=options.eps, n_resamples=options.n_resamples,
                           confidence=options.confidence, seed=options.seed, truth=truth) for s in all_scores]
    return write_report(out_dir, all_scores, summaries)


@dataclass
class TableConfig:
    """The options of the objectives table (`minqr objectives-table`)."""

    summaries: tuple[str, ...] = option(help="summaries.json files written by analyze", argument=True)
    out: str = option(help="markdown file to write")


def write_objectives_table(paths, out) -> Path:
    """Write `objectives_table` of the rows of every summaries.json in `paths` into the markdown
    file `out` (atomically)."""
    rows = []
    for path in paths:
        try:
            rows += loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MinqrError(f"{path} is not a summaries.json written by tools/analyze.py ({error})") from None
    with atomic_file(Path(out)) as tmp:
        tmp.write_text(objectives_table(rows) + "\n")
    return Path(out)


def _check_cells_unique(all_scores: list[Scores]) -> None:
    seen = {}
    for scores in all_scores:
        cell = (scores.workload, scores.label)
        if cell in seen:
            raise MinqrError(f"{seen[cell]} and {scores.source} fill the same table cell (workload "
                             f"{cell[0]!r}, model {cell[1]!r}); analyse them separately, or give one a "
                             "different 'label' in its metadata")
        seen[cell] = scores.source


def write_report(out_dir, all_scores: list[Scores], summaries: list[dict]) -> Path:
    """Write tables, figures and report.md for the already summarised scores into `out_dir`."""
    out = Path(out_dir)
    workloads = list(dict.fromkeys(s["workload"] for s in summaries))
    models = list(dict.fromkeys(s["label"] for s in summaries))
    table = table1(summaries, workloads, models)
    options = {k: summaries[0][k] for k in ("view", "bins", "eps", "n_resamples", "confidence", "seed")}
    table["differences"] = paired_differences(all_scores, summaries, workloads,
                                              lambda a, b: paired_kl_difference(a, b, **options))
    accuracy_differences = paired_differences(all_scores, summaries, workloads,
                                              lambda a, b: paired_accuracy_difference(a, b, options["confidence"]))
    with atomic_dir(out, "--out") as tmp:
        (tmp / "table1.json").write_text(json.dumps(_json_ready(table), indent=2) + "\n")
        (tmp / "table1.md").write_text(table1_markdown(table) + "\n")
        (tmp / "measures.md").write_text(measures_markdown(summaries) + "\n")
        (tmp / "summaries.json").write_text(json.dumps(_json_ready(summaries), indent=2) + "\n")
        figures = _draw_figures(tmp, all_scores, summaries, workloads)
        (tmp / "report.md").write_text(_report_markdown(summaries, table, accuracy_differences, figures))
    return out / "report.md"


# --- tables -----------------------------------------------------------------------------------

def table1(summaries: list[dict], workloads: list[str], models: list[str]) -> dict:
    """The paper's Table 1 as data: cells[workload][model] = histogram KL, corrected, with its interval."""
    first = summaries[0]
    cells = {w: {} for w in workloads}
    for s in summaries:
        cells[s["workload"]][s["label"]] = {k: s["histogram_kl"][k] for k in ("value", "corrected", "ci_low", "ci_high")}
    return {"measure": "histogram KL(chosen || rejected), nats", "view": first["view"], "bins": first["bins"],
            "eps": first["eps"], "confidence": first["confidence"],
            "n_resamples": first["n_resamples"], "workloads": workloads, "models": models, "cells": cells}


def paired_differences(all_scores: list[Scores], summaries: list[dict], workloads: list[str], compare) -> list[dict]:
    """Per workload, each model against the first model, where both scored the same pairs (same data,
    split and count): {"workload", "model", "reference", **compare(scores, reference scores)}, compare
    being a paired difference with its interval (paired_kl_difference, paired_accuracy_difference)."""
    differences = []
    for workload in workloads:
        runs = [(scores, summary) for scores, summary in zip(all_scores, summaries)
                if summary["workload"] == workload]
        (reference, reference_summary), others = runs[0], runs[1:]
        for scores, summary in others:
            if same_pairs(scores, reference):
                differences.append({"workload": workload, "model": summary["label"],
                                    "reference": reference_summary["label"],
                                    **compare(scores, reference)})
    return differences


def table1_markdown(table: dict) -> str:
    lines = ["| workload | " + " | ".join(table["models"]) + " |",
             "|---|" + "---:|" * len(table["models"])]
    for workload in table["workloads"]:
        row = [_with_interval(table["cells"][workload].get(model)) for model in table["models"]]
        lines.append(f"| {workload} | " + " | ".join(row) + " |")
    if table.get("differences"):
        lines += ["", "| workload | paired difference (same pairs) | KL difference |", "|---|---|---:|"]
        lines += [f"| {d['workload']} | {d['model']} − {d['reference']} | {_with_interval(d)} |"
                  for d in table["differences"]]
    return "\n".join(lines)


class Measure(NamedTuple):
    """A column of the measures table: its key, its title, how a summary fills its cell, and what it
    means (report.md prints the meanings under the table, in the columns' order)."""

    key: str
    title: str
    cell: Callable[[dict], str]
    meaning: str


MEASURE_COLUMNS = (
    Measure("accuracy", "pair accuracy", lambda s: _with_interval(s["accuracy"]),
            "Pair accuracy ranks by the mean reward (ties count half)."),
    Measure("js", "JS divergence (nats)", lambda s: _with_interval(s["js_divergence"]),
            "JS: Jensen-Shannon divergence of the same histograms as Table 1 (at most ln 2)."),
    Measure("w1", "W1 / pooled sd", lambda s: _with_interval(s["wasserstein_1_sd"]),
            "W1: Wasserstein-1 between the two reward samples over their pooled standard deviation."),
    Measure("kde_kl", "KDE KL (nats)", lambda s: _with_interval(s["kde_kl"]),
            "KDE KL: KL between Gaussian KDEs (Scott's bandwidth)."),
    Measure("nll", "held-out NLL",
            lambda s: _number(s["nll"]) + (f" (Bayes {s['bayes']['nll']:.3f})" if s["bayes"] else ""),
            "Held-out NLL: −mean log P(label) with P the model's own P(chosen preferred), the likelihood its "
            "objective trains (the mixture: the mean over kinds of σ(h_c,i − h_r,i); Bradley-Terry and paper: "
            "σ(μc − μr)); on the synthetic task the Bayes-optimal model's NLL is given beside it."),
    Measure("ece", "ECE (objective)", lambda s: _number(s["calibration"]["objective"]["ece"]),
            "ECE (objective): the calibration of that P, expected calibration error on 10 equal-width bins, each "
            "pair scored in both orders."),
    Measure("ece_bt", "ECE σ(μc−μr)", lambda s: _number(s["calibration"]["bradley_terry"]["ece"]),
            "ECE σ(μc−μr): the same for the Bradley-Terry probability of the mean rewards."),
    Measure("brier_bt", "Brier σ(μc−μr)", lambda s: _number(s["calibration"]["bradley_terry"]["brier"]),
            "Brier: its mean squared error, likewise."),
    Measure("ece_dist", "ECE P(Xc>Xr)", lambda s: _number((s["calibration"]["distributional"] or {}).get("ece")),
            "ECE P(Xc>Xr): the same for the probability that a draw from the chosen response's quantiles beats "
            "one from the rejected one's."),
    Measure("crossing", "crossing rate", lambda s: _number(s["crossing_rate"]),
            "Crossing rate: share of responses whose quantiles decrease somewhere."),
    Measure("spread_auroc", "spread AUROC (errors)", lambda s: _with_interval(s["spread_auroc"]),
            "Spread AUROC: how well q_{N-1} − q_0 singles out the pairs the model ranks wrongly (0.5: not at all)."),
    Measure("coverage", "coverage error", lambda s: _number(_coverage(s).get("mean_abs_error")),
            "Coverage error: mean |share of truth below q_k − τ_k|."),
    Measure("spread_rho", "spread ρ (truth)", lambda s: _number(_coverage(s).get("spread_spearman")),
            "Spread ρ: Spearman correlation of predicted with true spread."),
)
# After the meanings of the columns: how the coverage measures meet the truth.
COVERAGE_UNITS = ("Where the scores carry the outputs for each pair's anchor (a reply whose true reward is 0 for "
                  "everyone), the quantiles are aligned on it and compared with the truth in its own units, with no "
                  "fit; otherwise the truth is first mapped into the model's units by an affine fit of the means.")


def not_measured(summaries: list[dict]) -> list[str]:
    """One line per measure a model's scores could not give, with the reason (n/a in the tables)."""
    titles = {"kde_kl": "KDE KL", "spread_auroc": "spread AUROC"}
    return [f"- {s['label']}, {s['workload']}: {title} not measured: {s[key]['not_measured']}"
            for s in summaries for key, title in titles.items() if "not_measured" in (s[key] or {})]


def _coverage(summary: dict) -> dict:
    """The coverage measures, or {} where there was no truth or they could not be computed."""
    coverage = summary["coverage"] or {}
    return {} if "not_computed" in coverage else coverage


def measures_markdown(summaries: list[dict]) -> str:
    """A row per scores file: the measures beyond Table 1 (– where one does not apply)."""
    lines = ["| workload | model | " + " | ".join(measure.title for measure in MEASURE_COLUMNS) + " |",
             "|---|---|" + "---:|" * len(MEASURE_COLUMNS)]
    for summary in summaries:
        cells = " | ".join(measure.cell(summary) for measure in MEASURE_COLUMNS)
        lines.append(f"| {summary['workload']} | {summary['label']} | {cells} |")
    missing = not_measured(summaries)
    return "\n".join(lines + ([""] + missing if missing else []))


# The study of the objectives (docs/objectives.md): per workload and objective, over seeds. Each
# column: its title and the number it takes from a summary (None where it does not apply).
OBJECTIVE_COLUMNS = (
    ("accuracy − Bayes", lambda s: s["accuracy"]["value"] - s["bayes"]["accuracy"] if s["bayes"] else None),
    ("accuracy", lambda s: s["accuracy"]["value"]),
    ("NLL − Bayes", lambda s: s["nll"] - s["bayes"]["nll"] if s["bayes"] else None),
    ("coverage error", lambda s: _coverage(s).get("mean_abs_error")),
    ("spread ρ", lambda s: _coverage(s).get("spread_spearman")),
    ("ECE", lambda s: s["calibration"]["objective"]["ece"]),
    ("spread AUROC (errors)", lambda s: (s["spread_auroc"] or {}).get("value")),
    ("histogram KL", lambda s: s["histogram_kl"]["value"]),
)


def objectives_table(summaries: list[dict]) -> str:
    """A markdown table with a row per (workload, objective): every OBJECTIVE_COLUMNS measure as its
    mean over the summaries of that row (the seeds), with the range in brackets."""
    rows = {}
    for s in summaries:
        objective = s.get("objective") or s["head"]
        rows.setdefault((s["workload"], objective, s["num_quantiles"]), []).append(s)
    lines = ["| workload | objective | N | seeds | " + " | ".join(title for title, _ in OBJECTIVE_COLUMNS) + " |",
             "|---|---|---:|---:|" + "---:|" * len(OBJECTIVE_COLUMNS)]
    for (workload, objective, n), group in rows.items():
        cells = []
        for _, measure in OBJECTIVE_COLUMNS:
            values = [v for v in map(measure, group) if v is not None and math.isfinite(v)]
            if not values:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        lines.append(f"| {workload} | {objective} | {n} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _objective(summary: dict) -> str:
    return f", objective {summary['objective']}" if summary.get("objective") else ""


def probe_markdown(summaries: list[dict]) -> list[str]:
    """The backbone check of the synthetic task (minqr.study.scoring.backbone_probe), a row per model: lines
    of report.md, none when no scores file has it."""
    probed = [s for s in summaries if s.get("backbone_probe")]
    if not probed:
        return []
    tags = probed[0]["backbone_probe"]["tags"]
    controversial = probed[0]["backbone_probe"]["controversial"]
    names = [f"**{tag}**" if split else tag for tag, split in zip(tags, controversial)]
    lines = ["## Does the backbone encode what annotators disagree about?", "",
             "Held-out accuracy of a linear probe that reads each tag off the pooled state the head reads "
             "(chance: the majority class). A head can only spread a response's rewards on what that state "
             "encodes: a controversial tag (bold) near chance leaves a quantile head nothing to spread on.", "",
             "| workload | model | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(tags)]
    for s in probed:
        probe = s["backbone_probe"]
        lines.append(f"| {s['workload']} | {s['label']} | "
                     + " | ".join(f"{a:.2f} ({c:.2f})" for a, c in zip(probe["accuracy"], probe["chance"])) + " |")
    return lines + [""]


def _number(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if math.isfinite(value) else str(value)


def _with_interval(estimate) -> str:
    """`value`, `value [low, high]` (Wilson), or `plug-in → corrected [low, high]` (bootstrap_estimate)."""
    if estimate is None:
        return "–"
    if "not_measured" in estimate:
        return "n/a"
    text = _number(estimate["value"])
    if estimate.get("corrected") is not None:
        text += f" → {_number(estimate['corrected'])}"
    if estimate.get("ci_low") is not None:
        text += f" [{_number(estimate['ci_low'])}, {_number(estimate['ci_high'])}]"
    return text


def _json_ready(value):
    """NaN and ±inf (not JSON) become null; numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# --- figures ----------------------------------------------------------------------------------

def _draw_figures(out: Path, all_scores, summaries, workloads) -> list[tuple[str, str]]:
    """Draw every figure; returns (file name, caption) in reading order."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and none is there on a server
    figures = []
    by_workload = {w: [(scores, summary) for scores, summary in zip(all_scores, summaries)
                       if summary["workload"] == w] for w in workloads}
    view, bins = summaries[0]["view"], summaries[0]["bins"]
    models = dict.fromkeys(s["label"] for s in summaries)
    colors = {label: f"C{i}" for i, label in enumerate(models)}  # a model keeps its colour in every figure
    for number, (workload, runs) in enumerate(by_workload.items(), start=1):
        name = f"fig2_histograms_{number}_{_slug(workload)}.png"
        _histogram_figure(out / name, f"Rewards of chosen and rejected responses (view {view})",
                          _labels({workload: runs}),
                          [(summary["label"], view_rows(scores.chosen, view), view_rows(scores.rejected, view),
                            summary["histogram_kl"]["value"]) for scores, summary in runs], bins, f"reward ({view})")
        figures.append((name, f"{workload}: rewards of chosen and rejected responses (view {view}), histograms "
                              "with KDE curves; the title gives the histogram KL (the paper's Figure 2)."))
        quantile_runs = [(scores, summary) for scores, summary in runs if scores.num_quantiles > 1]
        if quantile_runs:
            name = f"fig3_quantiles_{number}_{_slug(workload)}.png"
            panels = []
            for scores, summary in quantile_runs:
                for k in (0, scores.num_quantiles - 1):
                    panels.append((f"{summary['label']}: q{k} (τ={scores.taus[k]:.3g})", scores.chosen[:, k:k + 1],
                                   scores.rejected[:, k:k + 1], None))
            _histogram_figure(out / name, "Lowest and highest quantile, chosen vs rejected",
                              _labels({workload: quantile_runs}), panels, bins, "reward", columns=2)
            figures.append((name, f"{workload}: the lowest (pessimistic) and highest (optimistic) quantile of each "
                                  "quantile model, chosen vs rejected (the paper's Figure 3)."))
    panel_figures = (  # file, title, what draws a panel, caption
        ("kl_vs_bins.png", "Histogram KL against the number of bins", _plot_kl_vs_bins,
         "Histogram KL against the number of bins (log scale): how much of the value the bins make."),
        ("reliability.png", "Reliability of P(chosen preferred)", _plot_reliability,
         "Reliability of P(chosen preferred): σ(μc − μr) solid, the quantiles' P(Xc > Xr) dashed; "
         "on the diagonal is calibrated."),
        ("accuracy_by_quantile.png", "Pair accuracy when ranking by one quantile", _plot_quantile_accuracy,
         "Pair accuracy when ranking by quantile q_k alone, against τ_k (dotted: the mean's accuracy; "
         "a scalar model is a horizontal line)."),
    )
    for name, title, plot, caption in panel_figures:
        _panels_figure(out / name, title, by_workload, plot, colors)
        figures.append((name, caption))
    with_truth = {w: [(scores, summary) for scores, summary in runs if _coverage(summary)]
                  for w, runs in by_workload.items()}
    with_truth = {w: runs for w, runs in with_truth.items() if runs}
    if with_truth:
        _coverage_figure(out / "coverage.png", with_truth, colors)
        figures.append(("coverage.png", "Against the known truth: share of true reward samples below each predicted "
                                        "quantile vs τ (left; a scalar is one point at 0.5), predicted vs true "
                                        "spread q_{N-1} − q_0 (right)."))
    return figures


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "workload"


def _labels(by_workload: dict) -> dict[str, list[str]]:
    """{workload: [(scores, summary), ...]} -> {workload: the labels of its models}."""
    return {workload: [summary["label"] for _, summary in runs] for workload, runs in by_workload.items()}


def _figure_title(what: str, models: dict[str, list[str]], width: int) -> str:
    """`what` the figure shows, then a line per workload naming the models drawn for it, so that a
    figure seen away from report.md (a slide, a chat) still says whose rewards on which data. A long
    list of models wraps at `width` characters between labels, never inside one."""
    lines = [what]
    for workload, labels in models.items():
        line = f"{workload}:"
        for index, label in enumerate(labels):
            item = label + ("," if index < len(labels) - 1 else "")
            if len(line) + 1 + len(item) > width:
                lines.append(line)
                line = item
            else:
                line += " " + item
        lines.append(line)
    return "\n".join(lines)


def _save(fig, path: Path, what: str, models: dict[str, list[str]]) -> None:
    """Title the figure (_figure_title) and write it to `path`."""
    import matplotlib.pyplot as plt

    fig.suptitle(_figure_title(what, models, width=int(fig.get_figwidth() * 12)), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histogram_figure(path: Path, what: str, models: dict, panels, bins: int, xlabel: str,
                      columns: int | None = None) -> None:
    """One panel per (title, chosen rows, rejected rows, KL or None): two histograms on shared
    edges (the pooled range, as the KL's) and a KDE curve for each; the figure titled by `what` and
    `models` (_figure_title)."""
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    for ax, (title, chosen, rejected, kl) in zip(axes.flat, panels):
        chosen, rejected = np.ravel(chosen), np.ravel(rejected)
        low, high = min(chosen.min(), rejected.min()), max(chosen.max(), rejected.max())
        edges = np.linspace(low, high, bins + 1) if high > low else bins
        grid = np.linspace(low, high, 400)
        for values, color, name in ((chosen, CHOSEN_COLOR, "chosen"), (rejected, REJECTED_COLOR, "rejected")):
            ax.hist(values, edges, density=True, histtype="stepfilled", alpha=0.35, color=color, label=name)
            if np.ptp(values) > 0:
                ax.plot(grid, gaussian_kde(values)(grid), color=color, linewidth=1.5)
        ax.set_title(title if kl is None else f"{title}\nKL(chosen‖rejected) = {kl:.3f}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    _save(fig, path, what, models)


def _panels_figure(path: Path, what: str, by_workload: dict, plot, colors: dict) -> None:
    """One panel per workload, drawn by plot(ax, runs, colors); the figure titled by `what` and the models."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_workload), figsize=(5 * len(by_workload), 3.8), squeeze=False)
    for ax, (workload, runs) in zip(axes.flat, by_workload.items()):
        plot(ax, runs, colors)
        ax.set_title(workload, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, what, _labels(by_workload))


def _plot_kl_vs_bins(ax, runs, colors) -> None:
    for _, summary in runs:
        ax.plot(summary["kl_by_bins"]["bins"], summary["kl_by_bins"]["kl"], "o-", markersize=3, color=colors[summary["label"]],
                label=summary["label"])
    ax.axvline(runs[0][1]["bins"], color="gray", linestyle=":", linewidth=0.8)  # the table's bin count
    ax.set_xscale("log")
    ax.set_xlabel("bins")
    ax.set_ylabel("histogram KL (nats)")


def _plot_reliability(ax, runs, colors) -> None:
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=0.8)
    for _, summary in runs:
        color = colors[summary["label"]]
        for kind, style in (("bradley_terry", "-"), ("distributional", "--")):
            result = summary["calibration"][kind]
            if result is not None:
                curve = result["curve"]
                ax.plot(curve["mean_prob"], curve["frequency"], style, marker="o", markersize=3, color=color,
                        label=f"{summary['label']} {'σ(μc−μr)' if kind == 'bradley_terry' else 'P(Xc>Xr)'} "
                              f"ECE={result['ece']:.3f}")
    ax.set_xlabel("predicted P(first preferred)")
    ax.set_ylabel("observed frequency")


def _plot_quantile_accuracy(ax, runs, colors) -> None:
    for scores, summary in runs:
        color = colors[summary["label"]]
        if summary["quantile_accuracy"] is None:
            ax.axhline(summary["accuracy"]["value"], color=color, label=f"{summary['label']} (one output)")
            continue
        ax.plot(scores.taus, summary["quantile_accuracy"], "o-", markersize=3, color=color, label=summary["label"])
        ax.axhline(summary["accuracy"]["value"], color=color, linestyle=":", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("τ_k of the quantile ranked by")
    ax.set_ylabel("pair accuracy")


def _coverage_figure(path: Path, with_truth: dict, colors: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(with_truth), 2, figsize=(10, 3.8 * len(with_truth)), squeeze=False)
    for (coverage_ax, spread_ax), (workload, runs) in zip(axes, with_truth.items()):
        coverage_ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=0.8)
        for scores, summary in runs:
            coverage, color = summary["coverage"], colors[summary["label"]]
            coverage_ax.plot(coverage["taus"], coverage["coverage"], "o-", markersize=4, color=color,
                             label=f"{summary['label']} error={coverage['mean_abs_error']:.3f}")
            if scores.num_quantiles > 1:
                pred, true = response_truth(scores, coverage["truth"])
                pred_spread, true_spread = spreads(pred, true, coverage_taus(scores))
                spread_ax.scatter(true_spread, pred_spread, s=4, alpha=0.4, color=color,
                                  label=f"{summary['label']} ρ={coverage['spread_spearman']:.3f}")
        coverage_ax.set(title=f"{workload}: coverage", xlabel="τ", ylabel="share of truth below q(τ)", xlim=(0, 1),
                        ylim=(0, 1))
        anchored = all(summary["coverage"].get("anchored") for _, summary in runs)
        spread_ax.set(title=f"{workload}: spread", xlabel="true spread (truth units)",
                      ylabel="predicted spread (" + ("aligned on the anchor: truth units" if anchored else "model units") + ")")
        for ax in (coverage_ax, spread_ax):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    _save(fig, path, "Against the known truth: coverage and spread", _labels(with_truth))


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
                f"paired difference is {_number(estimate)} (see the tables).")
    ordered = [(difference["model"], _number(_point(model))), (difference["reference"], _number(_point(reference)))]
    (first, first_value), (second, second_value) = ordered if estimate >= 0 else ordered[::-1]
    values = f"({first_value} vs {second_value})"
    if estimate == 0:
        lead = f"By {measure}, {first} and {second} separate chosen from rejected equally {values}"
    else:
        lead = f"By {measure}, {first} separates chosen from rejected more than {second} {values}"
    change = f"{difference['model']} − {difference['reference']} = {_number(estimate)}"
    if difference["ci_low"] is None:
        return f"{lead}; the paired difference {change} has no interval to judge it by."
    change += f" [{_number(difference['ci_low'])}, {_number(difference['ci_high'])}]"
    if difference["ci_low"] > 0 or difference["ci_high"] < 0:
        return f"{lead}, and the paired difference {change} is larger than its uncertainty (the interval excludes 0)."
    return (f"{lead}, but the paired difference {change} is not larger than its uncertainty (the interval holds 0): "
            "these pairs cannot tell the two apart.")


def _accuracy_line(summary: dict, reference: str) -> str:
    """A summary bullet for a model compared with none: its accuracy, and the best possible one where known."""
    line = (f"- {summary['workload']}, {summary['label']} ({summary['num_pairs']:,} pairs): pair accuracy "
            f"{_with_interval(summary['accuracy'])} ({summary['confidence']:.0%} Wilson interval)")
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
        *[f"- `{s['source']}`: {s['label']} ({s['model']}{_objective(s)}), {s['workload']}, {s['num_pairs']:,} pairs"
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
        "(minqr/study/analysis.py, bootstrap_estimate). JS, W1, the KDE KL and the spread AUROC below read the same "
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
