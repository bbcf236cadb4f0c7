"""The annotator-level likelihood (minqr/training/loss.py's AnnotatorLikelihood) against the
float64 formula written out here: with the posterior cached from a pass over the same outputs, the
per-pair terms have the exact gradient of Σ_a −log Σ_k (1/N) Π_{j∈D_a} σ(h_k(c_j) − h_k(r_j) − m_j)."""
import math

import numpy as np
import pytest
import torch

from minqr.errors import MinqrError
from minqr.training.loss import AnnotatorLikelihood


def written_out(chosen, rejected, annotators, margins, num_annotators):
    """Σ_a −log Σ_k (1/N) Π_j σ(h_k(c_j) − h_k(r_j) − m_j), float64 loops (a torch scalar, for autograd),
    and the posteriors q_a(k) as plain floats."""
    total = torch.zeros((), dtype=torch.float64)
    posteriors = []
    n = chosen.shape[1]
    for a in range(num_annotators):
        rows = [j for j in range(len(annotators)) if annotators[j] == a]
        per_kind = []
        for k in range(n):
            log_product = torch.zeros((), dtype=torch.float64)
            for j in rows:
                d = chosen[j, k] - rejected[j, k] - margins[j]
                log_product = log_product - torch.log1p(torch.exp(-d))  # log σ(d)
            per_kind.append(log_product)
        peak = max(float(x.detach()) for x in per_kind)
        mean = sum(torch.exp(x - peak) for x in per_kind) / n
        total = total - (peak + torch.log(mean))
        weights = [math.exp(float(x.detach()) - peak) for x in per_kind]
        posteriors.append([w / sum(weights) for w in weights])
    return total, posteriors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_posterior_gives_the_exact_gradient(seed):
    rng = np.random.default_rng(seed)
    num_pairs, n, num_annotators = 23, 5, 4
    annotators = torch.tensor(rng.integers(0, num_annotators, num_pairs))
    annotators[:num_annotators] = torch.arange(num_annotators)  # everyone labels something
    scale = 3.0 if seed else 12.0  # seed 0: products far below float32's and exp's range, as in log space only
    chosen = torch.tensor(rng.normal(0, scale, (num_pairs, n)), requires_grad=True)
    rejected = torch.tensor(rng.normal(0, scale, (num_pairs, n)), requires_grad=True)
    margins = torch.tensor(rng.normal(0, 0.5, num_pairs))

    exact, posteriors = written_out(chosen, rejected, annotators.tolist(), margins, num_annotators)
    exact.backward()
    want_c, want_r = chosen.grad.clone(), rejected.grad.clone()
    chosen.grad, rejected.grad = None, None

    likelihood = AnnotatorLikelihood(num_annotators, n, num_pairs, "mixture")
    batches = [slice(0, 9), slice(9, 17), slice(17, None)]  # a pass in three batches
    for part in batches:  # the warm-start pass: no terms yet, the sums for the cache
        assert likelihood(chosen[part], rejected[part], annotators[part], margins[part]) is None
    np.testing.assert_allclose(likelihood.log_posterior.exp().numpy(), np.array(posteriors), rtol=1e-10, atol=1e-14)
    total = sum(likelihood(chosen[part], rejected[part], annotators[part], margins[part]).sum() for part in batches)
    total.backward()
    np.testing.assert_allclose(chosen.grad.numpy(), want_c.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rejected.grad.numpy(), want_r.numpy(), rtol=1e-9, atol=1e-12)
    # the second pass refreshed the cache from the same outputs
    np.testing.assert_allclose(likelihood.log_posterior.exp().numpy(), np.array(posteriors), rtol=1e-10, atol=1e-14)


def test_the_cache_is_from_the_last_pass_not_the_current_one():
    """The terms weight by the posterior of the previous pass's outputs, however the outputs moved since."""
    rng = np.random.default_rng(7)
    annotators = torch.tensor([0, 0, 1, 1])
    first = torch.tensor(rng.normal(size=(4, 3))), torch.tensor(rng.normal(size=(4, 3)))
    second = torch.tensor(rng.normal(size=(4, 3))), torch.tensor(rng.normal(size=(4, 3)))
    likelihood = AnnotatorLikelihood(2, 3, 4, "mixture")
    likelihood(*first, annotators, None)
    terms = likelihood(*second, annotators, None)
    _, old = written_out(*first, annotators.tolist(), torch.zeros(4, dtype=torch.float64), 2)
    q = torch.tensor(old, dtype=torch.float64)[annotators]
    want = -(q * torch.nn.functional.logsigmoid(second[0] - second[1])).sum(-1)
    torch.testing.assert_close(terms, want, rtol=1e-12, atol=1e-12)


def test_refused_without_kinds_or_ids():
    with pytest.raises(MinqrError, match="--annotator-likelihood: .*mixture"):
        AnnotatorLikelihood(3, 4, 10, "independent")
    with pytest.raises(MinqrError, match="names none"):
        AnnotatorLikelihood(0, 4, 10, "mixture")
    likelihood = AnnotatorLikelihood(3, 4, 10, "mixture")
    with pytest.raises(MinqrError, match="no annotator ids"):
        likelihood(torch.zeros(2, 4), torch.zeros(2, 4), None, None)


def test_training_warm_starts_by_the_per_label_objective_then_changes(tmp_path):
    """Through train(): for the first pass over the data the run is the per-label run, step for step
    (the warm start); after it the annotator-level likelihood trains, and the weights part."""
    import json
    from pathlib import Path

    from test_train import tiny_options, write_run_inputs

    from minqr.models.reward import RewardModel
    from minqr.training.config import TrainConfig
    from minqr.training.loop import train

    inputs = write_run_inputs(tmp_path / "inputs", num_train=24)  # 3 steps of 8 pairs a pass
    lines = Path(inputs["data"]).read_text().splitlines()
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({**json.loads(line), "annotator": k % 3}) + "\n"
                                for k, line in enumerate(lines)))

    def head_after(steps, name, **extra):
        out = tmp_path / name
        options = {"num_quantiles": 4, **extra}
        train(TrainConfig(**tiny_options(inputs, out, data=str(labelled), max_steps=steps, eval_every=0, save_every=0,
                                         **options)), progress=False)
        return RewardModel.from_pretrained(out).score.weight.detach()

    torch.testing.assert_close(head_after(3, "a3", annotator_likelihood=True), head_after(3, "l3"), rtol=0, atol=0)
    assert not torch.allclose(head_after(6, "a6", annotator_likelihood=True), head_after(6, "l6"))
    with pytest.raises(MinqrError, match="--annotator-likelihood: personal rewards need a mixture head"):
        head_after(2, "scalar", head="scalar", num_quantiles=1, annotator_likelihood=True)


def test_for_run_is_off_by_default_and_the_options_refuse_resume():
    """Refused with the options, before any work (it was refused after loading the checkpoint,
    which an interrupted run had just told the user to resume from)."""
    from types import SimpleNamespace

    from minqr.training.config import TrainConfig

    head = SimpleNamespace(num_quantiles=4, objective="mixture")
    pairs = SimpleNamespace(annotator_ids=("a", "b"))
    assert AnnotatorLikelihood.for_run(SimpleNamespace(annotator_likelihood=False, resume=False), head, pairs, 1) is None
    with pytest.raises(MinqrError) as caught:
        TrainConfig(annotator_likelihood=True, resume=True)
    assert str(caught.value) == ("--annotator-likelihood cannot --resume yet (its cached posteriors are not "
                                 "checkpointed): start the run afresh with --overwrite")
