"""Personal held-out metrics during training: when the held-out pairs name their annotators and the
head is a mixture, each held-out pair is also scored by its annotator's posterior over the kinds
from that annotator's TRAINING pairs (minqr/distribution/personal.py); an annotator with no
training pair is scored by the population (the uniform posterior). docs/personal.md is the guide.

    eval_personal_accuracy      share of held-out pairs with P_a(chosen ≻ rejected) > 1/2 (a tie half)
    eval_population_accuracy    the same with the uniform posterior, the same decision rule: the
                                baseline (eval_accuracy ranks by expected reward, another rule)
    eval_annotators             distinct annotators of the held-out pairs
    eval_known_annotators       of them, those with training pairs (the others get the population)
    eval_annotator_accuracy_mean    each held-out annotator's personal accuracy, averaged with every
                                    annotator counting once, however many pairs they hold
    eval_annotators_measured    annotators with at least MIN_PAIRS held-out pairs
    eval_annotator_accuracy_worst_decile   the mean personal accuracy of the worst tenth (at least
                                    one) of the measured annotators; absent when none is measured
                                    (an accuracy of one or two pairs is 0 or 1: its spread is noise)

Where the posteriors come from is the training loop's choice (minqr/training/loop.py): at the final
evaluation the final weights' pass over the training pairs, the one annotators.json is saved from;
at earlier ones the annotator-level likelihood's cached posteriors, when it has them.

Each process tallies its own held-out batches per annotator ([A, 3]: pairs, personal credit,
population credit); the tallies are summed over the processes before the figures are drawn, so
every process reports the same numbers.
"""
import json
import math
from pathlib import Path

import torch

from minqr.atomic import atomic_file, record_made
from minqr.data.batching import TokenizedPairs
from minqr.distribution.personal import check_personal, personal_preference
from minqr.errors import MinqrError
from minqr.ranking import ranking_credit
from minqr.training.distributed import Processes

PERSONAL_EVAL_FILE = "eval_annotators.json"
FORMAT = 1  # the file's layout version
PERSONAL_KEYS = ("eval_personal_accuracy", "eval_population_accuracy", "eval_annotators", "eval_known_annotators",
                 "eval_annotator_accuracy_mean", "eval_annotators_measured", "eval_annotator_accuracy_worst_decile")
MIN_PAIRS = 5  # held-out pairs an annotator needs for their accuracy to enter the worst decile


