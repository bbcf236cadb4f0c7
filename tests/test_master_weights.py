"""Float32 master weights under bfloat16 parameters (`--param-dtype bfloat16 --master-weights`,
minqr/training/master_weights.py): a step is AdamW written out in float64, rounded; updates too small
for bf16 accumulate; a training run lands nearer the float32 run than plain bf16 does, resumes bit
for bit, and holds 16 bytes a parameter. Under --fsdp (torchrun, slow) the sharded float32
parameters are the masters.
"""
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from safetensors.torch import load_file
from factories import load_tool
from test_fsdp import torchrun
from test_resume import assert_same_run, resume_options, train_until_checkpoint
from test_train import ROOT, as_argv, tiny_options, write_run_inputs

from minqr import MinqrError
from minqr.models.backbone import load_backbone
from minqr.models.reward import RewardModel
from minqr.training.config import TrainConfig
from minqr.training.loop import train
from minqr.training.master_weights import MasterWeightAdamW
from minqr.training.optimizer import make_optimizer
from minqr.training.resume import load_checkpoint

TRAIN = load_tool("train")  # tools/train.py's command

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults


def adamw_float64(weight: torch.Tensor, gradients: list, lr: float, weight_decay: float) -> list:
    """AdamW (Loshchilov & Hutter 2019) in float64: the weight after each step."""
    w = weight.double()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    after = []
    for t, g in enumerate(gradients, start=1):
        g = g.double()
        w = w * (1 - lr * weight_decay)  # decoupled decay
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
        w = w - lr * m_hat / (v_hat.sqrt() + EPS)
        after.append(w)
    return after


def test_a_step_is_adamw_in_float64_rounded_to_bfloat16():
    torch.manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(6, 5).to(torch.bfloat16))
    vector = torch.nn.Parameter((1 + 0.1 * torch.randn(5)).to(torch.bfloat16))
    groups = [{"params": [matrix], "weight_decay": 0.1}, {"params": [vector], "weight_decay": 0.0, "lr": 0.03}]
    optimizer = MasterWeightAdamW(groups, lr=0.01)
    gradients = {name: [torch.randn(p.shape).to(torch.bfloat16) for _ in range(3)]
                 for name, p in (("matrix", matrix), ("vector", vector))}
    expected = {"matrix": adamw_float64(matrix.detach(), gradients["matrix"], lr=0.01, weight_decay=0.1),
                "vector": adamw_float64(vector.detach(), gradients["vector"], lr=0.03, weight_decay=0.0)}
    for step in range(3):
        matrix.grad, vector.grad = gradients["matrix"][step].clone(), gradients["vector"][step].clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, weight, master in (("matrix", matrix, optimizer.masters[0]), ("vector", vector, optimizer.masters[1])):
            reference = expected[name][step]
            assert master.dtype == torch.float32 and weight.dtype == torch.bfloat16
            torch.testing.assert_close(master.double(), reference, rtol=0, atol=1e-6)  # float32's rounding
            assert torch.equal(weight, reference.to(torch.bfloat16)), (name, step)
            assert weight.grad is None and master.grad is None


def test_updates_too_small_for_bfloat16_accumulate_in_the_masters():
    """An update of 1e-3 to a weight of 1 is below half bf16's spacing there (2^-8): plain bf16
    AdamW leaves the weight where it is, step after step; the master moves it."""
    start = torch.ones(4, dtype=torch.bfloat16)
    plain, mastered = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    plain_adamw = torch.optim.AdamW([plain], lr=1e-3, weight_decay=0.0)
    master_adamw = MasterWeightAdamW([{"params": [mastered]}], lr=1e-3, weight_decay=0.0)
    gradients = [torch.full((4,), g, dtype=torch.bfloat16) for g in (1.0, 0.5, 2.0, 1.0, 0.25, 1.0, 1.0, 3.0)]
    for g in gradients:
        for weight, optimizer in ((plain, plain_adamw), (mastered, master_adamw)):
            weight.grad = g.clone()
            optimizer.step()
            optimizer.zero_grad()
    assert torch.equal(plain, start)
    reference = adamw_float64(start, gradients, lr=1e-3, weight_decay=0.0)[-1]
    assert float(reference[0]) < 1 - 5e-3
    torch.testing.assert_close(master_adamw.masters[0].double(), reference, rtol=0, atol=1e-6)
    assert torch.equal(mastered, reference.to(torch.bfloat16)) and not torch.equal(mastered, start)


