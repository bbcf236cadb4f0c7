"""minqr's Llama vs transformers' LlamaModel: one forward+backward of a Llama-shaped model on the CPU,
and the peak memory of a training step with and without activation checkpointing.

The shape is a small Llama (8 layers, width 512, 8 query heads over 2 key/value heads, SwiGLU 1408,
vocabulary 32,000: 60M parameters), 4 x 128 tokens, float32, both models holding the same random
weights (transformers with its default SDPA attention). After timing, minqr's hidden states are
checked against transformers'. The last tests print the ratio, and the peak resident memory of a
reward-model step at 8 x 512 tokens measured in fresh processes, with and without
`gradient_checkpointing` (run with -s to see them).
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
def test_forward_backward_llama(benchmark, setup, implementation):
    models, ids, reference = setup
    benchmark.group = "llama 60M fwd+bwd, CPU, 4x128 tokens"
    hidden = benchmark.pedantic(step, args=(models[implementation], ids), rounds=ROUNDS, iterations=1,
                                warmup_rounds=1)
    MEDIANS[implementation] = benchmark.stats.stats.median
    torch.testing.assert_close(hidden, reference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_peak_memory_of_a_step(checkpointing):
    done = subprocess.run([sys.executable, "-c", MEMORY_STEP, json.dumps({"model_type": "llama", **SHAPE}),
                           checkpointing], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    PEAKS[checkpointing] = float(done.stdout.split()[-1])


def test_report(capsys):
    if len(MEDIANS) < 2 or len(PEAKS) < 2:
        pytest.skip("needs the timings and the memory measurements above (run the whole file)")
    with capsys.disabled():
        print()
        print(f"llama 60M fwd+bwd eager, medians: minqr {MEDIANS['minqr']:.3f} s, "
              f"transformers {MEDIANS['transformers']:.3f} s, transformers/minqr = {MEDIANS['transformers'] / MEDIANS['minqr']:.2f}x")
        print(f"peak resident memory of a reward-model step at 8x512 tokens: {PEAKS['off']:.0f} MB, with "
              f"gradient checkpointing {PEAKS['on']:.0f} MB ({PEAKS['off'] / PEAKS['on']:.2f}x less)")
