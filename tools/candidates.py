"""Write candidate sets of the synthetic task (minqr/synthetic/candidates.py) into a folder: prompts with
K candidate replies each, the input of best-of-n, and each candidate's true reward distribution.

    python tools/candidates.py --variant shifted --out runs/tasks/shifted-candidates

This is `minqr candidates` as a script (minqr_cli/commands/).
"""
from minqr_cli.commands.candidates import candidates as main

if __name__ == "__main__":
    main()
