"""The best-of-N evidence table (docs/best_of_n.md): choices by each statistic from trained models
against the oracle that knows the true distribution and a random choice, on candidate sets of the
synthetic task (minqr/study/selection.py says what is measured).

    python tools/best_of_n_table.py RUNS --out table.md [--overwrite]

RUNS holds a folder per task variant (demo, shifted), each with candidates/ (minqr candidates),
mixture/ and scalar/ (models trained on that variant); `make best-of-n` makes them all. The
choices are made here with `minqr best-of-n` (kept as RUNS/VARIANT/MODEL-REFERENCE.jsonl, reused
while newer than the model and the candidates).
"""
import argparse
import json
from pathlib import Path

import numpy as np

from minqr.atomic import atomic_file, check_output_file
from minqr.errors import MinqrError
from minqr.adapters.best_of_n import DEFAULT_STATISTICS, best_of_n_to_file, parse_statistics
from minqr.study.selection import atom_records, compare, spread_auroc

# (model folder, reference): the mixture relative to the anchor reply and to the group; the scalar head
CHOOSERS = (("mixture", "reply"), ("mixture", "group"), ("scalar", "reply"))
ATOMS = 20  # the mixture head's outputs: the truth told in as many atoms is what its size allows


def choose(runs: Path, variant: str, model: str, reference: str) -> list:
    out, folder = runs / variant / f"{model}-{reference}.jsonl", runs / variant / model
    data = runs / variant / "candidates" / "candidates.jsonl"
    inputs = max(p.stat().st_mtime for p in [data, *folder.iterdir()])
    if not out.exists() or out.stat().st_mtime < inputs:  # none yet, or made before the model or candidates
        best_of_n_to_file(folder, data, out, reference=reference, statistics=DEFAULT_STATISTICS, overwrite=True)
    return [json.loads(line) for line in out.read_text().splitlines()]


def table(runs: Path) -> str:
    statistics = [str(s) for s in parse_statistics(DEFAULT_STATISTICS)]
    lines = ["| task | chooser (reference) | statistic | captured | beyond the mean | target: chooser / oracle / "
             "random | mean reward | worst group | share harmed |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for variant in ("demo", "shifted"):
        if not (runs / variant).is_dir():
            continue
        truth = dict(np.load(runs / variant / "candidates" / "truth.npz"))
        oracles = {}
        for model, reference in CHOOSERS:
            if not (runs / variant / model / "config.json").is_file():  # not trained (yet)
                continue
            records = choose(runs, variant, model, reference)
            rows = compare(truth, records, statistics, reference)
            oracles[reference] = rows
            for statistic, row in rows.items():
                m, o, r = row["model"], row["oracle"], row["random"]
                beyond, share = (("" if row["beyond_mean"] is None else f"{row['beyond_mean']:.1%}"),
                                 ("–" if row["captured"] is None else f"{row['captured']:.1%}"))
                lines.append(f"| {variant} | {model} ({reference}) | {statistic} | {share} | {beyond} | "
                             f"{m['target']:.3f} / {o['target']:.3f} / {r['target']:.3f} | {m['mean_reward']:.2f} | "
                             f"{m['worst_group']:.2f} | {m['share_harmed']:.3f} |")
            areas = spread_auroc(truth, records) if model == "mixture" else None
            if areas is not None:
                shares = areas.pop("shares")
                notes.append(f"{variant}, {model} ({reference}): spread AUROC " + ", ".join(
                    f"{what} {area:.3f} ({shares[what]:.0%} positive)" for what, area in areas.items()))
        for reference in oracles:
            rows = compare(truth, atom_records(truth, statistics, ATOMS, reference), statistics, reference)
            for statistic, row in rows.items():
                beyond, share = (("" if row["beyond_mean"] is None else f"{row['beyond_mean']:.1%}"),
                                 ("–" if row["captured"] is None else f"{row['captured']:.1%}"))
                m = row["model"]
                lines.append(f"| {variant} | truth in {ATOMS} atoms ({reference}) | {statistic} | "
                             f"{share} | {beyond} | {m['target']:.3f} | {m['mean_reward']:.2f} | "
                             f"{m['worst_group']:.2f} | {m['share_harmed']:.3f} |")
        for reference, rows in oracles.items():
            for statistic, row in rows.items():
                if reference == "group" and statistic == "mean":
                    continue  # the same picks as relative to the reply
                o = row["oracle"]
                lines.append(f"| {variant} | oracle ({reference}) | {statistic} | | | {o['target']:.3f} | "
                             f"{o['mean_reward']:.2f} | {o['worst_group']:.2f} | {o['share_harmed']:.3f} |")
        if oracles:
            r = next(iter(next(iter(oracles.values())).values()))["random"]
            lines.append(f"| {variant} | random | | | | | {r['mean_reward']:.2f} | {r['worst_group']:.2f} | "
                         f"{r['share_harmed']:.3f} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()
    try:
        check_output_file(args.out, "--out", overwrite=args.overwrite, what="the table")
    except MinqrError as error:
        parser.error(str(error))
    text = table(args.runs)
    with atomic_file(args.out) as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