class PersonalEvaluation:
    """The held-out annotators of a run and where each stands in the training data."""

    def __init__(self, eval_ids: tuple, train_ids: tuple, train_counts: list, num_kinds: int):
        rows = {annotator: row for row, annotator in enumerate(train_ids)}
        self.ids = tuple(eval_ids)
        self.num_kinds = num_kinds
        # [A] each held-out annotator's row among the training annotators, -1 when they have none
        self.train_rows = torch.tensor([rows.get(annotator, -1) for annotator in self.ids], dtype=torch.long)
        self.train_pairs = [train_counts[row] if row >= 0 else 0 for row in self.train_rows.tolist()]
        self.known = self.train_rows >= 0  # [A] bool
        self.tallied = None  # [A, 3] the last evaluation's per-annotator tally, all processes together

    @classmethod
    def for_run(cls, train: TokenizedPairs, held_out: TokenizedPairs | None, head, say,
                cached: bool = False) -> "PersonalEvaluation | None":
        """The personal evaluation of a run, or None when the held-out pairs name no annotators or
        the head has no kinds (said once). `cached`: the run keeps posteriors during training
        (--annotator-likelihood), so that earlier evaluations get personal metrics too."""
        if held_out is None or held_out.annotators is None:
            return None
        count = len(held_out.annotator_ids)
        try:
            check_personal(head.objective, head.num_quantiles)
        except MinqrError as error:
            say(f"note: the held-out pairs name {count:,} annotators, but there are no personal metrics: {error}")
            return None
        train_ids = train.annotator_ids if train.annotators is not None else ()
        train_counts = torch.bincount(torch.tensor(train.annotators, dtype=torch.long),
                                      minlength=len(train_ids)).tolist() if train_ids else []
        evaluation = cls(held_out.annotator_ids, train_ids, train_counts, head.num_quantiles)
        when = ("at every evaluation once the annotator-level likelihood has cached them (after the first pass), "
                "and at the final one from the final weights" if cached else
                "at the final evaluation (posteriors from the final weights' pass over the training pairs)")
        say(f"held-out pairs name {count:,} annotators, {int(evaluation.known.sum()):,} of them in the training data: "
            f"personal metrics {when}")
        return evaluation

    def log_posteriors(self, training: torch.Tensor | None) -> torch.Tensor:
        """[A, N] float64 log q of each held-out annotator: their row of the training annotators'
        log-posteriors `training` [A_train, N], uniform for one absent from the training data (or
        for all, when `training` is None)."""
        values = torch.full((len(self.ids), self.num_kinds), -math.log(self.num_kinds), dtype=torch.float64)
        if training is not None and bool(self.known.any()):
            values[self.known] = training.detach().to("cpu", torch.float64)[self.train_rows[self.known]]
        return values

    def tally(self, log_posteriors: torch.Tensor, device) -> "PersonalTally":
        return PersonalTally(log_posteriors, device)

    def metrics(self, counts: torch.Tensor) -> dict:
        """The figures of the module docstring from the per-annotator tally [A, 3] of all held-out pairs."""
        counts = counts.to("cpu", torch.float64)
        pairs, personal, population = counts.unbind(-1)  # [A] each
        held = pairs > 0
        accuracy = personal[held] / pairs[held]  # [A'] each annotator's personal accuracy
        measured = personal[pairs >= MIN_PAIRS] / pairs[pairs >= MIN_PAIRS]
        total = float(pairs.sum())
        metrics = {"eval_personal_accuracy": float(personal.sum()) / total,
                   "eval_population_accuracy": float(population.sum()) / total,
                   "eval_annotators": int(held.sum()), "eval_known_annotators": int((held & self.known).sum()),
                   "eval_annotator_accuracy_mean": float(accuracy.mean()),
                   "eval_annotators_measured": len(measured)}
        if len(measured):
            worst = torch.sort(measured).values[: max(1, len(measured) // 10)]
            metrics["eval_annotator_accuracy_worst_decile"] = float(worst.mean())
        return metrics

    def summary(self, final_eval: dict) -> str:
        """One line of an evaluation's personal metrics, for the training log."""
        e = final_eval
        line = (f"personal metrics at step {e['step']}: accuracy {e['eval_personal_accuracy']:.4f} (the population's "
                f"{e['eval_population_accuracy']:.4f}) over {e['eval_annotators']:,} held-out annotators, "
                f"{e['eval_known_annotators']:,} known; mean per annotator {e['eval_annotator_accuracy_mean']:.4f}")
        if "eval_annotator_accuracy_worst_decile" in e:
            line += (f", worst decile {e['eval_annotator_accuracy_worst_decile']:.4f} (of the "
                     f"{e['eval_annotators_measured']:,} with {MIN_PAIRS}+ held-out pairs)")
        else:
            line += f", no worst decile (no annotator has {MIN_PAIRS}+ held-out pairs)"
        return line

    def write(self, folder: Path, final_eval: dict) -> Path:
        """The final evaluation's per-annotator figures (its tally, and its record `final_eval`) as
        eval_annotators.json in the run folder, atomically."""
        counts = self.tallied
        metrics = {key: value for key, value in final_eval.items() if key in PERSONAL_KEYS}
        rows = [{"id": annotator, "known": bool(known), "train_pairs": train_pairs, "eval_pairs": int(pairs),
                 "personal_accuracy": personal / pairs, "population_accuracy": population / pairs}
                for annotator, known, train_pairs, (pairs, personal, population)
                in zip(self.ids, self.known.tolist(), self.train_pairs, counts.tolist()) if pairs > 0]
        path = Path(folder) / PERSONAL_EVAL_FILE
        head = json.dumps({"format": FORMAT, "step": final_eval["step"], "min_pairs": MIN_PAIRS, "metrics": metrics})
        # one annotator a line: thousands of them stay readable with head and grep
        text = head[:-1] + ', "annotators": [\n' + ",\n".join(json.dumps(row) for row in rows) + "\n]}\n"
        with atomic_file(path) as tmp:
            tmp.write_text(text)
        record_made(Path(folder), PERSONAL_EVAL_FILE)
        return path


class PersonalTally:
    """One evaluation's per-annotator counts [A, 3]: pairs, personal credit, population credit."""

    def __init__(self, log_posteriors: torch.Tensor, device):
        self.log_posteriors = log_posteriors.to(device)  # [A, N] float64
        self.uniform = torch.full_like(self.log_posteriors[:1], -math.log(self.log_posteriors.shape[1]))  # [1, N]
        self.counts = torch.zeros(len(log_posteriors), 3, dtype=torch.float64, device=device)

    def add(self, annotators: torch.Tensor, r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> None:
        """A batch's pairs: annotator indices [B] into the held-out ids, raw outputs [B, N] each."""
        annotators = annotators.to(self.counts.device)
        chosen, rejected = r_chosen.double(), r_rejected.double()  # float64: a pair near 1/2 rounds alike everywhere
        personal = personal_preference(chosen, rejected, self.log_posteriors[annotators])  # [B]
        population = personal_preference(chosen, rejected, self.uniform.expand_as(chosen))  # [B]
        rows = torch.stack([torch.ones_like(personal), ranking_credit(personal, 0.5).double(),
                            ranking_credit(population, 0.5).double()], dim=-1)  # [B, 3]
        self.counts.index_add_(0, annotators, rows)

    def summed(self, procs: Processes, sharded: bool) -> torch.Tensor:
        """The counts of all held-out pairs: summed over the processes, unless `sharded`, where each
        process scored every batch itself."""
        return self.counts if sharded else procs.all_sum_tensor(self.counts)
