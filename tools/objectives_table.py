"""The objectives table: one row per workload and objective, each measure averaged over seeds.

    python tools/objectives_table.py runs/objectives/*/report/summaries.json --out docs/objectives/table.md

Reads the summaries.json that tools/analyze.py writes (one or several reports) and writes the table
of minqr.study.report.objectives_table: accuracy and held-out NLL against the Bayes-optimal model,
coverage error and spread ρ against the known truth, ECE, spread AUROC and the paper's histogram KL.
`make objectives` runs the whole study that fills it.
This is `minqr objectives-table` as a script (minqr_cli/commands/).
"""
from minqr_cli.commands.objectives_table import objectives_table as main

if __name__ == "__main__":
    main()
