"""The scalar export, for tools that want one number per response (PPO trainers, RewardBench-style
evaluators): `export_scalar("runs/quantile", "runs/quantile-scalar")`.

The mean of a quantile head's N outputs is the expected reward, and since every output is a linear
function of the same features, their mean is the linear function with the averaged row
(`RewardModel.to_scalar`). The exported folder is a one-label GPT2ForSequenceClassification
(LlamaForSequenceClassification, ..., by the backbone).
"""
import os
from dataclasses import dataclass
from pathlib import Path

from minqr import hub
from minqr.errors import MinqrError
from minqr.lock import holds_output
from minqr.models.reward import (load_reward_model, model_files_in, model_folder_kind, reward_normalization,
                                 training_args)
from minqr.options import option


@dataclass
class ExportConfig:
    """The options of an export (`minqr export`). --scalar is the only export for now, so it must be
    asked for by name."""

    model: str = option(help="quantile reward model folder (train's --out), or a hub name")
    out: str = option(help="folder to write the exported model into: a new or empty one, or an earlier export "
                      "(with --overwrite)")
    scalar: bool = option(False, "export as a one-output model: the mean of the quantiles")
    overwrite: bool = option(False, "replace the model files of an earlier export in --out", in_file=False)
    normalize: bool = option(False, "the exported reward is (reward - mean) / std, with the mean and std of the "
                             "expected reward that training measured on its held-out pairs (folded into the weights)")

    def __post_init__(self):
        if not self.scalar:
            raise MinqrError("nothing to export: add --scalar (a one-output model whose reward is the mean of the "
                             "quantiles), the only export for now")


@holds_output("out")
def export_scalar(model, out, normalize: bool = False, overwrite: bool = False) -> Path:
    """Write the quantile reward model in folder `model` to folder `out` as a one-output model whose
    reward is exactly the mean of the quantiles, with its tokenizer, and its training_args.json
    plus an `exported_from` entry. With `normalize`, the reward is (that mean - m) / s, m and s the
    statistics training measured (RewardModel.normalized). A scalar model is refused, as it is
    already what this makes, unless it is to be normalised. `out` must be new or empty, or hold an
    earlier export (replaced with `overwrite`): a training run or the user's files are never written over."""
    folder = hub.fetch_model(model)
    out = Path(out).expanduser()  # as --model is: a config file's "~/m" is the home's, not a folder named "~"
    if out.is_symlink() and not out.exists():
        raise MinqrError(f"out {out} is a symbolic link to {os.readlink(out)}, which does not exist: give the path "
                         "of a folder")
    if out.exists() and out.resolve() == folder.resolve():
        raise MinqrError(f"out {out} is the model folder itself: exporting there would overwrite the "
                         "quantile model; choose another folder")
    kind = model_folder_kind(out)
    if kind == "file":
        raise MinqrError(f"out {out} is a file, not a folder: the export is a model folder; choose another path")
    if kind == "export" and not overwrite:
        raise MinqrError(f"out {out} holds an earlier export: pass --overwrite to replace it, or choose another folder")
    if kind in ("run", "other"):
        what = ("a training run" if kind == "run" else
                f"model files that minqr did not write ({', '.join(model_files_in(out))})")
        raise MinqrError(f"out {out} holds {what}, which the export would write over: choose another folder")
    reward_model, tokenizer, folder = load_reward_model(folder)
    head_config = reward_model.head_config
    if head_config.head == "scalar" and not normalize:
        raise MinqrError(f"{folder} is already a scalar reward model (one output): use it as it is; the "
                         "scalar export turns a quantile model into one")
    scalar = reward_model.to_scalar() if head_config.head == "quantile" else reward_model
    export = "scalar: the reward is the mean of the quantiles (score.weight is their rows averaged)"
    if normalize:
        mean, std = reward_normalization(reward_model, folder)
        scalar = scalar.normalized()
        export += f"; normalized: (reward - {mean!r}) / {std!r}, the shift folded into ln_f.bias"
    exported_from = {"model": str(model), "head": head_config.to_dict(), "export": export}
    args = {**training_args(folder), "exported_from": exported_from}
    return scalar.save_pretrained(out, tokenizer=tokenizer, training_args=args)
