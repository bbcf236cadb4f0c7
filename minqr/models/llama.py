"""The Llama family (Llama 2 and 3, Qwen2 and Qwen2.5, Mistral) in plain PyTorch, laid out like
Hugging Face's `LlamaModel` so that its checkpoints load by name.

The module names are the checkpoint's without its `model.` prefix (`embed_tokens`,
`layers.{i}.self_attn.q_proj`, ..., `layers.{i}.mlp.down_proj`, `norm`), so hf_folder.py loads a
file with one loop over names. A block is

    x = x + o_proj(attention(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))
    x = x + down_proj(silu(gate_proj(rms(x))) * up_proj(rms(x)))          (SwiGLU)

and the backbone ends with a last RMSNorm. The three variants differ only in their config:
- llama: optional biases on all four attention projections (`attention_bias`) and on the MLP
  (`mlp_bias`), llama3 frequency scaling of RoPE (Llama 3.1 and later);
- qwen2: biases on q, k and v, never on o nor the MLP (whatever config.json says);
- mistral: no biases (whatever config.json says), and a sliding attention window, which minqr
  does not implement: a config whose window is active is refused.
Grouped-query attention: `num_key_value_heads` divides `num_attention_heads`, and each key/value
head serves `num_attention_heads / num_key_value_heads` consecutive query heads.

There is no output layer (`lm_head`): a reward model reads the final hidden state, and the output
layer of an untied checkpoint is a vocabulary-sized matrix (0.5B parameters in Llama 3 8B) it
would never use. Loading skips it.

Attention masks and positions (`Llama.forward`) follow GPT-2's contract (gpt2.py): None is plain
causal attention; a `[B, T]` padding mask (1 = token) works with right and left padding, positions
counting from each row's first real token; a `[B, 1, T, T]` pattern (bool or additive) comes with
explicit `position_ids`, as the shared-prefix rows of training do. Every query attends to itself.
Rotary embeddings have no table of positions, so there is no hard limit on T; beyond
`max_position_embeddings` the model is merely untrained.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minqr.errors import MinqrError
from minqr.models.config_checks import number_problems, token_id_problems
from minqr.models.gpt2 import attend, attention_mask_4d, default_position_ids
from minqr.reading import is_finite_number

VARIANTS = ("llama", "qwen2", "mistral")
# RoPE's "rope_type"s that minqr implements, and the keys the llama3 one needs
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DEFAULT_ROPE_THETA = 10000.0  # transformers' default where a config names none


@dataclass
class LlamaConfig:
    """The hyper-parameters of the Llama family, with the field names of Hugging Face's config.json.

    RoPE is `rope_theta` and `rope_scaling` as older config.json files have them; `from_dict` also
    reads the `rope_parameters` that transformers 5 writes.
    """

    model_type: str = "llama"  # "llama", "qwen2" or "mistral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: dict | None = None  # None: plain RoPE; else {"rope_type": "llama3", *LLAMA3_KEYS}
    attention_bias: bool = False  # llama: biases on q, k, v and o (qwen2, mistral: see `biases`)
    mlp_bias: bool = False  # llama: biases on the MLP's three projections
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False  # whether an output layer would be the token embedding
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        problems = []
        if self.model_type not in VARIANTS:
            problems.append(f"model_type={self.model_type!r} is not one of {', '.join(VARIANTS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        if not problems and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} must be divisible by "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if not problems and self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even (RoPE turns pairs of dimensions)")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} is not supported (the Llama family uses 'silu')")
        problems += number_problems(self, ("attention_dropout",), below_one=True)
        problems += number_problems(self, ("rms_norm_eps", "rope_theta"), positive=True)
        problems += token_id_problems(self, ("bos_token_id", "eos_token_id", "pad_token_id"))
        if self.rope_scaling is not None:
            numbers = isinstance(self.rope_scaling, dict) and all(
                is_finite_number(self.rope_scaling.get(k)) and self.rope_scaling.get(k) > 0 for k in LLAMA3_KEYS)
            if not numbers or self.rope_scaling.get("rope_type") != "llama3":
                problems.append(f"rope_scaling={self.rope_scaling!r} must be None or "
                                f"{{'rope_type': 'llama3', {', '.join(repr(k) + ': ...' for k in LLAMA3_KEYS)}}}")
            elif self.rope_scaling["low_freq_factor"] >= self.rope_scaling["high_freq_factor"]:
                problems.append("rope_scaling's low_freq_factor must be below its high_freq_factor")
        if problems:
            raise MinqrError(f"invalid {self.model_type} config: " + "; ".join(problems))

    @property
    def max_positions(self) -> int:
        """The longest sequence the model was trained for (as GPT2Config.max_positions)."""
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Read a Hugging Face config.json dict of a llama, qwen2 or mistral model; keys that do not
        change the model are ignored, options that change it and that minqr lacks are refused."""
        model_type = d.get("model_type")
        if model_type not in VARIANTS:
            raise MinqrError(f"not a Llama-family config: model_type is {model_type!r}, expected one of "
                             f"{', '.join(map(repr, VARIANTS))}")
        window = _active_sliding_window(d)
        if window:
            raise MinqrError(
                f"{model_type} config has an active sliding attention window ({window}): minqr attends over the "
                "whole sequence and does not implement sliding windows. Use a checkpoint without one "
                '("sliding_window": null, as Mistral-7B-v0.2 and later have it)'
            )
        # transformers 5 writes {"rope_type", "rope_theta", ...} as rope_parameters; older files have
        # rope_theta beside rope_scaling (whose "rope_type" was once called "type")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise MinqrError(f"{model_type} config: rope_scaling (or rope_parameters) must be a dict, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise MinqrError(f"{model_type} config uses RoPE of rope_type {rope_type!r}, which minqr does not "
                             f"implement (supported: {', '.join(ROPE_TYPES)})")
        names = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling"}
        config = {k: v for k, v in d.items() if k in names}
        config["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", DEFAULT_ROPE_THETA))
        if rope_type == "llama3":
            # transformers' default for the pre-training context length
            scaling = {"original_max_position_embeddings": d.get("max_position_embeddings"), **rope}
            config["rope_scaling"] = {"rope_type": "llama3", **{k: scaling.get(k) for k in LLAMA3_KEYS}}
        return cls(**config)

    @property
    def biases(self) -> tuple[bool, bool, bool]:
        """(q/k/v, o, MLP): which projections have biases. Only llama reads attention_bias and
        mlp_bias; transformers' Qwen2 always has q, k and v biases and no others, Mistral none,
        whatever a saved config.json says of those two keys."""
        if self.model_type == "qwen2":
            return True, False, False
        if self.model_type == "mistral":
            return False, False, False
        return self.attention_bias, self.attention_bias, self.mlp_bias

    def to_dict(self) -> dict:
        """The fields as Hugging Face's config.json has them (add "architectures" when writing)."""
        if self.model_type == "llama":
            return asdict(self)
        # without the key, transformers would give mistral (and qwen2) its default window
        return {**asdict(self), "sliding_window": None}


