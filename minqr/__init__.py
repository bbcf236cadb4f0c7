"""minqr: small, fast, readable RLHF reward models with quantile (distributional) heads.

Read in this order: gpt2.py (the backbone), checkpoint.py (Hugging Face files), tokenizer.py,
head.py (the objectives, with their formulas), ops.py + csrc/ (the fused kernels), data.py and
batching.py (preference pairs, shared-prefix rows), reward.py, train.py, score.py, scores.py (the
scores file), analysis.py and report.py. synthetic.py is the demo's task with known reward distributions.
"""
__version__ = "0.1.0"

from minqr.errors import MinqrError
from minqr.gpt2 import GPT2, GPT2Config
from minqr.checkpoint import load_gpt2, save_gpt2
from minqr.tokenizer import load_tokenizer
from minqr.head import OBJECTIVES, HeadConfig, pair_loss
from minqr.ops import fused_available
from minqr.reward import RewardModel
