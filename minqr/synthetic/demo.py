"""The offline demo (`minqr train --demo`): a tiny random GPT-2 trained on the synthetic task.

    config = TrainConfig.from_options(demo=True, head="quantile")   # demo_defaults fill in the rest

The task is made on first use in the folder of `--data` (OUT/../demo-data unless given), with the
tiny model beside it as `--model`; a task made by `minqr synthetic` (another variant, size or
seed) is used as it is. The demo's end line compares the held-out accuracy with the task's Bayes
accuracy, the best any model can reach.
"""
import json
from pathlib import Path

from minqr.synthetic.folder import make_synthetic_task


def demo_defaults(head: str, out=None, data=None) -> dict:
    """The demo: a tiny random-init GPT-2 on the synthetic task in OUT/../demo-data (made on first
    use, 40,000 training pairs; its texts are a few dozen tokens), or in the folder of `data` (e.g.
    another variant, made by tools/synthetic.py). A model trained from scratch takes a far larger
    learning rate than a pretrained one being fine-tuned. 3,000 steps (96,000 pairs, 2.4 epochs)
    take one to two minutes on a 2-core CPU: that many were needed for the quantile head's N outputs
    to follow the annotators' disagreement (README)."""
    out = Path(out or Path("runs") / "demo" / head)
    data = Path(data).parent if data else out.parent / "demo-data"
    return dict(out=str(out), model=str(data / "model"), data=str(data / "train.jsonl"),
                eval_data=str(data / "test.jsonl"), max_length=128, batch_size=32, lr=2e-3, warmup=0.05,
                weight_decay=0.01, max_steps=3000, eval_every=1000, save_every=1000)


def prepare_demo_data(data, procs, say) -> float:
    """Make the synthetic task in the folder of `data` on first use (process 0 of `procs`; the others
    wait), announcing it with `say`; returns its Bayes accuracy."""
    folder = Path(data).parent
    task_file = folder / "task.json"
    with procs.main_first():
        if not task_file.is_file():
            say(f"demo: generating the synthetic task in {folder}")
            make_synthetic_task(folder, seed=0)
    return json.loads(task_file.read_text())["bayes_accuracy"]