def _active_sliding_window(d: dict) -> str:
    """What sets a sliding window in a config.json dict, or "" when no layer has one. Mistral slides
    on every layer as soon as sliding_window is set; Qwen2 only with use_sliding_window, and only on
    layers from max_window_layers on (or those that layer_types says)."""
    if d["model_type"] == "llama":
        return ""
    window = d.get("sliding_window", 4096)  # transformers' default for both, where the key is absent
    if window is None:
        return ""
    if d["model_type"] == "mistral":
        return f"sliding_window={window}"
    if not d.get("use_sliding_window"):
        return ""
    layers = d.get("num_hidden_layers", 0)
    if d.get("layer_types"):
        types = d["layer_types"]
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"] if isinstance(types, list) else [0]
    else:  # layers from max_window_layers on, counted without listing them (a damaged count may be huge)
        first = d.get("max_window_layers", 28)  # transformers' default
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, layers)):
            raise MinqrError(f"qwen2 config: max_window_layers={first!r} and num_hidden_layers={layers!r} must be "
                             "integers")
        sliding = [first, layers - 1] if layers > first else []
    if not sliding:
        return ""
    where = f"layer {sliding[0]}" if sliding[0] == sliding[-1] else f"layers {sliding[0]} to {sliding[-1]}"
    return f"use_sliding_window=true, sliding_window={window} on {where}"


def rope_frequencies(config: LlamaConfig, device=None) -> torch.Tensor:
    """[head_dim / 2] the angle per position of each pair of dimensions, in float32 (as transformers).

    Plain RoPE: theta^(-2i / head_dim). llama3 scaling (Llama 3.1) slows the low frequencies down,
    for a longer context than pre-training's: wavelengths beyond original / low_freq_factor are
    divided by `factor`, those under original / high_freq_factor are kept, and those between are
    interpolated smoothly.
    """
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    if config.rope_scaling is None:
        return inv_freq
    factor, low, high, original = (config.rope_scaling[k] for k in LLAMA3_KEYS)
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    slowed = torch.where(wavelength > original / low, inv_freq / factor, interpolated)
    return torch.where(wavelength < original / high, inv_freq, slowed)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, heads, T, head_dim]: dimensions i and i + head_dim/2 form a pair, turned by its
    position's angle (Hugging Face's layout, not interleaved pairs). cos, sin: [B or 1, 1, T, head_dim]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        # the mean square in float32 whatever x's dtype, as transformers does: half precision loses
        # digits there; then back to x's dtype before the weight
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias, o_bias, _ = config.biases
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=o_bias)
        self.attention_dropout = config.attention_dropout

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        # [B, T, heads * head_dim] -> [B, heads, T, head_dim]: heads become a batch dimension
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = attend(q, k, v, mask, self.attention_dropout if self.training else 0.0)  # grouped-query if fewer kv heads
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, heads, T, head_dim] -> [B, T, ...]
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: a SiLU-activated gate times a linear "up" projection, then "down" again."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.biases[2]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block (Hugging Face's LlamaDecoderLayer)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False  # as GPT2's: recompute each block in the backward

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """Token ids `[B, T]` -> hidden states `[B, T, hidden_size]` after the final norm."""
        B, T = input_ids.shape
        mask = None if attention_mask is None else attention_mask_4d(attention_mask, T)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, T, input_ids.device)
        x = self.embed_tokens(input_ids)
        # The rotation angles are computed afresh, not kept in a buffer: they are cheap, and a buffer
        # would be left on the meta device by loading and rounded by model.to(torch.bfloat16).
        angles = position_ids[..., None].float() * rope_frequencies(self.config, input_ids.device)  # [.., T, d/2]
        # both dimensions of a pair turn by the same angle; [.., T, head_dim] -> [.., 1, T, head_dim],
        # broadcast over the heads
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(-3)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)
