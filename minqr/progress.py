"""Progress bars and the messages printed beside them. One rule for every tool: on a terminal a bar
redraws up to ten times a second; into a log file (stderr is no TTY) every redraw is one more line,
so there it redraws at most every 10 seconds (a long scoring or training job would otherwise write
thousands of lines)."""
import sys

from tqdm import tqdm


def progress_bar(**options) -> tqdm:
    """A tqdm bar on stderr, redrawn as often as the rule above allows; `options` are tqdm's."""
    return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0, **options)


def say(message: str) -> None:
    """A message on stderr that does not break a progress bar being drawn there."""
    tqdm.write(message, file=sys.stderr)
