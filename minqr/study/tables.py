"""The analysis report's tables, from summaries (minqr.study.analysis.summarize's dicts): the paper's
Table 1 (histogram KL per workload and model, with paired differences), the other measures a row
per workload x model, the objectives study's table over seeds, and the backbone probe; numbers as
the tables print them, and the JSON-ready form of every number.
"""
import math
from typing import Callable, NamedTuple

import numpy as np

from minqr.study.analysis import same_pairs
from minqr.study.scores_file import Scores


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
        row = [with_interval(table["cells"][workload].get(model)) for model in table["models"]]
        lines.append(f"| {workload} | " + " | ".join(row) + " |")
    if table.get("differences"):
        lines += ["", "| workload | paired difference (same pairs) | KL difference |", "|---|---|---:|"]
        lines += [f"| {d['workload']} | {d['model']} − {d['reference']} | {with_interval(d)} |"
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
    Measure("accuracy", "pair accuracy", lambda s: with_interval(s["accuracy"]),
            "Pair accuracy ranks by the mean reward (ties count half)."),
    Measure("js", "JS divergence (nats)", lambda s: with_interval(s["js_divergence"]),
            "JS: Jensen-Shannon divergence of the same histograms as Table 1 (at most ln 2)."),
    Measure("w1", "W1 / pooled sd", lambda s: with_interval(s["wasserstein_1_sd"]),
            "W1: Wasserstein-1 between the two reward samples over their pooled standard deviation."),
    Measure("kde_kl", "KDE KL (nats)", lambda s: with_interval(s["kde_kl"]),
            "KDE KL: KL between Gaussian KDEs (Scott's bandwidth)."),
    Measure("nll", "held-out NLL",
            lambda s: number(s["nll"]) + (f" (Bayes {s['bayes']['nll']:.3f})" if s["bayes"] else ""),
            "Held-out NLL: −mean log P(label) with P the model's own P(chosen preferred), the likelihood its "
            "objective trains (the mixture: the mean over kinds of σ(h_c,i − h_r,i); independent: the mean over all "
            "N² draws of σ(h_c,i − h_r,j); Bradley-Terry and paper: σ(μc − μr)); on the synthetic task the "
            "Bayes-optimal model's NLL is given beside it."),
    Measure("ece", "ECE (objective)", lambda s: number(s["calibration"]["objective"]["ece"]),
            "ECE (objective): the calibration of that P, expected calibration error on 10 equal-width bins, each "
            "pair scored in both orders."),
    Measure("ece_bt", "ECE σ(μc−μr)", lambda s: number(s["calibration"]["bradley_terry"]["ece"]),
            "ECE σ(μc−μr): the same for the Bradley-Terry probability of the mean rewards."),
    Measure("brier_bt", "Brier σ(μc−μr)", lambda s: number(s["calibration"]["bradley_terry"]["brier"]),
            "Brier: its mean squared error, likewise."),
    Measure("ece_dist", "ECE P(Xc>Xr)", lambda s: number((s["calibration"]["distributional"] or {}).get("ece")),
            "ECE P(Xc>Xr): the same for the probability that a draw from the chosen response's quantiles beats "
            "one from the rejected one's."),
    Measure("crossing", "crossing rate", lambda s: number(s["crossing_rate"]),
            "Crossing rate: share of responses whose quantiles decrease somewhere."),
    Measure("spread_auroc", "spread AUROC (errors)", lambda s: with_interval(s["spread_auroc"]),
            "Spread AUROC: how well q_{N-1} − q_0 singles out the pairs the model ranks wrongly (0.5: not at all)."),
    Measure("coverage", "coverage error", lambda s: number(coverage_of(s).get("mean_abs_error")),
            "Coverage error: mean |share of truth below q_k − τ_k|."),
    Measure("spread_rho", "spread ρ (truth)", lambda s: number(coverage_of(s).get("spread_spearman")),
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


def coverage_of(summary: dict) -> dict:
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
    ("coverage error", lambda s: coverage_of(s).get("mean_abs_error")),
    ("spread ρ", lambda s: coverage_of(s).get("spread_spearman")),
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


def objective_of(summary: dict) -> str:
    return f", objective {summary['objective']}" if summary.get("objective") else ""


def probe_markdown(summaries: list[dict]) -> list[str]:
    """The backbone check of the synthetic task (minqr.synthetic.probe), a row per model: lines
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


def number(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if math.isfinite(value) else str(value)


def with_interval(estimate) -> str:
    """`value`, `value [low, high]` (Wilson), `plug-in → corrected [low, high]` (bootstrap_estimate),
    or `value (no interval)` where the resamples gave none (the summary's "no_interval" says why)."""
    if estimate is None:
        return "–"
    if "not_measured" in estimate:
        return "n/a"
    text = number(estimate["value"])
    if estimate.get("corrected") is not None:
        text += f" → {number(estimate['corrected'])}"
    if estimate.get("ci_low") is not None:
        text += f" [{number(estimate['ci_low'])}, {number(estimate['ci_high'])}]"
    elif estimate.get("no_interval"):
        text += " (no interval)"
    return text


def json_ready(value):
    """NaN and ±inf (not JSON) become null; numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


