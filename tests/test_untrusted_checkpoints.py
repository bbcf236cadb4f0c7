"""Checkpoints and model folders are untrusted input: a state.pt edited into something torch.load
still reads, shards cut short or missing, a config.json that asks for more than the weights hold.
Each is one message naming the file and the key or tensor at fault, promptly: never a traceback, a
hang, or a run that exits 0 having trained nothing."""
import json
import pickle
import shutil
import signal
import time
from contextlib import contextmanager

import pytest
import torch
from click.testing import CliRunner
from factories import load_tool, random_gpt2, tiny_config
from test_resume import resume_options, train_until_checkpoint
from test_train import as_argv, write_run_inputs

from minqr.errors import MinqrError
from minqr.models.backbone import load_backbone
from minqr.models.head import HeadConfig
from minqr.models.hf_folder import save_gpt2
from minqr.models.llama import Llama, LlamaConfig
from minqr.models.reward import RewardModel
from minqr.training.checkpoint_check import read_shard_index, shard_problems
from minqr.training.sharding import load_shards, save_shards

NOW = "of the data as it is now"
START_AFRESH = "the checkpoint is damaged: start the run afresh with --overwrite instead of --resume"


@contextmanager
def within(seconds: int):
    """Fail, rather than hang the suite, if the block runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_run_inputs(tmp_path_factory.mktemp("inputs"), num_train=24)


@pytest.fixture(scope="module")
def checkpointed(inputs, tmp_path_factory):
    """The options of a run stopped after its checkpoint of step 2 (3 batches an epoch)."""
    options = resume_options(inputs, tmp_path_factory.mktemp("run") / "run", save_every=2)
    with pytest.MonkeyPatch.context() as patch:
        train_until_checkpoint(options, 2, patch)
    return options


def edit(state: dict, damage: str) -> str:
    """Damage `state` in place as named; returns the problem the message must state."""
    model, optimizer = state["model"], state["optimizer"]
    if damage == "data position past the epoch":  # for ever "resuming at step 2", training nothing
        state["position"]["batch"] = 10**9
        return f"position.batch 1000000000 is past the end of an epoch, which has 3 batches {NOW}"
    if damage == "data position elsewhere":
        state["position"] = {"epoch": 1, "batch": 1}
        return f"position (epoch 1, batch 1) is not where step 2 leaves the data (3 batches an epoch {NOW})"
    if damage == "step a string":
        state["step"] = "x"
        return "step is 'x', not a whole number >= 0"
    if damage == "step negative":  # exited 0 without training
        state["step"] = -5
        return "step is -5, not a whole number >= 0"
    if damage == "step past the end":
        state["step"] = 10**6
        return ("step 1000000 is past the run's last step, 8; position (epoch 0, batch 2) is not where step "
                f"1000000 leaves the data (3 batches an epoch {NOW}); scheduler.last_epoch is 2, not the step "
                "1000000")
    if damage == "a tensor missing":
        del model["transformer.h.1.ln_2.bias"]
        return "model is missing transformer.h.1.ln_2.bias"
    if damage == "a tensor of another shape":
        expected = list(model["score.weight"].shape)
        model["score.weight"] = torch.zeros(3, 32)
        return f"model.score.weight is float32 [3, 32], expected float32 {expected}"
    if damage == "a moment of another shape":
        optimizer["state"][0]["exp_avg"] = torch.zeros(7)
        return "optimizer.state[0].exp_avg is float32 [7], its parameter [320, 32]"
    if damage == "a moment of no shape":  # a RuntimeError deep in AdamW before
        optimizer["state"][0]["exp_avg"] = torch.tensor(0.0)
        return "optimizer.state[0].exp_avg is float32 [], its parameter [320, 32]"
    if damage == "a moment missing":  # a KeyError before
        del optimizer["state"][0]["exp_avg_sq"]
        return "optimizer.state[0] has no exp_avg_sq"
    if damage == "parameters in another order":  # two of one shape would have swapped their moments silently
        optimizer["param_groups"][0]["params"].reverse()
        count = sum(len(group["params"]) for group in optimizer["param_groups"])
        return f"optimizer.param_groups do not hold the run's {count} parameters in 3 groups"
    if damage == "schedule of numbers":  # a TypeError in torch before
        state["scheduler"]["lr_lambdas"] = [5, 5, 5]
        return ("scheduler.lr_lambdas is [5, 5, 5], not 3 × None (minqr's schedule is a function, rebuilt by the "
                "run)")
    if damage == "a method in the schedule":  # set as an attribute over LambdaLR.step: a TypeError mid-run
        state["scheduler"]["step"] = 5
        return "scheduler has step, which no schedule's state holds"
    if damage == "a generator state zeroed":  # what no check foresees: torch's own refusal, still one message
        state["rng_states"][0]["torch"] = torch.zeros_like(state["rng_states"][0]["torch"])
        return "RuntimeError: Invalid mt19937 state"
    if damage == "a learning rate that is no number":
        optimizer["param_groups"][1]["lr"] = "fast"
        return "optimizer.param_groups[1].lr is 'fast'"
    if damage == "a generator state cut":
        state["rng_states"][0]["numpy"]["keys"] = state["rng_states"][0]["numpy"]["keys"][:10]
        return "rng_states[0].numpy is not the state of numpy's MT19937 generator"
    if damage == "sharded, in a run without --fsdp":  # as a --fsdp run's state.pt, its config.json left as it was
        state["model"] = state["optimizer"] = state["average"] = None
        return "model and optimizer are None, as a --fsdp run's (in shards/), and this run is not --fsdp"
    if damage == "position not a dict":
        state["position"] = [0, 2]
        return "position is [0, 2], not {'epoch': ..., 'batch': ...}"
    if damage == "a weight of NaN":  # blamed on --lr as a divergence before, the damaged checkpoint called good
        model["transformer.h.0.ln_1.weight"][3] = float("nan")
        return "model holds NaN or inf in transformer.h.0.ln_1.weight"
    if damage == "learning rates of the schedule lost":  # a KeyError mid-run before
        del state["scheduler"]["base_lrs"]
        state["scheduler"]["lr_lambdas"] = "x"
        return ("scheduler.base_lrs is None, not 3 finite learning rates; scheduler.lr_lambdas is 'x', not 3 × None "
                "(minqr's schedule is a function, rebuilt by the run)")
    raise AssertionError(damage)


DAMAGES = ["data position past the epoch", "data position elsewhere", "step a string", "step negative",
           "step past the end", "a tensor missing", "a tensor of another shape", "a moment of another shape",
           "a learning rate that is no number", "a generator state cut", "sharded, in a run without --fsdp",
           "position not a dict", "a weight of NaN", "learning rates of the schedule lost", "a moment of no shape",
           "a moment missing", "parameters in another order", "schedule of numbers", "a method in the schedule",
           "a generator state zeroed"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_an_edited_state_pt_is_one_message_that_names_the_key(checkpointed, tmp_path, damage):
    options = {**checkpointed, "out": str(tmp_path / "run")}
    shutil.copytree(checkpointed["out"], tmp_path / "run")
    state_file = tmp_path / "run" / "checkpoint" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    problem = edit(state, damage)
    torch.save(state, state_file)
    with within(120):
        result = CliRunner().invoke(load_tool("train"), [*as_argv(options), "--resume"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    *said, last = result.output.splitlines()  # what was said of the data before: the checks need its size
    assert last == (f"Error: --resume: {state_file} is not a checkpoint this run can continue from: {problem}; "
                    f"{START_AFRESH}")
    assert not any("Error" in line or "resuming" in line for line in said), result.output


# ---- the shards of --fsdp ------------------------------------------------------------------------

@pytest.fixture
def saved_shards(tmp_path):
    """(folder, tensors): the shards of a tiny model and its AdamW state, as a --fsdp run writes them
    (in one process), and the model's tensors."""
    model = RewardModel(random_gpt2(), HeadConfig.make("quantile", 4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3, dtype=torch.long)).sum().backward()
    optimizer.step()
    with pytest.warns(UserWarning):  # no process group: saved as one process
        save_shards(tmp_path, model, optimizer)
    return tmp_path / "shards", {name: t.clone() for name, t in model.state_dict().items()}


