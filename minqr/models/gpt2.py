"""GPT-2 in plain PyTorch, laid out like Hugging Face's so that its checkpoints load by name.

The module names are the checkpoint's (`wte`, `wpe`, `h.{i}.ln_1`, `h.{i}.attn.c_attn`, ...,
`ln_f`), so hf_folder.py loads a file with one loop over names. Linear layers are `nn.Linear`
(weights `[out, in]`); hf_folder.py transposes Hugging Face's Conv1D weights (`[in, out]`) on
the way in and out. There is no `lm_head` module: GPT-2 ties its output layer to the token
embedding, so `lm_logits` reads `wte.weight`.

Attention masks (`GPT2.forward`):
- None: plain causal attention, the fast path (`is_causal=True` in scaled_dot_product_attention).
- `[B, T]` padding mask, 1 = token, 0 = pad. Right padding gives exactly what the unpadded
  sequence gives at its real positions. Left padding works too: unless `position_ids` are given,
  positions count from each row's first real token (cumsum - 1, clipped at 0, as HF's generate).
- `[B, 1, T, T]` attention pattern, boolean (True = may attend) or additive float, used with
  explicit `position_ids`. It is the whole pattern, causality included: the shared-prefix pairs
  of training pack `[prefix, chosen suffix, rejected suffix]` into one row, where the rejected
  suffix attends the prefix but not the chosen suffix, and its positions restart after the prefix.
Every query always attends to itself (a causal model's diagonal is never masked): a padding row
that would otherwise attend to nothing gives a finite result instead of NaN.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minqr.errors import MinqrError
from minqr.models.config_checks import number_problems, token_id_problems

# Hugging Face's activation names -> F.gelu's `approximate`. GPT-2 uses "gelu_new", the tanh form.
GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

# HF GPT-2 options that change the computation and that minqr does not implement, with the only
# value minqr accepts. No released GPT-2 checkpoint sets them otherwise.
_HF_FIXED_OPTIONS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}

SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


# the dropout probabilities of the config: after each residual branch, on the embeddings, on the attention
DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


@dataclass
class GPT2Config:
    """GPT-2's hyper-parameters, with the field names of Hugging Face's config.json."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            problems.append(f"n_inner={self.n_inner!r} must be a positive integer or null")
        if not problems and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation_function not in GELU_APPROXIMATION:
            problems.append(
                f"activation_function={self.activation_function!r} is not supported "
                f"(use one of {sorted(GELU_APPROXIMATION)})"
            )
        problems += number_problems(self, DROPOUTS, below_one=True)
        problems += number_problems(self, ("layer_norm_epsilon",), positive=True)
        problems += token_id_problems(self, ("bos_token_id", "eos_token_id"))
        if problems:
            raise MinqrError("invalid GPT-2 config: " + "; ".join(problems))

    @property
    def hidden_size(self) -> int:
        """The width of the hidden states, under the name the Llama family's config has for it."""
        return self.n_embd

    @property
    def max_positions(self) -> int:
        """The longest sequence the model has positions for (every backbone's config says it)."""
        return self.n_positions

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        """The config of a released GPT-2 size: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"."""
        if name not in SIZES:
            raise MinqrError(f"unknown GPT-2 size {name!r}: choose one of {', '.join(SIZES)}")
        return cls(**{**SIZES[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        """Read a Hugging Face config.json dict; keys that do not change the model are ignored."""
        if d.get("model_type") != "gpt2":
            raise MinqrError(
                f"not a GPT-2 config: model_type is {d.get('model_type')!r}, expected 'gpt2'. Give a GPT-2 "
                f"checkpoint ({', '.join(SIZES)}, or one fine-tuned from them), or load other families with "
                "minqr.load_backbone"
            )
        unsupported = [f"{k}={d[k]!r}" for k, ok in _HF_FIXED_OPTIONS.items() if d.get(k, ok) != ok]
        if unsupported:
            raise MinqrError(
                f"GPT-2 config uses options minqr does not implement: {', '.join(unsupported)} "
                f"(supported: {', '.join(f'{k}={v}' for k, v in _HF_FIXED_OPTIONS.items())})"
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """The fields as Hugging Face's config.json has them (add "architectures" when writing)."""
        return {"model_type": "gpt2", **asdict(self)}


def attend(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """Attention of q [B, heads, T, head_dim] over k, v [B, kv_heads, T, head_dim] -> [B, heads, T,
    head_dim], under `mask` (from attention_mask_4d; None: causal, SDPA's fast path). Fewer
    key/value heads than query heads is grouped-query attention (Llama): key/value head j serves
    query heads j*g .. j*g + g-1, g = heads / kv_heads."""
    if mask is not None and mask.is_floating_point():
        # SDPA takes an additive mask in q's dtype, which is half precision under autocast
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=mask is None,
        enable_gqa=k.shape[1] != q.shape[1],
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]: heads become a batch dimension for the attention
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, mask, self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, n_head, T, head_dim] -> [B, T, C]
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.approximate = GELU_APPROXIMATION[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LN transformer block: the residual stream itself is never normalised."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


def attention_mask_4d(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """A `[B, T]` padding mask or a `[B, 1, T, T]` pattern -> the `[B, 1, T, T]` mask SDPA takes.

    The diagonal is always allowed, so that no query row is all masked: the softmax of such a row
    is NaN in some SDPA kernels (torch < 2.5's math kernel, for one).
    """
    diagonal = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    if attention_mask.dim() == 2:
        causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
        # [B, T] key mask -> [B, 1, 1, T], broadcast over heads and queries
        return (causal & attention_mask.bool()[:, None, None, :]) | diagonal
    if attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return attention_mask | diagonal
        return attention_mask.masked_fill(diagonal, 0.0)
    raise MinqrError(
        f"attention_mask has shape {list(attention_mask.shape)}: give a [B, T] padding mask "
        "(1 = token, 0 = pad) or a [B, 1, T, T] attention pattern (bool: True = attend, or additive float)"
    )


def default_position_ids(attention_mask: torch.Tensor | None, T: int, device) -> torch.Tensor:
    """The positions of tokens when none are given: under a `[B, T]` padding mask they count from
    each row's first real token, so that left padding gives what the unpadded row gives; else
    0..T-1 (a `[B, 1, T, T]` pattern comes with its own positions)."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.arange(T, device=device)


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        # Activation checkpointing: in training, keep only each block's input and run the block
        # again in the backward, for memory about 1/n_layer of the activations at the cost of a
        # second forward. The random state is replayed, so dropout draws the same masks.
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2's initialisation (as Hugging Face does it) for training from scratch."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # each block adds two projections to the residual stream: scaling them keeps its
                # variance from growing with depth (GPT-2 paper, section 2.3)
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """Token ids `[B, T]` -> hidden states `[B, T, n_embd]` after the final layer norm."""
        B, T = input_ids.shape
        mask = None if attention_mask is None else attention_mask_4d(attention_mask, T)
        if position_ids is None:
            # Only a row of one sequence is bounded by n_positions: a packed shared-prefix row
            # [prefix, chosen, rejected] may be wider, its explicit positions never are (the
            # batching code truncates every text to at most n_positions tokens).
            if T > self.config.n_positions:
                raise MinqrError(
                    f"sequence of {T} tokens is longer than the model's "
                    f"n_positions={self.config.n_positions}: truncate the inputs"
                )
            position_ids = default_position_ids(attention_mask, T, input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for block in self.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.ln_f(x)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, under a name every backbone has (FSDP shards one unit per block)."""
        return self.h

    def lm_logits(self, hidden):
        """Hidden states `[..., n_embd]` -> next-token logits `[..., vocab_size]` (tied to wte)."""
        return F.linear(hidden, self.wte.weight)
