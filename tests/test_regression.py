"""The objectives changed nothing for the runs that existed before them: a quantile head trained by
`paper` and a scalar head (bradley_terry) reproduce, bit for bit, the numbers minqr gave before the
objectives were introduced (tests/data/before_objectives.json, recorded then by this same function on
the same inputs: every logged loss, accuracy and learning rate, every evaluation, and a digest of
every tensor of the saved model).

Bit-for-bit comparisons hold on one kind of machine and torch build (the float rounding of the
matrix products depends on the CPU's vector width): the file was made on this project's CPU
machine with torch 2.13.0, and the test skips elsewhere.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import TIMING_KEYS, tiny_options, write_run_inputs

from minqr.training.config import TrainConfig
from minqr.training.loop import train
from minqr.training.metrics import read_metrics

RECORDED = Path(__file__).parent / "data" / "before_objectives.json"


def tensor_digest(folder: Path) -> str:
    """sha256 over the names and bytes of every tensor of a saved model, in name order."""
    tensors = load_file(str(folder / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_tiny_training(folder: Path, head: str, **options) -> dict:
    """12 steps of a tiny GPT-2 with dropout 0.1 (so the random streams matter too); what it logged
    (timings aside) and the digest of the model it saved."""
    inputs = write_run_inputs(folder / "inputs", dropout=0.1)
    out = folder / head
    train(TrainConfig(**tiny_options(inputs, out, head=head, **options)), progress=False)
    metrics = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_metrics(out / "metrics.jsonl")]
    return {"metrics": metrics, "model_sha256": tensor_digest(out)}


@pytest.mark.skipif(torch.__version__.split("+")[0] != "2.13.0", reason="recorded with torch 2.13.0")
@pytest.mark.parametrize("head,options", [("quantile", {"objective": "paper"}), ("scalar", {})])
def test_runs_from_before_the_objectives_are_reproduced_bit_for_bit(tmp_path, head, options):
    recorded = json.loads(RECORDED.read_text())["runs"][head]
    assert run_tiny_training(tmp_path, head, **options) == recorded
