"""TrainConfig: every option of a training run, with its default and its help text, and the checks
that run before any work. `minqr train` (and tools/train.py) builds its command-line options from
these fields (minqr_cli/options.py), so the options, their defaults and their `--help` live here only.

With `--demo`, `demo_defaults` fills in what the offline demo needs (a tiny random GPT-2 on the
synthetic task, minqr/synthetic/demo.py).
"""
import math
from dataclasses import dataclass
from pathlib import Path

from minqr.device import DTYPES
from minqr.errors import MinqrError
from minqr.models.head import HEADS, HeadConfig
from minqr.objectives.loss import OBJECTIVES, objectives_help
from minqr.options import check_options, option, seed_option
from minqr.synthetic.demo import demo_defaults
from minqr.training.metrics import REPORT_TO, check_report_to

# The largest learning rate accepted: AdamW's first step moves a weight by about 3 x lr / 0.1 (its
# bias correction), which must stay far below float32's 3.4e38.
MAX_LEARNING_RATE = 1e30

# Keys of a run's training_args.json that record the run rather than set it up: the file is a
# config for `minqr train --config` all the same, and these keys are passed over there.
RUN_FACTS = ("processes", "device_used", "steps_per_epoch", "total_steps", "warmup_steps", "train_pairs", "eval_pairs",
             "model_path", "torch", "exported_from")


