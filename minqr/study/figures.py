"""The analysis report's figures (matplotlib, drawn to PNG files only): the paper's Figures 2 and 3
(histograms of chosen and rejected rewards with KDE curves), histogram KL against the bins,
reliability, accuracy by quantile and, against a known truth, coverage. Every figure's title names
its workloads and the labels of the models it draws.
"""
import math
import re
from pathlib import Path

import numpy as np

from minqr.study.analysis import coverage_taus, scores_view
from minqr.study.coverage import spreads
from minqr.study.tables import coverage_of
from minqr.synthetic.truth import response_truth

CHOSEN_COLOR, REJECTED_COLOR = "tab:green", "tab:red"


def draw_figures(out: Path, all_scores, summaries, workloads) -> list[tuple[str, str]]:
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
                          [(summary["label"], scores_view(scores, "chosen", view),
                            scores_view(scores, "rejected", view), summary["histogram_kl"]["value"])
                           for scores, summary in runs], bins, f"reward ({view})")
        figures.append((name, f"{workload}: rewards of chosen and rejected responses (view {view}), histograms "
                              "with KDE curves; the title gives the histogram KL (the paper's Figure 2)."))
        # a mixture's quantiles without an anchor would mix its kinds' constants in: not drawn (summarize
        # does not measure them either)
        quantile_runs = [(scores, summary) for scores, summary in runs
                         if scores.num_quantiles > 1 and not (scores.has_kinds and scores.anchor is None)]
        if quantile_runs:
            name = f"fig3_quantiles_{number}_{_slug(workload)}.png"
            panels = []
            for scores, summary in quantile_runs:
                for k in (0, scores.num_quantiles - 1):
                    panels.append((f"{summary['label']}: q{k} (τ={scores.taus[k]:.3g})",
                                   scores_view(scores, "chosen", f"q{k}"), scores_view(scores, "rejected", f"q{k}"), None))
            _histogram_figure(out / name, "Lowest and highest quantile, chosen vs rejected",
                              _labels({workload: quantile_runs}), panels, bins, "reward", columns=2)
            figures.append((name, f"{workload}: the lowest (pessimistic) and highest (optimistic) quantile of each "
                                  "quantile model, chosen vs rejected (the paper's Figure 3; a mixture scored "
                                  "without anchor outputs is left out: its quantiles need a reference reply)."))
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
    with_truth = {w: [(scores, summary) for scores, summary in runs if coverage_of(summary)]
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
                pred, true, _ = response_truth(scores, coverage["truth"])
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


