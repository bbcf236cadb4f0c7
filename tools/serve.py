"""Serve a reward model over HTTP with OpenRLHF's remote reward protocol (POST /get_reward).

    python tools/serve.py --model runs/demo/mixture --statistic cvar:0.25 --reference-reply " OK." --port 5000

This is `minqr serve` as a script: its options are ServeConfig's fields and the work is
minqr.adapters.server's; docs/serve.md says how to point a trainer at it.
"""
from minqr_cli.commands.serve import serve as main

if __name__ == "__main__":
    main()