def test_the_step_keeps_the_clipped_float32_gradients():
    """`float32_gradients()` gives the masters their gradients, clipped in float32; `step` then uses
    those and does not copy the bf16 ones again."""
    weight = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    optimizer = MasterWeightAdamW([{"params": [weight]}], lr=0.1, betas=(0.0, 0.999))  # exp_avg = the gradient
    weight.grad = torch.tensor([3.0, 4.0, 0.0], dtype=torch.bfloat16)
    (master,) = optimizer.float32_gradients()
    norm = torch.nn.utils.clip_grad_norm_([master], 1.0)
    assert norm.dtype == master.grad.dtype == torch.float32 and float(norm) == 5.0
    clipped = master.grad.clone()
    torch.testing.assert_close(clipped, torch.tensor([0.6, 0.8, 0.0]))
    optimizer.step()
    assert torch.equal(optimizer.state[master]["exp_avg"], clipped)


def test_step_hooks_run_once_and_see_the_rounded_weights():
    weight = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])  # torch then wraps AdamW's step in hooks too
    optimizer = MasterWeightAdamW([{"params": [weight]}], lr=0.1)
    seen = []
    optimizer.register_step_post_hook(lambda optimizer, args, kwargs: seen.append(weight.detach().clone()))
    weight.grad = torch.ones(2, dtype=torch.bfloat16)
    optimizer.step()
    assert len(seen) == 1 and torch.equal(seen[0], weight) and not torch.equal(weight, torch.ones(2))
    with pytest.raises(ValueError, match="no closure"):
        optimizer.step(lambda: 0.0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_run_inputs(tmp_path_factory.mktemp("inputs"))


def test_the_option_needs_bfloat16_parameters(inputs, tmp_path):
    result = CliRunner().invoke(TRAIN, as_argv(tiny_options(inputs, tmp_path / "run", master_weights=True)))
    assert result.exit_code == 1 and result.output == (
        "Error: --master-weights keeps float32 copies of bfloat16 weights: it needs --param-dtype bfloat16 "
        "(got float32, whose weights are their own masters)\n")


def test_a_run_with_master_weights_lands_nearer_the_float32_run(inputs, tmp_path):
    """12 steps at lr 3e-3: in plain bf16 the layer-norm gains (near 1) never move, since each
    update is below 1/256 of them; master weights follow the float32 run much more closely. (The
    weights themselves are compared: no weight average.)"""
    runs = {}
    for name, extra in (("float32", {}), ("bfloat16", {"param_dtype": "bfloat16"}),
                        ("master", {"param_dtype": "bfloat16", "master_weights": True})):
        train(TrainConfig(**tiny_options(inputs, tmp_path / name, ema_window=0.0, **extra)), progress=False)
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    assert {t.dtype for t in runs["master"].values()} == {torch.bfloat16}
    state = load_checkpoint(tmp_path / "master")
    assert {t.dtype for t in state.model.values()} == {torch.bfloat16}
    assert {t.dtype for t in state.optimizer["masters"]} == {torch.float32}
    assert {s["exp_avg"].dtype for s in state.optimizer["state"].values()} == {torch.float32}

    def distance(run):  # squared distance to the float32 run's weights, over all of them
        return sum(float(((run[k].double() - runs["float32"][k].double()) ** 2).sum()) for k in runs["float32"])
    print(f"squared distance to float32: master weights {distance(runs['master']):.4f}, plain bf16 "
          f"{distance(runs['bfloat16']):.4f}")
    assert distance(runs["master"]) < 0.5 * distance(runs["bfloat16"]), (distance(runs["master"]),
                                                                           distance(runs["bfloat16"]))


def test_a_run_with_master_weights_resumes_bit_for_bit(tmp_path, monkeypatch):
    inputs = write_run_inputs(tmp_path / "inputs", dropout=0.1, num_train=24)  # test_resume.py's
    extra = {"param_dtype": "bfloat16", "master_weights": True}
    straight = tmp_path / "straight"
    train(TrainConfig(**resume_options(inputs, straight, **extra)), progress=False)
    options = resume_options(inputs, tmp_path / "run", save_every=4, **extra)
    train_until_checkpoint(options, 4, monkeypatch)  # mid-epoch
    train(TrainConfig(**options, resume=True), progress=False)
    assert_same_run(tmp_path / "run", straight)
    masters = [load_checkpoint(out).optimizer["masters"] for out in (tmp_path / "run", straight)]
    assert all(torch.equal(a, b) for a, b in zip(*masters, strict=True))
    # damaged masters are named, not loaded: one of another shape broadcast into its weight before,
    # and "resumed" a run of constant weights without a word
    state_file = tmp_path / "run" / "checkpoint" / "state.pt"
    saved = torch.load(state_file, weights_only=True)
    for damage, problem in ((lambda m: m.__setitem__(0, torch.full((1,), 0.5)), "optimizer.masters[0] is float32 [1]"),
                            (lambda m: m.pop(), "optimizer.masters is a list, not the"),
                            (lambda m: m[1].fill_(float("nan")), "optimizer.masters[1] is not finite")):
        masters = [t.clone() for t in saved["optimizer"]["masters"]]
        state = {**saved, "optimizer": {**saved["optimizer"], "masters": masters}}
        damage(masters)
        torch.save(state, state_file)
        with pytest.raises(MinqrError, match=f"^--resume: {state_file} is not a checkpoint .*{re.escape(problem)}"):
            train(TrainConfig(**options, resume=True), progress=False)


def test_bytes_a_parameter_of_weights_gradients_and_optimizer_state(inputs):
    """float32 training 4 + 4 + 8, plain bf16 2 + 2 + 4, bf16 with float32 masters 2 + 2 + 4 + 8:
    every tensor the model and AdamW hold after a step and a backward (AdamW's step counters, one
    number a tensor, aside)."""
    def bytes_a_parameter(param_dtype: str, master_weights: bool) -> float:
        config = TrainConfig(param_dtype=param_dtype, master_weights=master_weights)
        torch.manual_seed(0)
        model = RewardModel(load_backbone(inputs["model"]), config.head_config())
        model = model.to(getattr(torch, param_dtype))
        optimizer = make_optimizer(model, config, torch.device("cpu"), master_weights=master_weights)
        ids = torch.randint(0, model.transformer.config.vocab_size, (2, 16))
        model(ids).float().pow(2).mean().backward()
        optimizer.step()  # AdamW's state exists from the first step on
        optimizer.zero_grad()
        model(ids).float().pow(2).mean().backward()  # the gradients of the next step
        held = {id(t): t for p in model.parameters() for t in (p, p.grad)}
        held |= {id(p): p for group in optimizer.param_groups for p in group["params"]}  # the masters, if any
        held |= {id(t): t for s in optimizer.state.values() for name, t in s.items() if name != "step"}
        parameters = sum(p.numel() for p in model.parameters())
        return sum(t.numel() * t.element_size() for t in held.values()) / parameters

    assert bytes_a_parameter("float32", False) == 16
    assert bytes_a_parameter("bfloat16", False) == 8
    assert bytes_a_parameter("bfloat16", True) == 16


@pytest.mark.slow  # two one-process runs and one under torchrun
def test_sharded_master_weights_are_the_float32_parameters(tmp_path):
    """--fsdp --master-weights: the sharded parameters and AdamW's moments stay float32 (the
    checkpoint's shards say so) while FSDP2 computes in bf16; the run lands nearer the float32 run
    than plain bf16 does, and the saved model is bf16."""
    inputs = write_run_inputs(tmp_path / "inputs", num_train=32)
    options = {"max_steps": 6, "batch_size": 8, "eval_every": 3, "save_every": 3, "device": "cpu"}
    runs = {}
    for name, extra in (("float32", {}), ("bfloat16", {"param_dtype": "bfloat16"})):
        train(TrainConfig(**tiny_options(inputs, tmp_path / name, **options, **extra)), progress=False)
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    sharded = tmp_path / "sharded"
    torchrun(ROOT / "tools" / "train.py", as_argv(tiny_options(inputs, sharded, **options, fsdp=True,
                                                               param_dtype="bfloat16", master_weights=True)))
    shards = dcp.FileSystemReader(sharded / "checkpoint" / "shards").read_metadata().state_dict_metadata
    assert {meta.properties.dtype for meta in shards.values() if hasattr(meta, "properties")} == {torch.float32}
    runs["sharded"] = load_file(sharded / "model.safetensors")
    assert {t.dtype for t in runs["sharded"].values()} == {torch.bfloat16}

    def distance(run):
        return sum(float(((run[k].double() - runs["float32"][k].double()) ** 2).sum()) for k in runs["float32"])
    # measured: 0.009 sharded with master weights, 0.032 plain bf16 in one process
    assert distance(runs["sharded"]) < 0.5 * distance(runs["bfloat16"]), (distance(runs["sharded"]),
                                                                            distance(runs["bfloat16"]))
