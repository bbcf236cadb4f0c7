"""The weight average (--ema-window, minqr/training/averaging.py): the update against the formula
written out in float64, the swap in and out, a training run whose saved model is the average of
the weights it went through, and the option's checks. Resuming with an average is bit-identical:
tests/test_resume.py and tests/test_fsdp.py train the mixture head, which averages by default."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_options, write_run_inputs

import minqr.training.loop
from minqr import MinqrError, RewardModel
from minqr.training.averaging import WeightAverage
from minqr.training.config import TrainConfig
from minqr.training.loop import train
from minqr.training.metrics import read_metrics


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_run_inputs(tmp_path_factory.mktemp("inputs"))


def test_the_average_is_the_formula_in_float64():
    """A copy up to start_step, then a <- d a + (1 - d) w after every step; in float32 (also for
    bf16 weights)."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = torch.nn.Linear(5, 3).to(dtype)
        decay, start = 0.8, 2
        average = WeightAverage(model, decay, start_step=start)
        reference = [p.detach().double().clone() for p in model.parameters()]
        for step in range(1, 9):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            average.update(step)
            for i, p in enumerate(model.parameters()):
                w = p.detach().double()
                reference[i] = w.clone() if step <= start else decay * reference[i] + (1 - decay) * w
        assert all(a.dtype == torch.float32 for a in average.averages)
        for got, want in zip(average.averages, reference):
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_swapped_in_puts_the_average_in_and_the_weights_back():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 2)
    average = WeightAverage(model, 0.5, start_step=0)
    own = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for a in average.averages:
            a.add_(1.0)
    with pytest.raises(RuntimeError, match="inside"):
        with average.swapped_in():
            for p, a in zip(model.parameters(), average.averages):
                assert torch.equal(p, a)
            raise RuntimeError("inside")
    for p, o in zip(model.parameters(), own):
        assert torch.equal(p, o)  # bit for bit, even after an error inside


def test_a_run_saves_the_average_of_the_weights_it_went_through(inputs, tmp_path, monkeypatch):
    """Two runs of the same seed, with and without the average, go through the same weights (the
    average does not feed back into training). The weights of the one without, recorded after every
    optimizer step and averaged here in float64, are the other's saved model."""
    steps, window, warmup = 12, 0.5, 0.1
    recorded, real_make_optimizer = [], minqr.training.loop.make_optimizer

    def recording(model, config, device, **options):
        optimizer = real_make_optimizer(model, config, device, **options)
        optimizer.register_step_post_hook(lambda *_: recorded.append(
            {name: p.detach().double().clone() for name, p in model.named_parameters()}))
        return optimizer

    monkeypatch.setattr(minqr.training.loop, "make_optimizer", recording)
    options = dict(max_steps=steps, warmup=warmup, eval_every=0, save_every=0)
    train(TrainConfig(**tiny_options(inputs, tmp_path / "plain", ema_window=0.0, **options)), progress=False)
    monkeypatch.setattr(minqr.training.loop, "make_optimizer", real_make_optimizer)
    train(TrainConfig(**tiny_options(inputs, tmp_path / "averaged", ema_window=window, **options)), progress=False)
    assert len(recorded) == steps

    decay, start = 1 - 1 / (window * steps), round(warmup * steps)
    reference = {}
    for step, weights in enumerate(recorded, start=1):
        reference = {name: w if step <= start else decay * reference[name] + (1 - decay) * w
                     for name, w in weights.items()}
    saved = dict(RewardModel.from_pretrained(tmp_path / "averaged").named_parameters())
    plain = dict(RewardModel.from_pretrained(tmp_path / "plain").named_parameters())
    assert set(saved) <= set(reference)  # the response-bag layer is averaged too, but not saved
    for name, p in saved.items():
        torch.testing.assert_close(p.detach().double(), reference[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(plain[name].detach().double(), recorded[-1][name], rtol=0, atol=0, msg=name)
    assert not torch.equal(saved["score.weight"], plain["score.weight"])
    metrics = [json.loads(line) for line in (tmp_path / "averaged" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite([m["eval_loss"] for m in metrics if "eval_loss" in m]).all()


def test_evaluating_the_average_does_not_change_the_training(inputs, tmp_path):
    """An evaluation after every step swaps the average in and the weights out again each time: the
    run goes through the weights of a run that evaluates only at its end."""
    for every in (0, 1):
        train(TrainConfig(**tiny_options(inputs, tmp_path / str(every), eval_every=every, save_every=0)),
              progress=False)
    losses = [[m["loss"] for m in read_metrics(tmp_path / str(every) / "metrics.jsonl") if "loss" in m]
              for every in (0, 1)]
    assert losses[0] == losses[1]
    saved = [load_file(tmp_path / str(every) / "model.safetensors") for every in (0, 1)]
    assert all(torch.equal(saved[0][name], saved[1][name]) for name in saved[0])


def test_with_master_weights_the_masters_are_averaged():
    """The sources of the average can be other tensors than the weights (the float32 masters of bf16
    weights); the average is swapped into the weights, rounded."""
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    masters = {p: p.detach().float() + 1e-3 for p in model.parameters()}  # finer than bf16 holds
    average = WeightAverage(model, 0.5, start_step=0, sources=masters)
    for master in masters.values():
        master.add_(1e-3)
    average.update(1)
    for p, a in zip(model.parameters(), average.averages):
        torch.testing.assert_close(a, p.detach().float() + 1.5e-3, rtol=0, atol=1e-7)
    with average.swapped_in():
        for p, a in zip(model.parameters(), average.averages):
            assert torch.equal(p, a.to(torch.bfloat16))


def test_defaults_and_checks(inputs, tmp_path):
    def config(**options):
        return TrainConfig(**tiny_options(inputs, tmp_path / "run", **options))

    assert config().ema_window == pytest.approx(1 / 3)  # mixture, the default quantile objective
    assert config(objective="independent").ema_window == pytest.approx(1 / 3)
    assert config(objective="paper").ema_window == 0 and config(head="scalar").ema_window == 0
    assert config(head="scalar", ema_window=0.25).ema_window == 0.25
    for bad in (-0.1, 0.6):
        with pytest.raises(MinqrError) as error:
            config(ema_window=bad)
        assert str(error.value) == (f"--ema-window is a share of the steps in [0, 0.5], 0 for no averaging (got {bad}): "
                                    "a longer window would keep too much of the weights at the end of the warm-up")
    with pytest.raises(MinqrError, match=r"^--ema-window must be a finite number \(got nan\)$"):
        config(ema_window=float("nan"))  # as every float option (minqr.options.check_options)