@dataclass
class TrainConfig:
    """Every option of a training run. Defaults train GPT-2 (124M) on HH-RLHF helpful-base."""

    # the model and its loss
    head: str = option("quantile", "reward head: 'quantile' (N quantiles of the reward, the distributional "
                       "head) or 'scalar' (one reward, the Bradley-Terry baseline)", HEADS)
    num_quantiles: int | None = option(None, "number of outputs N of the quantile head [default: 20 for mixture "
                                       "and independent, 10 (the paper's) for paper; the scalar head has 1]")
    objective: str | None = option(None, "how the N outputs are trained and what they mean (minqr/objectives/): "
                                   + objectives_help()
                                   + " [default: mixture; bradley_terry is the scalar head's (--head scalar) and only its]",
                                   tuple(OBJECTIVES))
    kappa: float | None = option(None, "objective paper: Huber threshold κ of the quantile term [default: 1.0]")
    lam: float | None = option(None, "objective paper: weight λ of the quantile-Huber term [default: 1.0]")
    margin: float | None = option(None, "objective paper: margin m, the chosen response's quantiles are pulled "
                                  "towards the rejected one's plus m, and the rejected one's towards the chosen "
                                  "minus m [default: 1.0]")
    bag_coef: float | None = option(None, "weight of the response bag-of-words auxiliary: the pooled state of "
                                    "each response predicts which tokens the response holds "
                                    "(minqr/training/loss.py, ResponseBag), so that it keeps what annotators "
                                    "disagree about; its layer is not saved [default: 5 for mixture and "
                                    "independent, else 0]", low=0)
    head_lr_scale: float | None = option(None, "the head's learning rate is --lr times this [default: 2.5 for "
                                         "mixture and independent, else 1]", low=0, low_open=True, high=math.inf,
                                         high_open=True, out_of_range="must be positive and finite (got {value})")
    head_weight_decay: float | None = option(None, "AdamW weight decay of the head [default: 0 for mixture and "
                                             "independent, else --weight-decay]", low=0)
    ema_window: float | None = option(None, "average the weights: an exponential moving average whose time constant "
                                      "is this share of the run's steps, at most 0.5, from the end of the warm-up on, "
                                      "is what evaluation uses and what is saved (minqr/training/averaging.py; at 1/3 "
                                      "the last third of the steps carries 63% of its weight); 0: off [default: 1/3 "
                                      "for mixture and independent, else 0]", low=0, high=0.5,
                                      out_of_range="is a share of the steps in {range}, 0 for no averaging (got "
                                      "{value}): a longer window would keep too much of the weights at the end of "
                                      "the warm-up")
    center_coef: float = option(0.0, "weight of TRL's reward-centring term, mean((μ_c + μ_r)²) on the "
                                "expected rewards (e.g. 0.01)", low=0)
    lm_coef: float = option(0.0, "weight of MOSS-RLHF's language-model loss, the mean next-token "
                            "cross-entropy on the chosen response tokens", low=0)
    dropout: float | None = option(None, "dropout probability of the backbone, after its residual branches, on "
                                   "its embeddings and its attention [default: the checkpoint's own, 0.1 for the "
                                   "released GPT-2s; 0 is TRL's choice for reward models]", low=0, high=1,
                                   high_open=True, out_of_range="is a probability in {range} (got {value})")
    model: str = option("gpt2", "backbone: a local Hugging Face folder of a GPT-2, Llama, Qwen2 or Mistral model, "
                        "or a hub name (gpt2, Qwen/Qwen2.5-0.5B, ...) fetched through huggingface_hub")
    tokenizer: str | None = option(None, "tokenizer folder [default: the model folder]")
    # the data
    data: str = option("hh-rlhf:helpful-base", "training pairs: a .jsonl(.gz), Parquet or Arrow file, a folder "
                       "laid out like hh-rlhf (with --subset), hh-rlhf:SUBSET fetched through huggingface_hub, or "
                       "hf:NAME[:SPLIT] loaded by datasets (Parquet, Arrow, hf: need pip install 'minqr[data]')")
    subset: str | None = option(None, "subset of a folder given as --data, e.g. helpful-base; for hf:NAME, the "
                                "data set's configuration")
    eval_data: str | None = option(None, "held-out pairs, same forms as --data [default: the test split "
                                   "of --data when it is a folder, hh-rlhf:SUBSET or hf:NAME; none for a file "
                                   "or hf:NAME:SPLIT]")
    max_length: int = option(512, "tokens kept of each text, cut from the left so that the final "
                             "responses survive", low=1)
    shared_prefix: bool = option(True, "run the common prefix of a pair's two texts once (same rewards "
                                 "and gradients as two separate sequences, fewer tokens)")
    skip_bad: bool = option(False, "skip malformed data lines and count them instead of stopping")
    annotator_field: str | None = option(None, "the field of the annotators' ids [default: annotator]: a mixture "
                                         "model is saved with the posterior over its kinds of each annotator of "
                                         "--data (annotators.json), for personal rewards")
    annotator_likelihood: bool = option(False, "mixture heads on data that names its annotators: after one pass "
                                        "by the per-label objective, train by the annotator-level likelihood "
                                        "(each annotator's labels all from one kind; minqr/training/loss.py); its "
                                        "scale settles slowly: a line at the end of training says whether it did "
                                        "(docs/personal.md)")
    # the optimisation
    batch_size: int = option(32, "pairs per optimizer step, over all processes and accumulation steps", low=1)
    grad_accum: int = option(1, "split each step's batch into this many micro-batches run one after "
                             "the other (less memory, same result)", low=1)
    lr: float = option(1e-5, "peak learning rate of AdamW", low=0, low_open=True, high=MAX_LEARNING_RATE,
                       out_of_range="must be positive and at most {high:g} (got {value}): AdamW moves a weight by "
                       "about the learning rate each step, and float32 overflows beyond")
    weight_decay: float = option(0.01, "AdamW weight decay, on weight matrices only (not on biases "
                                 "and layer-norm gains)", low=0)
    warmup: float = option(0.05, "fraction of the steps spent warming the learning rate up linearly; "
                           "it then decays to 0 along a cosine", low=0, high=1, high_open=True,
                           out_of_range="is a fraction of the steps, in {range} (got {value})")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", low=0)
    epochs: int = option(1, "passes over the training pairs", low=1)
    max_steps: int | None = option(None, "stop after this many optimizer steps [default: --epochs "
                                   "passes]; more steps than the epochs hold repeat the data", low=1)
    seed: int = seed_option("seed of the head's initialisation, the data order and dropout")
    # the run
    out: str | None = option(None, "run folder: the trained model, metrics.jsonl, curves.png, "
                             "checkpoint/ [default: runs/HEAD, or runs/demo/HEAD with --demo]")
    report_to: str = option("none", "also log the metrics to: tensorboard (event files in OUT/tensorboard/; needs "
                            "the optional extra minqr[tensorboard]); metrics.jsonl is always written", REPORT_TO)
    eval_every: int = option(200, "evaluate on the held-out pairs every this many steps (0: only at "
                             "the end)", low=0)
    save_every: int = option(200, "write checkpoint/ every this many steps (0: only at the end)", low=0)
    device: str = option("auto", "cpu, cuda, cuda:1, ...; auto: cuda when there is a GPU (under torchrun "
                         "each process its own), else cpu")
    dtype: str = option("auto", "compute precision; auto: bfloat16 autocast on GPU (the weights stay "
                        "float32), float32 on CPU", tuple(DTYPES))
    grad_checkpoint: bool = option(False, "activation checkpointing: keep each transformer block's input only and "
                                   "recompute the block in the backward (less memory, about a third more compute; "
                                   "the same numbers)")
    fsdp: bool = option(False, "under torchrun, shard the parameters, gradients and AdamW state over the processes "
                        "(PyTorch's FSDP2, one unit per transformer block) instead of copying them into each "
                        "(DDP): for models that do not fit one device; its checkpoint is written in shards")
    param_dtype: str = option("float32", "precision the weights, their gradients and AdamW's moments are kept in: "
                              "bfloat16 halves that memory (8 bytes a parameter instead of 16) but rounds away "
                              "updates smaller than about 1/256 of a weight; the objectives still compute in "
                              "float32", ("float32", "bfloat16"))
    master_weights: bool = option(False, "with --param-dtype bfloat16: the optimizer keeps a float32 copy of each "
                                  "weight and steps AdamW on it; the bf16 weight is its rounding. The weights and "
                                  "gradients stay bf16 (2 + 2 bytes), the copy and AdamW's float32 moments add "
                                  "4 + 8: 16 bytes a parameter, as float32 training, but the matrix products and "
                                  "activations stay bf16 and updates smaller than 1/256 of a weight are not lost")
    compile: bool = option(False, "torch.compile the backbone (faster steps after a slow first one)")
    resume: bool = option(False, "continue the run in --out from its checkpoint/: give the same "
                          "options as the first time, plus --resume", in_file=False)
    overwrite: bool = option(False, "start afresh even if --out already holds a run (its files are "
                             "replaced)", in_file=False)
    demo: bool = option(False, "offline demo: generate a synthetic preference task (minqr.synthetic) "
                        "with a tiny random GPT-2 in OUT/../demo-data on first use and train on it; its own "
                        "defaults (3,000 steps of 32 pairs, --lr 2e-3, --max-length 128) replace the ones shown "
                        "here, and options given override them")

    def __post_init__(self):
        # the head's own rules (HeadConfig.make): scalar is N = 1, bradley_terry; quantile defaults to
        # the default objective and that objective's N (20 for mixture and independent, 10 for paper);
        # kappa, lam and margin belong to the paper objective
        try:
            head = self.head_config()
        except MinqrError as error:
            raise MinqrError(f"options --head, --num-quantiles, --objective, --kappa, --lam, --margin: {error}") from None
        self.num_quantiles, self.objective = head.num_quantiles, head.objective
        self.kappa, self.lam, self.margin = (head.hyperparameters.get(name) for name in ("kappa", "lam", "margin"))
        defaults = head.spec.training  # what the objective needs unless told otherwise
        self.bag_coef = defaults.bag_coef if self.bag_coef is None else self.bag_coef
        self.head_lr_scale = defaults.head_lr_scale if self.head_lr_scale is None else self.head_lr_scale
        self.ema_window = defaults.ema_window if self.ema_window is None else self.ema_window
        if self.head_weight_decay is None:
            self.head_weight_decay = self.weight_decay if defaults.head_weight_decay is None else \
                defaults.head_weight_decay
        self.out = self.out or str(Path("runs") / self.head)
        if self.demo and ":" in self.data and not Path(self.data).exists():
            # a hub source, such as the default hh-rlhf:helpful-base (TrainConfig(demo=True) without
            # from_options, which fills in the demo's own data): the demo trains on a synthetic task
            raise MinqrError(f"--demo trains on a synthetic task, and --data {self.data!r} is a hub data set: leave "
                             "--data out, or give a synthetic task's train.jsonl (in Python, build the config with "
                             "TrainConfig.from_options(demo=True, ...), which fills in the demo's data and model)")
        check_options(self)  # every range and choice the fields declare
        check_report_to(self.report_to)
        # what no single option's range says: how options go together
        problems = []
        if not self.lr * self.head_lr_scale <= MAX_LEARNING_RATE:
            problems.append(f"--lr {self.lr:g} times --head-lr-scale {self.head_lr_scale:g} is the head's learning "
                            f"rate, and must be at most {MAX_LEARNING_RATE:g}")
        if self.fsdp and (self.compile or self.lm_coef > 0):
            problems.append("--fsdp goes without --compile and --lm-coef for now (neither was tested sharded)")
        if self.annotator_likelihood and self.resume:
            # its cached posteriors are not in the checkpoint: a resumed run would re-warm and differ
            problems.append("--annotator-likelihood cannot --resume yet (its cached posteriors are not "
                            "checkpointed): start the run afresh with --overwrite")
        if self.master_weights and self.param_dtype != "bfloat16":
            problems.append(f"--master-weights keeps float32 copies of bfloat16 weights: it needs --param-dtype "
                            f"bfloat16 (got {self.param_dtype}, whose weights are their own masters)")
        if problems:
            raise MinqrError("; ".join(problems))
        self.micro_batch_size(processes=1)

    def micro_batch_size(self, processes: int) -> int:
        """The pairs of one micro-batch when `processes` share each step: --batch-size over the
        processes and --grad-accum, which must divide it."""
        per_process = self.batch_size // processes
        if per_process * processes != self.batch_size or per_process % self.grad_accum:
            raise MinqrError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"
                             + (f" × {processes} processes" if processes > 1 else ""))
        return per_process // self.grad_accum

    def head_config(self) -> HeadConfig:
        return HeadConfig.make(self.head, self.num_quantiles, self.objective, kappa=self.kappa, lam=self.lam,
                               margin=self.margin)

    @classmethod
    def from_options(cls, **given) -> "TrainConfig":
        """A config from the options a user actually gave: with `demo=True` the demo's defaults fill
        in the rest (see `demo_defaults`), otherwise the field defaults."""
        if given.get("demo"):
            given = {**demo_defaults(given.get("head", "quantile"), given.get("out"), given.get("data")), **given}
        return cls(**given)