# loading without a process group, dcp says it assumes one process
one_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def test_shards_cut_short_or_missing_are_named(saved_shards):
    shards, _ = saved_shards
    assert shard_problems(shards) == []
    files = sorted(shards.glob("*.distcp"))
    size = files[0].stat().st_size
    files[0].write_bytes(files[0].read_bytes()[: size // 2])
    assert shard_problems(shards) == [f"{files[0]} is cut short ({size // 2:,} bytes of the {size:,} its index says)"]
    files[0].unlink()
    assert shard_problems(shards) == [f"{files[0]} is missing"]
    (shards / ".metadata").unlink()
    assert shard_problems(shards) == [f"{shards / '.metadata'} is missing"]


def fresh():
    """Another model and AdamW state, of the shards' shapes, to load them into."""
    model = RewardModel(random_gpt2(seed=1), HeadConfig.make("quantile", 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    model(torch.ones(1, 3, dtype=torch.long)).sum().backward()
    optimizer.step()
    return model, optimizer


@one_process
def test_shards_load_back_and_a_damaged_one_is_one_message(saved_shards):
    """load_shards reads the shards with minqr's reader and planner (no pickle runs code): the same
    values come back; a shard file cut short is a MinqrError naming the shards' folder."""
    shards, saved = saved_shards
    model, optimizer = fresh()
    load_shards(shards.parent, model, optimizer)
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(t, saved[name]) for name, t in model.state_dict().items())
    assert optimizer.param_groups[0]["lr"] == 1e-3  # AdamW's default, as saved
    shard = sorted(shards.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MinqrError, match=f"^--resume: the shards in {shards} cannot be read "):
        load_shards(shards.parent, *fresh())


@one_process
def test_the_shards_index_is_read_without_running_code(saved_shards, tmp_path):
    shards, _ = saved_shards
    assert read_shard_index(shards).storage_data  # the real index reads
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    (shards / ".metadata").write_bytes(pickle.dumps(Payload()))
    problems = shard_problems(shards)
    assert len(problems) == 1 and problems[0].startswith(f"{shards / '.metadata'} cannot be read (UnpicklingError: "
                                                         "builtins.exec is no part of a shards index")
    with pytest.raises(MinqrError, match="builtins.exec is no part of a shards index"):
        load_shards(shards.parent, *fresh())
    assert not marker.exists()


# ---- config.json against the weights ---------------------------------------------------------------

def tiny_llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, eos_token_id=300))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("what", ["reward model", "backbone"])
def test_a_config_asking_for_more_blocks_than_the_weights_hold_is_refused_before_building(tmp_path, family, what):
    """n_layer = 10**7 with n_embd = 10**6 hung scoring: ten million blocks built (on the meta
    device, but built) before any shape was compared."""
    backbone = random_gpt2(tiny_config()) if family == "gpt2" else tiny_llama()
    if what == "reward model":
        RewardModel(backbone, HeadConfig.make("quantile", 4)).save_pretrained(tmp_path)
    elif family == "gpt2":
        save_gpt2(backbone, tmp_path)
    else:
        RewardModel(backbone, HeadConfig.make("quantile", 4)).save_pretrained(tmp_path)  # a backbone with a head
    config = json.loads((tmp_path / "config.json").read_text())
    layers, width = ("n_layer", "n_embd") if family == "gpt2" else ("num_hidden_layers", "hidden_size")
    config.update({layers: 10**7, width: 10**6})
    (tmp_path / "config.json").write_text(json.dumps(config))
    load = RewardModel.from_pretrained if what == "reward model" else load_backbone
    started = time.monotonic()
    with within(60), pytest.raises(MinqrError) as caught:
        load(tmp_path)
    blocks = "h" if family == "gpt2" else "layers"
    assert str(caught.value) == (f"{tmp_path / 'config.json'} says {layers}=10000000, but the weights in {tmp_path} "
                                 f"hold 2 blocks ({blocks}.0 ... {blocks}.1): the config does not belong to these "
                                 "weights")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("what", ["reward model", "backbone"])
def test_a_config_of_wrong_values_is_named_with_its_file(tmp_path, family, what):
    """A width of 64.0 (a float) was "invalid GPT-2 config: ...", naming neither folder nor file."""
    backbone = random_gpt2(tiny_config()) if family == "gpt2" else tiny_llama()
    RewardModel(backbone, HeadConfig.make("quantile", 4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    width = "n_embd" if family == "gpt2" else "hidden_size"
    config[width] = float(config[width])
    (tmp_path / "config.json").write_text(json.dumps(config))
    load = RewardModel.from_pretrained if what == "reward model" else load_backbone
    with pytest.raises(MinqrError) as caught:
        load(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'config.json'}: invalid "), str(caught.value)
    assert f"{width}=" in str(caught.value)
