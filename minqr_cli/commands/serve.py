"""`minqr serve`: tools/serve.py as a subcommand (minqr/adapters/server.py does the work)."""
import click

from minqr.adapters.server import ServeConfig, serve as serve_rewards
from minqr_cli.options import config_command


@config_command(ServeConfig)
def serve(options, given):
    """Serve the reward model --model over HTTP: POST /get_reward with OpenRLHF's remote reward JSON
    ({"query": [...], "prompts": [...]}) answers {"rewards": [...]}, each query's --statistic of its
    reward distribution (relative to --reference-reply or to its --group for all but the mean);
    GET /health. Requests that arrive together are scored in one forward pass. Runs until SIGTERM
    or Ctrl-C, then answers the requests it has received and exits 0."""
    serve_rewards(ServeConfig(**options), ready=click.echo)
    click.echo("stopped")
