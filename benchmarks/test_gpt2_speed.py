"""minqr's GPT2 vs transformers' GPT2Model: one forward+backward at the 124M shape on the CPU.

4 x 128 tokens, float32, eager and torch.compile'd, both models holding the same random weights
(transformers with its default SDPA attention). A step takes 1-2 s on a 2-core CPU and each
compile a minute or two, so the compiled rounds are few. After timing, each variant's output is
checked against transformers' eager one. The speed ratios are printed after the run
(benchmarks/conftest.py; the times are also in pytest-benchmark's table, group "gpt2-124M").

The eager target (minqr no slower than transformers) is checked by `test_eager_side_by_side`: the
two models' steps alternate, round by round, so that a machine whose speed drifts (another job,
the clock) slows both alike, and the ratio is of medians over enough rounds to trust them.
"""
import statistics
import time

import pytest
import torch
import transformers
from backbone_step import backbone_step as step

from minqr.models.gpt2 import GPT2, GPT2Config
from minqr.models.hf_folder import hf_tensors

B, T = 4, 128
ROUNDS = 3
SIDE_BY_SIDE_ROUNDS = 12  # alternating eager steps of each model
MEANS = {}  # (implementation, mode) -> mean seconds per step


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = GPT2Config.preset("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ours = GPT2(config).train()
    fields = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    theirs = transformers.GPT2Model(transformers.GPT2Config(**fields)).train()
    theirs.load_state_dict(hf_tensors(ours, prefix=""))
    ids = torch.randint(config.vocab_size, (B, T))
    with torch.no_grad():
        reference = theirs(ids).last_hidden_state
    return {"minqr": ours, "transformers": theirs}, ids, reference


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("implementation", ["minqr", "transformers"])
def test_forward_backward_124m(benchmark, report, setup, implementation, mode):
    models, ids, reference = setup
    model = models[implementation]
    if mode == "compiled":
        # transformers' GPT2Model does not compile as one graph; minqr's must
        model = torch.compile(model, fullgraph=implementation == "minqr")
        step(model, ids)  # compile outside the timing
    benchmark.group = "gpt2-124M fwd+bwd, CPU, 4x128 tokens"
    hidden = benchmark.pedantic(step, args=(model, ids), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    MEANS[implementation, mode] = benchmark.stats.stats.mean
    torch.testing.assert_close(hidden, reference, atol=1e-3, rtol=1e-3)
    for key in [m for m in ("eager", "compiled") if ("minqr", m) in MEANS and ("transformers", m) in MEANS]:
        ours, theirs = MEANS["minqr", key], MEANS["transformers", key]
        report("gpt2-124M fwd+bwd, CPU, 4x128 tokens, means", key, f"{key}: minqr {ours:.3f} s, transformers "
               f"{theirs:.3f} s, transformers/minqr = {theirs / ours:.2f}x")
    if ("minqr", "compiled") in MEANS and ("transformers", "eager") in MEANS:
        report("gpt2-124M fwd+bwd, CPU, 4x128 tokens, means", "across", "minqr compiled vs transformers eager: "
               f"{MEANS['transformers', 'eager'] / MEANS['minqr', 'compiled']:.2f}x")


def test_eager_side_by_side(setup, report):
    """minqr's eager step against transformers', alternating: the target is no slower (median ratio >= 1)."""
    models, ids, reference = setup
    times = {name: [] for name in models}
    for name in models:
        step(models[name], ids)  # warm-up
    for _ in range(SIDE_BY_SIDE_ROUNDS):
        for name, model in models.items():
            started = time.perf_counter()
            hidden = step(model, ids)
            times[name].append(time.perf_counter() - started)
            torch.testing.assert_close(hidden, reference, atol=1e-3, rtol=1e-3)
    ours, theirs = (statistics.median(times[name]) for name in ("minqr", "transformers"))
    report("gpt2-124M fwd+bwd, CPU, 4x128 tokens, eager side by side", "medians",
           f"{SIDE_BY_SIDE_ROUNDS} alternating rounds, {torch.get_num_threads()} threads: median minqr {ours:.3f} s, "
           f"transformers {theirs:.3f} s, transformers/minqr = {theirs / ours:.2f}x "
           f"(per-round ratios {min(t / o for o, t in zip(times['minqr'], times['transformers'])):.2f}-"
           f"{max(t / o for o, t in zip(times['minqr'], times['transformers'])):.2f}x)")
    assert theirs / ours >= 1.0, f"minqr's eager step is slower than transformers': {theirs / ours:.2f}x"
