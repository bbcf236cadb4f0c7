"""minqr: small, fast, readable RLHF reward models with distributional heads.

The package is laid out by concept (each sub-package's __init__ says what lives there):

    models/      the networks: GPT-2, the Llama family, the reward model and its head, Hugging Face
                 folders, the tokenizer
    objectives/  what a head's N outputs mean: each objective's formula and its fused C++/CUDA op
    data/        preference pairs: readers, batches
    synthetic/   the synthetic task whose true reward distributions are known: data, truth, anchors,
                 the backbone probe, the offline demo
    training/    the loop, its options, resume, processes, metrics
    study/       scoring models into scores files; their measures (divergences, bootstrap, accuracy,
                 coverage) and the report (tables, figures)
    distribution/  statistics of a reward distribution relative to a reference reply (mean, quantile,
                 CVaR, mean - lambda std, preference)
    adapters/    the distribution where RL trainers read one number: TRL's reward function, verl's
                 compute_score, `minqr serve` (an HTTP reward server, OpenRLHF's protocol)

and, beside them, what every part uses: errors.py (MinqrError, the one error users see),
atomic.py (atomic writes), lock.py (one job per output), progress.py, device.py, hub.py (hub names),
ranking.py (how a pair's label scores a model: accuracy's credit, log-likelihood).

To learn distributional reward modelling, read models/gpt2.py, objectives/references.py (the
formulas), objectives/loss.py, models/head.py, models/reward.py, data/batching.py,
training/loss.py, training/loop.py, synthetic/task.py, synthetic/truth.py and study/analysis.py, in
that order.

The names below are importable from `minqr` itself. They load on first use, so that
`import minqr.study.scores_file` (the numpy side) does not import torch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "MinqrError": "minqr.errors",
    "GPT2": "minqr.models.gpt2", "GPT2Config": "minqr.models.gpt2",
    "load_gpt2": "minqr.models.hf_folder", "save_gpt2": "minqr.models.hf_folder",
    "Llama": "minqr.models.llama", "LlamaConfig": "minqr.models.llama",
    "load_backbone": "minqr.models.backbone",
    "load_tokenizer": "minqr.models.tokenizer",
    "HeadConfig": "minqr.models.head",
    "RewardModel": "minqr.models.reward",
    "OBJECTIVES": "minqr.objectives.loss", "pair_loss": "minqr.objectives.loss",
    "fused_available": "minqr.objectives.ops",
    "TrainConfig": "minqr.training.config", "train": "minqr.training.loop",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once loaded, an ordinary attribute
        return value
    raise AttributeError(f"module 'minqr' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
