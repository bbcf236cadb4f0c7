"""minqr's Llama vs transformers' LlamaModel: one forward+backward of a Llama-shaped model on the CPU,
the peak memory of a training step with and without activation checkpointing, and that of AdamW
steps with the weights in float32, in bfloat16, and in bfloat16 with float32 master weights.

The shape is a small Llama (8 layers, width 512, 8 query heads over 2 key/value heads, SwiGLU 1408,
vocabulary 32,000: 60M parameters), 4 x 128 tokens, float32, both models holding the same random
weights (transformers with its default SDPA attention). After timing, minqr's hidden states are
checked against transformers'. The ratio is printed after the run (benchmarks/conftest.py), and so
are the peak resident memory of a reward-model step at 8 x 512 tokens measured in fresh processes,
with and without `gradient_checkpointing`, and at 2 x 128 tokens, where the weights, gradients and
AdamW's state outweigh the activations, by --param-dtype and --master-weights.
"""
import json
import subprocess
import sys

import pytest
import torch
import transformers
from backbone_step import backbone_step as step

from minqr.models.hf_folder import hf_tensors
from minqr.models.llama import Llama, LlamaConfig

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=1024, rope_theta=500000.0, tie_word_embeddings=False)
B, T = 4, 128
ROUNDS = 10  # a step is half a second: enough rounds for a steady median
MEDIANS = {}  # implementation -> median seconds per step
PEAKS = {}  # gradient checkpointing on/off -> peak resident MB
PARAM_PEAKS = {}  # float32, bfloat16, bfloat16+master -> peak resident MB
SECTION = "llama 60M, CPU"  # of the report after the run (benchmarks/conftest.py)

# one training step of a reward model in a fresh process; prints the process's peak resident memory
MEMORY_STEP = """
import json, resource, sys, torch
from minqr.models.head import HeadConfig
from minqr.models.llama import Llama, LlamaConfig
from minqr.models.reward import RewardModel
torch.manual_seed(0)
backbone = Llama(LlamaConfig(**json.loads(sys.argv[1])))
backbone.gradient_checkpointing = sys.argv[2] == "on"
model = RewardModel(backbone, HeadConfig.make("quantile", 10)).train()
ids = torch.randint(32000, (8, 512))
model(ids).mean().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

# two AdamW steps of a reward model in a fresh process, its weights in argv[2] (with float32 masters
# if argv[3] is "master"), as minqr/training/loop.py sets them up; prints the peak resident memory
PARAM_DTYPE_STEPS = """
import json, resource, sys, torch
from minqr.models.head import HeadConfig
from minqr.models.llama import Llama, LlamaConfig
from minqr.models.reward import RewardModel
from minqr.training.config import TrainConfig
from minqr.training.optimizer import make_optimizer
param_dtype, master_weights = sys.argv[2], sys.argv[3] == "master"
torch.manual_seed(0)
model = RewardModel(Llama(LlamaConfig(**json.loads(sys.argv[1]))), HeadConfig.make("quantile", 10))
model = model.to(getattr(torch, param_dtype)).train()
config = TrainConfig(param_dtype=param_dtype, master_weights=master_weights)
optimizer = make_optimizer(model, config, torch.device("cpu"), master_weights=master_weights)
ids = torch.randint(32000, (2, 128))
for _ in range(2):
    model(ids).float().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ours = Llama(LlamaConfig.from_dict({"model_type": "llama", **SHAPE})).train()
    theirs = transformers.LlamaModel(transformers.LlamaConfig(**SHAPE)).train()
    missing, unexpected = theirs.load_state_dict(hf_tensors(ours, prefix=""), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ids = torch.randint(SHAPE["vocab_size"], (B, T))
    with torch.no_grad():
        reference = theirs(ids).last_hidden_state
    return {"minqr": ours, "transformers": theirs}, ids, reference


@pytest.mark.parametrize("implementation", ["minqr", "transformers"])
def test_forward_backward_llama(benchmark, report, setup, implementation):
    models, ids, reference = setup
    benchmark.group = "llama 60M fwd+bwd, CPU, 4x128 tokens"
    hidden = benchmark.pedantic(step, args=(models[implementation], ids), rounds=ROUNDS, iterations=1,
                                warmup_rounds=1)
    MEDIANS[implementation] = benchmark.stats.stats.median
    torch.testing.assert_close(hidden, reference, atol=1e-3, rtol=1e-3)
    if len(MEDIANS) == 2:
        ours, theirs = MEDIANS["minqr"], MEDIANS["transformers"]
        report(SECTION, "speed", f"fwd+bwd eager, 4x128 tokens, medians: minqr {ours:.3f} s, transformers "
               f"{theirs:.3f} s, transformers/minqr = {theirs / ours:.2f}x")


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_peak_memory_of_a_step(report, checkpointing):
    done = subprocess.run([sys.executable, "-c", MEMORY_STEP, json.dumps({"model_type": "llama", **SHAPE}),
                           checkpointing], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    PEAKS[checkpointing] = float(done.stdout.split()[-1])
    if len(PEAKS) == 2:
        report(SECTION, "checkpointing", f"peak resident memory of a reward-model step at 8x512 tokens: "
               f"{PEAKS['off']:.0f} MB, with gradient checkpointing {PEAKS['on']:.0f} MB "
               f"({PEAKS['off'] / PEAKS['on']:.2f}x less)")


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "bfloat16+master"])
def test_peak_memory_by_parameter_dtype(report, mode):
    param_dtype, _, master = mode.partition("+")
    done = subprocess.run([sys.executable, "-c", PARAM_DTYPE_STEPS, json.dumps({"model_type": "llama", **SHAPE}),
                           param_dtype, master or "plain"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    PARAM_PEAKS[mode] = float(done.stdout.split()[-1])
    if len(PARAM_PEAKS) == 3:
        report(SECTION, "dtypes", "peak resident memory of two AdamW steps at 2x128 tokens: "
               + ", ".join(f"{mode} {mb:.0f} MB" for mode, mb in PARAM_PEAKS.items()))
