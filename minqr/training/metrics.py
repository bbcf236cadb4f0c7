"""The training log: `metrics.jsonl` (one JSON object a line) and a PNG of its curves.

Two kinds of line, told apart by their keys. Every optimizer step:

    step          1, 2, ...: the number of optimizer steps taken
    loss          the step's objective (with the centring and LM terms when they are on)
    accuracy      fraction of the step's pairs whose chosen response has the larger expected
                  reward (the mean of its quantiles); a tie counts half
    lr            the learning rate the step used
    tokens_per_s  real tokens (not padding; a shared prefix once) through the model per second,
                  all processes together
    pairs_per_s   pairs per second, likewise: the number to compare across layouts

Every evaluation on the held-out pairs (all of them, with the weights after `step`):

    eval_loss          qr_pairwise_loss alone (no centring or LM term): comparable across runs
    eval_accuracy      as `accuracy`
    eval_reward_mean   mean and standard deviation of the expected reward over all held-out
    eval_reward_std    responses, chosen and rejected; the last evaluation's go into config.json
    eval_margin        mean over pairs of expected reward chosen minus rejected
    eval_personal_...  when the held-out pairs name their annotators and the head is a mixture:
                       the personal metrics of minqr/training/personal_metrics.py

Lines are appended and flushed as they come, so a killed run keeps its log up to the kill (its
last line may be torn). A resumed run first cuts the log back to the checkpoint's step: the steps
after it are trained again, and the file then reads as if the run had never stopped.

With `--report-to tensorboard` the same numbers also go to TensorBoard event files in
OUT/tensorboard/ (`tensorboard --logdir OUT`), as train/loss, ..., eval/loss, ... against the
step; a resumed run purges the events after the checkpoint's step there too.
"""
import importlib.util
import json
import shutil
from pathlib import Path

from minqr.atomic import atomic_file, writing
from minqr.errors import MinqrError
from minqr.reading import loads

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
REPORT_TO = ("none", "tensorboard")


def check_report_to(report_to: str) -> None:
    """Before any work: the logger asked for is installed (TensorBoard is an optional extra)."""
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise MinqrError("--report-to tensorboard needs the tensorboard package, an optional extra of minqr: "
                         "pip install 'minqr[tensorboard]' (or pip install tensorboard)")


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl, skipping a torn line (a kill mid-append cuts the last one,
    maybe inside a character); a line that parses but is no record (an edited file) is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as error:
        raise MinqrError(f"{path} cannot be read ({error.strerror})") from None
    for number, line in enumerate(lines, 1):
        try:
            record = loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # only a line cut by a kill is malformed: the file is written by this module
        step = record.get("step") if isinstance(record, dict) else None
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise MinqrError(f"{path}:{number}: not a record of minqr's metrics (a JSON object with the step, a whole "
                             "number): the file was edited; remove that line, or the file to drop the run's log")
        records.append(record)
    return records


class MetricsLog:
    """Appends records to `path`; `resume_step=None` starts a new file, an int keeps the records
    of steps up to and including it (the ones a checkpoint at that step has seen). With
    `report_to="tensorboard"`, each record also goes to event files in `path`'s folder/tensorboard."""

    def __init__(self, path, resume_step: int | None = None, report_to: str = "none"):
        self.path = Path(path)
        kept = [] if resume_step is None else [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        with writing(self.path):
            self.file = open(self.path, "a")
        self.tensorboard = None
        events = self.path.parent / TENSORBOARD_DIR
        if resume_step is None and events.is_dir():
            shutil.rmtree(events)  # a new run: an earlier run's events would be drawn as this one's
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # only here: tensorboard is an optional extra

            self.tensorboard = SummaryWriter(events, purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        with writing(self.path):  # a full disk: one clean message (the lines before it stay whole)
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":  # eval_loss -> eval/loss, loss -> train/loss
                    tag = "eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key
                    self.tensorboard.add_scalar(tag, value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        with writing(self.path):  # what the buffer still holds is written now
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_curves(records: list[dict], path) -> Path:
    """Loss and accuracy against the step (training, and evaluation where there is one) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and none is there on a server
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((loss_ax, "loss", "loss"), (accuracy_ax, "accuracy", "pair accuracy")):
        if train:
            steps = [r["step"] for r in train]
            values = [r[key] for r in train]
            ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
            ax.plot(steps, _running_mean(values), color="tab:blue", label="train (running mean)")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_" + key] for r in evals], "o-", color="tab:orange",
                    label="held-out")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    accuracy_ax.axhline(0.5, color="gray", linestyle=":", linewidth=0.8)  # chance
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _running_mean(values: list[float], window: int = 20) -> list[float]:
    """Mean of the last `window` values at each point: per-step training numbers are noisy."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
