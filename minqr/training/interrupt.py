"""Stopping a run loses nothing: on Ctrl-C (SIGINT) or SIGTERM (what `kill`, a job scheduler or a
container runtime sends before it kills) the step in progress finishes, its checkpoint is saved, and
the run exits with the shell's status for that signal, 128 + its number (130, 143), saying how to
continue (`--resume`). A second Ctrl-C stops at once. A second SIGTERM changes nothing: under
torchrun a worker gets one from torchrun and one from the scheduler that signalled them all (Slurm's
scancel, systemd), milliseconds apart, and the scheduler's SIGKILL is the one that stops at once.

A process that starts with SIGINT ignored keeps it ignored, as Unix programs do: a shell ignores it
for the jobs a script starts in the background (`minqr train ... &`), so that a Ctrl-C meant for the
foreground does not reach them. Python leaves such a process's SIGINT ignored from its start, and
training does not take it back; SIGTERM still stops it cleanly."""
import signal
import threading

from minqr.errors import MinqrError
from minqr.progress import say

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(MinqrError):
    """A signal stopped the run after a finished step, whose checkpoint was saved; `status` is the
    shell's exit status for that signal (128 + its number)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Interrupt:
    """Ctrl-C or SIGTERM while training: the first asks the run to stop after the step in progress
    (and save it); a second Ctrl-C stops at once (KeyboardInterrupt, exit 130), a second SIGTERM is
    one more request to stop (module docstring). Used as a context manager around the loop;
    `received` is the signal this process got (None: none). Under torchrun one process's signal
    stops them all after the same step: each step sums `flags()` over the processes and hands the
    sums to `agree`."""

    def __init__(self):
        self.received = None
        self.agreed = None  # the signal the processes stop for, once they have agreed on one
        self._previous = {}

    def flags(self) -> list[float]:
        """This process's signals, one flag a signal of SIGNALS, to be summed over the processes."""
        return [float(self.received == sig) for sig in SIGNALS]

    def agree(self, summed: list[float]) -> None:
        """Take the processes' summed flags: SIGTERM wins over Ctrl-C (a scheduler's stop is the
        job's end), and every process then exits with the same status."""
        got = [sig for sig, count in zip(SIGNALS, summed) if count > 0]
        self.agreed = max(got) if got else None

    @property
    def status(self) -> int:
        """The exit status for the agreed signal: 128 + its number (130, 143)."""
        return 128 + self.agreed

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # SIGTERM again: already stopping after this step (module docstring)
        self.received = signal.Signals(signum)
        if signum == signal.SIGINT:
            say("Ctrl-C: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once, "
                "losing the steps since the last checkpoint)")
        else:
            say("SIGTERM: stopping after this step and saving a checkpoint")

    def __enter__(self):
        # only the main thread can take a signal; one ignored from the start stays ignored (above)
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS
                              if signal.getsignal(sig) != signal.SIG_IGN}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
