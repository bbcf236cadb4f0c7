"""`load_backbone`: a Hugging Face folder -> the minqr backbone that its config.json's model_type
names: GPT2 (gpt2.py) for "gpt2", Llama (llama.py) for "llama", "qwen2" and "mistral".

Every backbone maps token ids `[B, T]` (with an optional padding mask or attention pattern, and
positions) to the hidden states `[B, T, hidden]` after its final norm, under the same contract
(gpt2.py's docstring). The folder may hold the bare model (GPT2Model, LlamaModel, ...) or one with
a head (GPT2LMHeadModel, LlamaForCausalLM, ...), in one safetensors file or sharded.
"""
from pathlib import Path

from minqr.errors import MinqrError
from minqr.models.gpt2 import DROPOUTS as GPT2_DROPOUTS
from minqr.models.gpt2 import GPT2, GPT2Config
from minqr.models.hf_folder import backbone_config, load_model, read_config
from minqr.models.llama import Llama, LlamaConfig

# model_type -> (minqr's module, its config, the start of transformers' class names: GPT2Model,
# Qwen2ForSequenceClassification, ...)
FAMILIES = {
    "gpt2": (GPT2, GPT2Config, "GPT2"),
    "llama": (Llama, LlamaConfig, "Llama"),
    "qwen2": (Llama, LlamaConfig, "Qwen2"),
    "mistral": (Llama, LlamaConfig, "Mistral"),
}


# The config keys of each family's dropout: GPT-2's after the residual branches, on the embeddings
# and on the attention; the Llama family's on the attention only (the released models set it to 0).
DROPOUTS = {GPT2: GPT2_DROPOUTS, Llama: ("attention_dropout",)}


def load_backbone(path, dtype=None, device=None, dropout: float | None = None):
    """The backbone in the Hugging Face folder `path`, in eval mode: GPT2 or Llama, by the model_type
    of its config.json. `dtype=None` keeps the dtype stored in the file. `dropout` sets every
    dropout probability the family has (DROPOUTS); None keeps the config's."""
    config = read_config(path)
    model_class, config_class, _ = family(config, path)
    overrides = {} if dropout is None else {key: dropout for key in DROPOUTS[model_class]}
    return load_model(path, model_class, backbone_config(config_class, {**config, **overrides}, path), dtype, device)


def family(config: dict, folder) -> tuple:
    """The FAMILIES entry of `config`, the config.json dict read from `folder`, by its model_type; an
    unknown model_type is a MinqrError that names the supported ones."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise MinqrError(f"{Path(folder) / 'config.json'} has model_type {model_type!r}, which minqr does not "
                         f"implement: supported are {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def check_max_length(backbone, max_length: int, name: str = "max_length") -> None:
    """A MinqrError, naming the option `name`, when texts of `max_length` tokens would not fit the
    backbone's positions."""
    positions = backbone.config.max_positions
    if max_length > positions:
        raise MinqrError(f"{name} {max_length} is more than the model's {positions} positions: lower it")
