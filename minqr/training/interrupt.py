"""Ctrl-C while training loses nothing: the step in progress finishes, its checkpoint is saved, and
the run exits with 130, saying how to continue (`--resume`). A second Ctrl-C stops at once."""
import signal
import threading

from minqr.errors import MinqrError
from minqr.progress import say


class TrainingInterrupted(MinqrError):
    """Ctrl-C (SIGINT) stopped the run after a finished step, whose checkpoint was saved."""


class Interrupt:
    """Ctrl-C while training: the first SIGINT asks the run to stop after the step in progress (and
    save it); a second one stops at once (KeyboardInterrupt). Used as a context manager around the
    loop; `requested` is this process's wish, `agreed` what the processes decided together."""

    def __init__(self):
        self.requested = self.agreed = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        say("Ctrl-C: stopping after this step and saving a checkpoint (press again to stop at once, losing "
             "the steps since the last checkpoint)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can Python take a signal
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
