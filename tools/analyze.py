"""Analyse scores files: the paper's Table 1, more measures, and figures, into one report folder.

    python tools/analyze.py runs/scalar/scores.npz runs/quantile/scores.npz --out report
    python tools/analyze.py *.npz --out report --view q0 --bins 100 --bootstrap 2000
    python tools/analyze.py synthetic/*.npz --out report --truth synthetic/test_truth.npz

Prints the path of report.md. This is `minqr analyze` as a script: its options are AnalyzeConfig's
fields; the measures are minqr.study.analysis's, the report minqr.study.report's.
"""
from minqr_cli.commands.analyze import analyze_scores as main

if __name__ == "__main__":
    main()
