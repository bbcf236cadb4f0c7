"""The offline demo (`minqr train --demo`): a tiny random GPT-2 trained on the synthetic task.

    config = TrainConfig.from_options(demo=True, head="quantile")   # demo_defaults fill in the rest

The task is made on first use in OUT/../demo-data, with the tiny model beside it as `--model`; a
task made by `minqr synthetic` (another variant, size or seed) and named by `--data` is used as it
is (the demo never writes a task into a folder named for data). The demo's end line compares the
held-out accuracy with the task's Bayes accuracy, the best any model can reach.
"""
import json
from pathlib import Path

from minqr.errors import MinqrError
from minqr.lock import hold_output
from minqr.reading import loads
from minqr.synthetic.folder import make_synthetic_task


def demo_defaults(head: str, out=None, data=None) -> dict:
    """The demo: a tiny random-init GPT-2 on the synthetic task in OUT/../demo-data (made on first
    use, 40,000 training pairs; its texts are a few dozen tokens), or in the folder of `data` (e.g.
    another variant, made by tools/synthetic.py). A model trained from scratch takes a far larger
    learning rate than a pretrained one being fine-tuned. 3,000 steps (96,000 pairs, 2.4 epochs)
    take one to two minutes on a 2-core CPU: that many were needed for the quantile head's N outputs
    to follow the annotators' disagreement (docs/objectives.md)."""
    out = Path(out or Path("runs") / "demo" / head)
    data = Path(data).parent if data else demo_task_folder(out)
    return dict(out=str(out), model=str(data / "model"), data=str(data / "train.jsonl"),
                eval_data=str(data / "test.jsonl"), max_length=128, batch_size=32, lr=2e-3, warmup=0.05,
                weight_decay=0.01, max_steps=3000, eval_every=1000, save_every=1000)


def demo_task_folder(out) -> Path:
    """Where the demo run `out` makes its synthetic task when --data names none: the only folder
    --demo ever writes a task into (a folder the user named for data is theirs)."""
    return Path(out).parent / "demo-data"


def prepare_demo_data(data, out, procs, say) -> float:
    """Make the synthetic task in the folder of `data` on first use (process 0 of `procs`; the others
    wait), announcing it with `say`, but only in the demo run `out`'s own task folder; returns the
    task's Bayes accuracy."""
    folder = Path(data).parent
    task_file = folder / "task.json"
    if not task_file.is_file() and folder.resolve() != demo_task_folder(out).resolve():
        missing = "" if Path(data).exists() else f" ({Path(data).name} does not exist there either)"
        raise MinqrError(f"--demo --data {data}: its folder holds no synthetic task (task.json){missing}, and "
                         "--demo makes its task only in a folder of its own, never in one named for data. "
                         f"Make a task there with `minqr synthetic --out {folder}`, or leave out --data "
                         f"(the demo then makes its task in {demo_task_folder(out)})")
    with procs.main_first():
        if not task_file.is_file():
            # two demo runs side by side share the task: one makes it, the other is told to wait
            with hold_output(folder, "the demo's task folder", say=say):
                if not task_file.is_file():  # (made by the holder of the lock before us)
                    say(f"demo: generating the synthetic task in {folder}")
                    make_synthetic_task(folder, seed=0)
    try:
        facts = loads(task_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        facts = error
    accuracy = facts.get("bayes_accuracy") if isinstance(facts, dict) else None
    if not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool):
        why = facts if isinstance(facts, Exception) else "it has no bayes_accuracy, a number"
        raise MinqrError(f"--demo: {task_file} is not the task.json of a synthetic task ({why}); make the task "
                         f"again with `minqr synthetic --out {folder}`, or leave out --data")
    return float(accuracy)
